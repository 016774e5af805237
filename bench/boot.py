"""Wall time of one boot test, split into build, firmware, loader, kernel, probe and verdict.

    .venv/bin/python bench/boot.py [RECIPE] [--out DIR] [--keep]

Builds RECIPE (default recipes/debian-minimal.yaml) with the real CLI into a temp folder, boots
it with the harness (QEMU + OVMF + swtpm, TCG here) and times the verdict. Phases come from the
serial console markers the harness watches: firmware = power-on to "BdsDxe: starting Boot",
loader = systemd-boot + systemd-stub until "EFI stub:", kernel = to BOOTCHAIN-INIT-REACHED,
probe = init to BOOTCHAIN-PROBE-DONE, shutdown = to QEMU exit.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder import boottest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(REPO / "recipes/debian-minimal.yaml"))
    parser.add_argument("--out", type=Path, help="build here (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bootchain-bench-"))
    try:
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "builder.cli", "build", args.recipe, "--out", str(out)],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        t_build = time.monotonic() - t0
        (outdir,) = [p.parent for p in out.glob("*/*/build.json")]
        t1 = time.monotonic()
        result = boottest.run_boot_test(outdir)
        t_total = time.monotonic() - t1
        labels = {
            "firmware": "firmware (power-on to boot option)",
            "loader": "loader (systemd-boot + stub)",
            "kernel": "kernel (to /init)",
            "init": "init (modules)",
            "probe": "probe",
            "done": "power-off",
        }
        marks = sorted(result.boot.phases.items(), key=lambda kv: kv[1])
        ends = [t for _, t in marks[1:]] + [result.boot.duration]
        rows = [("build", t_build)]
        rows += [(labels.get(n, n), end - t) for (n, t), end in zip(marks, ends, strict=True)]
        rows.append(("verdict (parse, replay, compare)", t_total - result.boot.duration))
        width = max(len(r[0]) for r in rows)
        print(
            f"recipe: {args.recipe}  accel: {result.boot.accel}  verdict: "
            f"{'MATCH' if result.verdict.ok else 'MISMATCH'}"
        )
        for label, seconds in rows:
            print(f"  {label:<{width}}  {seconds:7.1f} s")
        print(f"  {'total':<{width}}  {t_build + t_total:7.1f} s")
        return 0 if result.verdict.ok else 1
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
