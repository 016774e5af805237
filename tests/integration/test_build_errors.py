"""Bad inputs to `bootchain build`: one line naming what and where, a non-zero exit, no
traceback, and nothing left in the output folder. Runs the real CLI against real apt and a real
(temporary) package cache; fake packages are real .deb files built here."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from builder.inputs import ArMember, cache_path, make_ar
from builder.recipe import load_recipe
from tests.conftest import RECIPES, bootchain

ROOT = Path(__file__).resolve().parents[2]


def _tar(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_deb(package: str, version: str, files: Mapping[str, bytes]) -> bytes:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n".encode()
    return make_ar(
        [
            ArMember("debian-binary", b"2.0\n"),
            ArMember("control.tar.gz", _tar({"control": control})),
            ArMember("data.tar.gz", _tar(files)),
        ]
    )


def assert_one_line_failure(proc: object, out: Path, pattern: str) -> None:
    import re
    import subprocess

    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("bootchain: error:")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.fixture
def recipe_copy(tmp_path: Path) -> Path:
    """A copy of the recipes without lock files, so each test meets the error it is about."""
    dest = tmp_path / "recipes"
    shutil.copytree(RECIPES, dest)
    for lock in dest.glob("*.lock.json"):
        lock.unlink()
    return dest / "debian-minimal.yaml"


def test_stale_lock_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "recipes"
    shutil.copytree(RECIPES, dest)
    (dest / "files" / "os-release").write_text("NAME=changed\n")
    out = tmp_path / "out"
    proc = bootchain("build", dest / "debian-minimal.yaml", "--out", out, check=False)
    assert_one_line_failure(
        proc, out, r"debian-minimal\.lock\.json: local input files/os-release changed"
    )


def _repin(recipe: Path, role: str, *, name: str, version: str, sha256: str) -> None:
    pins = load_recipe(recipe).packages
    old = pins[role]
    text = recipe.read_text()
    text = text.replace(old.sha256, sha256).replace(f"name: {old.name}", f"name: {name}")
    text = text.replace(f"version: {old.version}", f"version: {version}")
    text = text.replace(f'version: "{old.version}"', f'version: "{version}"')
    recipe.write_text(text)


@pytest.mark.network
def test_wrong_package_sha256(recipe_copy: Path, tmp_path: Path) -> None:
    busybox = load_recipe(recipe_copy).packages["busybox"]
    _repin(recipe_copy, "busybox", name=busybox.name, version=busybox.version, sha256="ab" * 32)
    out = tmp_path / "out"
    env = {**os.environ, "BOOTCHAIN_CACHE": str(tmp_path / "cache")}
    proc = bootchain("build", recipe_copy, "--out", out, check=False, env=env)
    assert_one_line_failure(proc, out, r"busybox-static.*(ab){32}|(ab){32}.*busybox-static")


@pytest.mark.network
def test_package_apt_cannot_find(recipe_copy: Path, tmp_path: Path) -> None:
    _repin(
        recipe_copy, "busybox", name="bootchain-no-such-package", version="1.0", sha256="cd" * 32
    )
    out = tmp_path / "out"
    env = {**os.environ, "BOOTCHAIN_CACHE": str(tmp_path / "cache")}
    proc = bootchain("build", recipe_copy, "--out", out, check=False, env=env)
    assert_one_line_failure(proc, out, r"bootchain-no-such-package")


@pytest.fixture
def private_cache(tmp_path: Path, default_build: Path) -> Path:
    """A cache holding the default recipe's real packages (the default build fetched them)."""
    cache = tmp_path / "cache"
    (cache / "sha256").mkdir(parents=True)
    for pin in load_recipe(RECIPES / "debian-minimal.yaml").packages.values():
        os.link(cache_path(pin.sha256), cache / "sha256" / pin.sha256)
    return cache


def _fake_package(recipe: Path, cache: Path, role: str, files: Mapping[str, bytes]) -> None:
    import hashlib

    pin = load_recipe(recipe).packages[role]
    deb = make_deb(pin.name, pin.version, files)
    digest = hashlib.sha256(deb).hexdigest()
    (cache / "sha256" / digest).write_bytes(deb)
    _repin(recipe, role, name=pin.name, version=pin.version, sha256=digest)


def test_already_signed_stub(
    recipe_copy: Path, private_cache: Path, default_build: Path, tmp_path: Path
) -> None:
    # The signed UKI of the default build is a signed PE standing in for a signed stub.
    signed = (default_build / "BOOTX64.EFI").read_bytes()
    files = {
        "usr/lib/systemd/boot/efi/linuxx64.efi.stub": signed,
        "usr/lib/systemd/boot/efi/systemd-bootx64.efi": signed,
    }
    _fake_package(recipe_copy, private_cache, "systemd-boot", files)
    out = tmp_path / "out"
    env = {**os.environ, "BOOTCHAIN_CACHE": str(private_cache)}
    proc = bootchain("build", recipe_copy, "--out", out, "--offline", check=False, env=env)
    assert_one_line_failure(proc, out, r"(?i)already signed|signed stub")


