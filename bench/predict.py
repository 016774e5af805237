"""Benchmarks for the measurement engine.

    .venv/bin/python bench/predict.py [OUTDIR] [--size-mb 10]

1. Time to predict: with OUTDIR (a finished build), the whole ``predict()`` from the final
   artifacts (Authenticode of both images in 3 banks, UKI sections, GPT, varstore); without
   it, the event walk + replay from the vector's decoded inputs.
2. Parse + replay (sha1, sha256) of a ~10 MB log made by repeating the vector's events,
   beside ``tpm2_eventlog`` (which parses and replays too) on the same file.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from builder.measure import eventlog as el  # noqa: E402
from builder.measure.chain import load_chain  # noqa: E402
from builder.measure.platform import load_platform  # noqa: E402
from builder.measure.predict import make_measurements, predict  # noqa: E402

VECTOR = ROOT / "tests" / "data" / "eventlog" / "eventlog.bin"


def best_of(n: int, fn: object) -> float:
    """Best wall time of ``n`` runs (the machine is shared: see also cpu_of)."""
    assert callable(fn)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cpu_of(fn: object) -> float:
    """CPU seconds of one run, ours plus children's (tpm2_eventlog)."""
    assert callable(fn)
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return sum(
        (a.ru_utime + a.ru_stime) - (b.ru_utime + b.ru_stime)
        for a, b in zip(after, before, strict=True)
    )


def bench_predict(outdir: Path | None) -> None:
    platform = load_platform("ovmf-2022.11-q35-secboot")
    chain = load_chain(platform.chain)
    if outdir is None:
        sys.path.insert(0, str(ROOT / "tests" / "unit"))
        from test_predict import vector_inputs

        inputs = vector_inputs(el.EventLog.parse(VECTOR.read_bytes()))
        t = best_of(20, lambda: make_measurements(platform, chain, inputs))
        print(f"predict (vector inputs, walk + replay, 3 banks): {t * 1000:.1f} ms")
        return
    from builder.commands.predict import _build_json, _db_cert, _uki_name
    from builder.disk import gpt_event_data

    build = _build_json(outdir)
    uki_name = _uki_name(outdir, build)
    varstore = (outdir / "ovmf-vars.fd").read_bytes()
    args = argparse.Namespace(db_cert=None, outdir=outdir)
    boot = (outdir / "BOOTX64.EFI").read_bytes()
    uki = (outdir / uki_name).read_bytes()

    def run() -> None:
        predict(
            platform=platform,
            chain=chain,
            bootloader=boot,
            uki=uki,
            uki_path_on_esp=f"\\EFI\\Linux\\{uki_name}",
            gpt_event_data=gpt_event_data(outdir / "disk.img"),
            varstore=varstore,
            db_cert=_db_cert(args, build, varstore),
            loader_cmdline=None,
        )

    t = best_of(5, run)
    print(f"predict {outdir} (UKI {len(uki) / 1e6:.1f} MB, 3 banks): {t * 1000:.0f} ms")


def bench_parse(size_mb: float) -> None:
    log = el.EventLog.parse(VECTOR.read_bytes())
    one = sum(len(bytes(e)) for e in log.events)
    copies = max(1, int(size_mb * 1e6 // one))
    big = el.EventLog(log.spec_id, log.events * copies, header_data=log.header_data)
    data = bytes(big)
    print(f"log: {len(data) / 1e6:.1f} MB, {len(big.events)} events")

    def parse_replay() -> None:
        parsed = el.EventLog.parse(data)
        el.replay(parsed.events, "sha1")
        el.replay(parsed.events, "sha256")

    t = best_of(3, parse_replay)
    cpu = cpu_of(parse_replay)
    print(f"bootchain parse + replay sha1,sha256: wall {t:.2f} s, cpu {cpu:.2f} s")
    t_parse = best_of(3, lambda: el.EventLog.parse(data))
    print(f"bootchain parse only: wall {t_parse:.2f} s")
    tool = shutil.which("tpm2_eventlog")
    if tool is None:
        print("tpm2_eventlog: not installed (tpm2-tools)")
        return
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(data)
        f.flush()

        def run_tool() -> None:
            subprocess.run(
                [tool, f.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
            )

        t_tool = best_of(1, run_tool)
        cpu_tool = cpu_of(run_tool)
    print(
        f"tpm2_eventlog (parse, replay, YAML to /dev/null): wall {t_tool:.2f} s, "
        f"cpu {cpu_tool:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", nargs="?", type=Path)
    parser.add_argument("--size-mb", type=float, default=10.0)
    args = parser.parse_args()
    bench_predict(args.outdir)
    bench_parse(args.size_mb)


if __name__ == "__main__":
    main()
