"""Publish and fetch a 500 MB image against a local SeaweedFS, beside `aws s3 cp`.

Starts its own `weed mini` on free ports in a temp folder, publishes a fake build whose
disk.img is SIZE_MB (bootchain publish: sha256 check, SHA-256 part checksums, conditional
writes), fetches it back with every byte verified, then uploads and downloads the same file
with `aws s3 cp` (awscli from the venv) on the same server. Prints MB/s and the ratios.

    .venv/bin/python bench/publish.py [--size-mb 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.dsse import load_release_key, load_trust  # noqa: E402
from builder.publish import publish  # noqa: E402
from builder.store.fetch import RollbackState, fetch  # noqa: E402
from builder.store.s3 import S3Store  # noqa: E402
from tests.fake_outdir import make_outdir, make_release_key  # noqa: E402
from tests.integration.seaweed import BUCKET, Weed  # noqa: E402

MB = 1_000_000


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = args.size_mb * MB

    work = Path(tempfile.mkdtemp(prefix="bench-publish."))
    weed = Weed(work / "weed")
    try:
        weed.start()
        out = make_outdir(work / "out", big=size)
        make_release_key(work / "keys")
        key = load_release_key(work / "keys" / "release.key")
        trust = load_trust(work / "keys" / "trust.json")
        image = out / "disk.img"
        total = sum(p.stat().st_size for p in out.iterdir() if p.name != "build.json")

        store = S3Store(BUCKET, "bench", weed.client("rw"))
        t_publish = timed(lambda: publish(out, store, key, "stable"))
        reader = S3Store(BUCKET, "bench", weed.client("ro"))
        got = work / "got"
        t_fetch = timed(
            lambda: fetch(
                reader,
                "debian-minimal",
                "stable",
                trust,
                got,
                artifacts=True,
                state=RollbackState(work / "state"),
            )
        )
        assert (got / "disk.img").stat().st_size == size

        aws = shutil.which("aws") or str(Path(sys.executable).parent / "aws")
        env = {**os.environ, **weed.env("rw")}
        base = [aws, "--endpoint-url", weed.endpoint, "s3", "cp", "--only-show-errors"]
        url = f"s3://{BUCKET}/aws/disk.img"
        t_aws_up = timed(lambda: subprocess.run([*base, str(image), url], env=env, check=True))
        down = work / "aws-down.img"
        t_aws_down = timed(lambda: subprocess.run([*base, url, str(down)], env=env, check=True))
        assert down.stat().st_size == size
    finally:
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows = {
        "bootchain publish": total / MB / t_publish,
        "aws s3 cp (upload)": size / MB / t_aws_up,
        "bootchain fetch --artifacts": total / MB / t_fetch,
        "aws s3 cp (download)": size / MB / t_aws_down,
    }
    result = {
        "size_mb": args.size_mb,
        "seconds": {
            "publish": round(t_publish, 2),
            "aws_upload": round(t_aws_up, 2),
            "fetch": round(t_fetch, 2),
            "aws_download": round(t_aws_down, 2),
        },
        "mb_per_s": {k: round(v, 1) for k, v in rows.items()},
        "ratio_publish_vs_aws": round(rows["bootchain publish"] / rows["aws s3 cp (upload)"], 2),
        "ratio_fetch_vs_aws": round(
            rows["bootchain fetch --artifacts"] / rows["aws s3 cp (download)"], 2
        ),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.size_mb} MB image, SeaweedFS on 127.0.0.1 ({os.cpu_count()} CPUs)")
        for name, rate in rows.items():
            print(f"  {name:<30} {rate:8.1f} MB/s")
        print(f"  publish / aws upload   = {result['ratio_publish_vs_aws']}")
        print(f"  fetch / aws download   = {result['ratio_fetch_vs_aws']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