def test_kernel_that_is_not_a_pe_file(
    recipe_copy: Path, private_cache: Path, tmp_path: Path
) -> None:
    release = "6.1.0-56-amd64"
    files = {
        f"boot/vmlinuz-{release}": b"\x7fELF this is not a PE image" + bytes(64),
        f"lib/modules/{release}/modules.builtin": b"",
    }
    recipe_copy.write_text(recipe_copy.read_text().replace("modules: [efivarfs]", "modules: []"))
    _fake_package(recipe_copy, private_cache, "kernel", files)
    out = tmp_path / "out"
    env = {**os.environ, "BOOTCHAIN_CACHE": str(private_cache)}
    proc = bootchain("build", recipe_copy, "--out", out, "--offline", check=False, env=env)
    assert_one_line_failure(proc, out, r"(?i)\.linux|PE|MZ")


def test_offline_without_cache(recipe_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "BOOTCHAIN_CACHE": str(tmp_path / "empty-cache")}
    proc = bootchain("build", recipe_copy, "--out", out, "--offline", check=False, env=env)
    assert_one_line_failure(proc, out, r"(?i)offline|cache")


def test_bad_recipe_through_the_cli(recipe_copy: Path, tmp_path: Path) -> None:
    recipe_copy.write_text(recipe_copy.read_text() + "colour: blue\n")
    out = tmp_path / "out"
    proc = bootchain("build", recipe_copy, "--out", out, check=False)
    assert_one_line_failure(proc, out, r"debian-minimal\.yaml:\d+: colour: unknown key")
    assert proc.returncode == 2


# Regression: a lock file the builder could not read (here a folder) crashed with a traceback.
def test_unreadable_lock_file_is_one_line(tmp_path: Path) -> None:
    dest = tmp_path / "recipes"
    shutil.copytree(RECIPES, dest)
    lock = dest / "debian-minimal.lock.json"
    lock.unlink()
    lock.mkdir()
    out = tmp_path / "out"
    proc = bootchain("build", dest / "debian-minimal.yaml", "--out", out, "--offline", check=False)
    assert_one_line_failure(proc, out, r"debian-minimal\.lock\.json: cannot read the lock file")


# Regression: an extra_db file that is no certificate failed with a line that did not name it.
def test_extra_db_that_is_no_certificate_names_the_file(recipe_copy: Path, tmp_path: Path) -> None:
    (recipe_copy.parent / "files" / "extra.crt").write_bytes(b"not a certificate\n")
    text = recipe_copy.read_text()
    recipe_copy.write_text(
        text.replace("secureboot:\n", "secureboot:\n  extra_db: [files/extra.crt]\n")
    )
    out = tmp_path / "out"
    proc = bootchain("build", recipe_copy, "--out", out, "--offline", check=False)
    assert_one_line_failure(proc, out, r"files/extra\.crt: not an X\.509 certificate")


# Regression: SIGTERM (CI timeouts, `timeout`, systemd) killed the build without unwinding, and
# the half-written staging folder stayed in the output folder.
def test_sigterm_leaves_nothing_in_the_output_folder(recipe_copy: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "builder.cli", "build", str(recipe_copy), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--offline"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/.*.partial")):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr, stderr
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_lock_verb_with_unreadable_lock_file_is_one_line(tmp_path: Path) -> None:
    dest = tmp_path / "recipes"
    shutil.copytree(RECIPES, dest)
    lock = dest / "debian-minimal.lock.json"
    lock.unlink()
    lock.mkdir()
    proc = bootchain("lock", dest / "debian-minimal.yaml", "--offline", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bootchain: error: {lock}: cannot read the lock file: Is a directory"
    ]


# Regression: the key set's db key was opened as the spec "file:<folder>/db.key", so a '?' in
# the folder name was taken for the start of options ("URI attribute without '='").
def test_key_set_folder_with_a_question_mark(recipe_copy: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys?2026"
    shutil.copytree(ROOT / "keys.example", keys)
    out = tmp_path / "out"
    env = {**os.environ, "BOOTCHAIN_CACHE": str(tmp_path / "empty-cache")}
    proc = bootchain(
        "build", recipe_copy, "--keys", keys, "--out", out, "--offline", check=False, env=env
    )
    # The keys were accepted: the build got as far as the (empty) package cache.
    assert_one_line_failure(proc, out, r"not in the cache .* and --offline was given")


# Regression: an --out that cannot hold folders (a file, a read-only folder) was a traceback.
def test_out_that_is_a_file_is_one_line(recipe_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("not a folder\n")
    proc = bootchain("build", recipe_copy, "--out", out, "--offline", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bootchain: error:")]
    assert errors == [
        f"bootchain: error: {out}/debian-minimal: cannot make the output folder: "
        "Not a directory (hint: choose another --out)"
    ]
    assert out.read_text() == "not a folder\n"


# Regression: `bootchain lock` in a read-only recipe folder was a PermissionError traceback.
def test_lock_verb_in_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    dest = tmp_path / "recipes"
    shutil.copytree(RECIPES, dest)
    (dest / "debian-minimal.lock.json").unlink()
    dest.chmod(0o555)
    argv = [sys.executable, "-m", "builder.cli", "lock", str(dest / "debian-minimal.yaml")]
    if os.geteuid() == 0:  # root writes anywhere: drop the capabilities that allow it
        caps = "-dac_override,-dac_read_search,-fowner"
        argv = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]
    try:
        proc = subprocess.run(
            [*argv, "--offline"], cwd=ROOT, capture_output=True, text=True, check=False
        )
    finally:
        dest.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"bootchain: error: {dest}/debian-minimal.lock.json: cannot write the lock file: "
        "Permission denied"
    ]
