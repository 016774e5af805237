"""Reproducibility check: build one recipe twice under different conditions, compare bytes.

The second build runs from a copy of the recipe folder and key set in another directory, into
another output root, with another time zone, umask and locale and (when libfaketime is there)
a wall clock years ahead. Every artifact must have the same sha256.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from builder.errors import VerificationError
from builder.fsutil import sha256_file
from builder.recipe import load_recipe
from builder.run import run

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@dataclass(frozen=True)
class Variant:
    """One way of running a build."""

    label: str
    env: Mapping[str, str]


VARIANTS = (
    Variant("A", {"TZ": "UTC", "LC_ALL": "C.UTF-8", "BOOTCHAIN_UMASK": "022"}),
    Variant(
        "B",
        {
            "TZ": "Pacific/Kiritimati",
            "LC_ALL": "C",
            "LANG": "de_DE.UTF-8",
            "BOOTCHAIN_UMASK": "077",
            **(
                {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": "+1234d"}
                if FAKETIME_LIB.exists()
                else {}
            ),
        },
    ),
)


@dataclass(frozen=True)
class ReproReport:
    digests: tuple[tuple[str, str, str], ...]  # name, digest A, digest B

    @property
    def equal(self) -> bool:
        return all(a == b for _, a, b in self.digests)

    def render(self) -> str:
        lines = [f"{'artifact':<34} {'build A':<16} {'build B':<16} same"]
        for name, a, b in self.digests:
            lines.append(f"{name:<34} {a[:16]:<16} {b[:16]:<16} {'yes' if a == b else 'NO'}")
        return "\n".join(lines)


def _digests(outdir: Path) -> dict[str, str]:
    return {
        p.relative_to(outdir).as_posix(): sha256_file(p)
        for p in sorted(outdir.rglob("*"))
        if p.is_file()
    }


def compare_outdirs(first: Path, second: Path) -> ReproReport:
    """sha256 of every file of two build folders, side by side."""
    a, b = _digests(first), _digests(second)
    names = sorted(set(a) | set(b))
    return ReproReport(tuple((n, a.get(n, "missing"), b.get(n, "missing")) for n in names))


def build_variant(workdir: Path, recipe: Path, keys: Path, out: Path, variant: Variant) -> Path:
    """Build ``recipe`` in a subprocess under ``variant``'s conditions; returns OUTDIR."""
    code = (
        "import os, sys; os.umask(int(os.environ['BOOTCHAIN_UMASK'], 8)); "
        "from builder.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    run(
        [sys.executable, "-c", code, "build", str(recipe), "--keys", str(keys), "--out", str(out)],
        cwd=workdir,
        env=dict(variant.env),
        timeout=1800,
    )
    loaded = load_recipe(recipe)
    return out / loaded.name / loaded.version


def check_reproducible(recipe: Path, keys: Path) -> ReproReport:
    """Build ``recipe`` twice and raise VerificationError unless every artifact is equal."""
    recipe = recipe.resolve()
    keys = keys.resolve()
    with tempfile.TemporaryDirectory(prefix="bootchain-repro-") as tmp:
        root = Path(tmp)
        first = build_variant(Path.cwd(), recipe, keys, root / "out-a", VARIANTS[0])
        elsewhere = root / "elsewhere" / "project"
        shutil.copytree(recipe.parent, elsewhere / "recipes")
        shutil.copytree(keys, elsewhere / "my-keys")
        second = build_variant(
            elsewhere,
            elsewhere / "recipes" / recipe.name,
            elsewhere / "my-keys",
            root / "out-b",
            VARIANTS[1],
        )
        report = compare_outdirs(first, second)
    if not report.equal:
        differing = [n for n, x, y in report.digests if x != y]
        raise VerificationError(
            f"build of {recipe.name} is not reproducible: {', '.join(differing)} differ"
        )
    return report
