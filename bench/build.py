"""Build benchmark: warm-cache build time of the default recipe, a rebuild after changing only
the command line, and the size of each artifact.

    .venv/bin/python bench/build.py [--recipe recipes/debian-minimal.yaml] [--runs 3]

The first (untimed) build fills the package cache; the timed builds run with --offline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(recipe: str, out: Path, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "builder.cli", "build", recipe, "--out", str(out), *extra],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/debian-minimal.yaml")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bootchain-bench-") as tmp:
        out = Path(tmp)
        build(args.recipe, out / "warmup")
        warm = [build(args.recipe, out / f"warm{i}", "--offline") for i in range(args.runs)]
        cmdline = [
            build(
                args.recipe,
                out / f"cmdline{i}",
                "--offline",
                "--set",
                f"cmdline=console=ttyS0,115200 loglevel={i + 3} panic=-1",
            )
            for i in range(args.runs)
        ]
        outdir = next((out / "warm0").glob("*/*"))
        record = json.loads((outdir / "build.json").read_text())
    print(f"recipe: {args.recipe} ({args.runs} runs each, package cache warm, --offline)")
    print(f"{'warm build':<32} median {statistics.median(warm):7.2f} s  min {min(warm):7.2f} s")
    print(
        f"{'rebuild, other command line':<32} median {statistics.median(cmdline):7.2f} s  "
        f"min {min(cmdline):7.2f} s"
    )
    print()
    print(f"{'artifact':<36} {'size':>14}")
    for artifact in record["artifacts"]:
        print(f"{artifact['name']:<36} {artifact['size']:>14,}")


if __name__ == "__main__":
    main()
