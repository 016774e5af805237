"""Shared fixtures: builds are expensive (a kernel, a 60 MB UKI, a disk image), so each recipe
is built once per test session and shared by every test that reads it. Tests must not modify a
shared build: copy it first (``copy_build``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
EXAMPLE_KEYS = ROOT / "keys.example"


def bootchain(
    *args: str | Path, cwd: Path = ROOT, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as users do."""
    proc = subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=1800,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"bootchain {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}"
        )
    return proc


def _build(out: Path, recipe: str, *extra: str | Path) -> Path:
    bootchain("build", RECIPES / recipe, "--out", out, *extra)
    builds = [p for p in out.glob("*/*") if (p / "build.json").is_file()]
    assert len(builds) == 1, builds
    return builds[0]


@pytest.fixture(scope="session")
def build_recipe(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build a recipe once per (recipe, options) for the whole session; returns OUTDIR."""
    cache: dict[tuple[str, ...], Path] = {}

    def get(recipe: str, *extra: str | Path) -> Path:
        key = (recipe, *map(str, extra))
        if key not in cache:
            out = tmp_path_factory.mktemp("build")
            cache[key] = _build(out, recipe, *extra)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def default_build(build_recipe: Callable[..., Path]) -> Path:
    """recipes/debian-minimal.yaml with keys.example."""
    return build_recipe("debian-minimal.yaml")


@pytest.fixture(scope="session")
def console_build(build_recipe: Callable[..., Path]) -> Path:
    """recipes/debian-console.yaml (extends the default) with keys.example."""
    return build_recipe("debian-console.yaml")


@pytest.fixture(scope="session")
def fresh_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key set generated for this session with `bootchain keys generate`."""
    folder = tmp_path_factory.mktemp("keys") / "customer"
    bootchain("keys", "generate", folder, "--subject", "bootchain test customer")
    return folder


@pytest.fixture(scope="session")
def fresh_keys_build(build_recipe: Callable[..., Path], fresh_keys: Path) -> Path:
    """The default recipe signed with a freshly generated key set."""
    return build_recipe("debian-minimal.yaml", "--keys", fresh_keys)


@pytest.fixture(scope="session")
def console_fresh_keys_build(build_recipe: Callable[..., Path], fresh_keys: Path) -> Path:
    """The second recipe signed with the freshly generated key set."""
    return build_recipe("debian-console.yaml", "--keys", fresh_keys)


@pytest.fixture
def copy_build(tmp_path: Path) -> Callable[[Path], Path]:
    """A private copy of a shared build that a test may change."""

    def copy(outdir: Path) -> Path:
        dest = tmp_path / outdir.name
        shutil.copytree(outdir, dest)
        return dest

    return copy
