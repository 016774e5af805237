"""The build: a recipe becomes signed artifacts, a disk image and golden measurements.

Read it as a script of named stages, one call each (mkosi's ``build_image`` is the model):

    load recipe -> load keys -> fetch inputs -> make initrd -> make UKI -> sign -> make disk
    -> make varstore -> predict PCRs -> write build.json

Everything is written into a staging folder beside ``out/<name>/<version>/`` that replaces it
only when every stage succeeded, with ``build.json`` written last: a failed build leaves the
output folder as it was, never half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from builder import __version__
from builder.disk import DiskLayout, gpt_event_data, make_disk
from builder.disk import Partition as DiskPartition
from builder.errors import InputFileError, PinError, UserInputError
from builder.fsutil import sha256_file, staging_dir, write_atomic
from builder.initrd import CpioEntry, make_initrd
from builder.inputs import DebPackage, Lock, check_lock, fetch_package, read_deb
from builder.measure.chain import load_chain
from builder.measure.platform import load_platform
from builder.measure.predict import predict, write_measurements
from builder.pe import authenticode_digest, is_signed
from builder.recipe import Recipe, load_recipe, render_template
from builder.secureboot.authenticode import sign_pe
from builder.secureboot.keys import KeySet, load_keyset
from builder.secureboot.signer import Signer
from builder.secureboot.signers import FileSigner, load_certificate, open_signer
from builder.secureboot.varstore import make_varstore
from builder.uki import UKISection, make_uki

log = logging.getLogger(__name__)

SCHEMA = "bootchain.build/v1"
STUB_PATH = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
BOOTLOADER_PATH = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
PROBE = Path(__file__).resolve().parent.parent / "qemu" / "probe" / "probe.sh"
ESP_BOOTLOADER = "EFI/BOOT/BOOTX64.EFI"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    outdir: Path
    recipe: Recipe
    artifacts: tuple[dict[str, Any], ...]


@dataclass
class _Context:
    """What the stages hand each other. Only pipeline.py sees it."""

    recipe: Recipe
    keyset: KeySet
    signer: Signer
    offline: bool
    stage: Path
    packages: dict[str, DebPackage]
    outputs: dict[str, Path]
    artifacts: list[dict[str, Any]]
    lock: Lock | None = None


def build(
    recipe_path: Path,
    *,
    variables: Mapping[str, str] | None = None,
    out_root: Path = Path("out"),
    keys: Path | None = None,
    signer_spec: str | None = None,
    offline: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build ``recipe_path`` into ``out_root/<name>/<version>/`` and return what was made."""
    say = progress or (lambda _msg: None)
    say("load recipe")
    recipe = load_recipe(recipe_path, variables)
    say("check lock")
    lock = check_recipe_lock(recipe)
    keyset = load_keys(recipe, keys)
    # The key set's own db key is opened directly: as a file: spec, a '?' in its folder name
    # would be read as the start of options.
    db = keyset.paths["db"]
    signer = open_signer(signer_spec, db.crt) if signer_spec else FileSigner(db.key, db.crt)
    check_signer(signer, keyset)
    outdir = out_root / recipe.name / recipe.version
    staging = contextlib.ExitStack()
    try:
        stage = staging.enter_context(staging_dir(outdir))
    except OSError as exc:  # --out is a file, read-only, ...
        raise UserInputError(
            f"{exc.filename or outdir}: cannot make the output folder: {exc.strerror}",
            hint="choose another --out",
        ) from None
    with staging:
        stage.chmod(0o755)  # mkdtemp makes it 0700; the build is for others to read
        ctx = _Context(recipe, keyset, signer, offline, stage, {}, {}, [], lock)
        _stage(say, "fetch inputs", fetch_inputs, ctx)
        _stage(say, "make initrd", make_initrd_stage, ctx)
        _stage(say, "make UKI", make_uki_stage, ctx)
        _stage(say, "sign", sign_stage, ctx)
        _stage(say, "make disk", make_disk_stage, ctx)
        _stage(say, "make varstore", make_varstore_stage, ctx)
        _stage(say, "predict PCRs", predict_stage, ctx)
        _stage(say, "write build.json", write_build_json, ctx)
    return BuildResult(outdir=outdir, recipe=recipe, artifacts=tuple(ctx.artifacts))


def _stage(say: Progress, name: str, fn: Callable[[_Context], None], ctx: _Context) -> None:
    say(name)
    started = time.monotonic()
    fn(ctx)
    log.info("%s: %.2f s", name, time.monotonic() - started)


# --------------------------------------------------------------------------- stages


def check_recipe_lock(recipe: Recipe) -> Lock | None:
    """When the recipe has a lock file, it must match the pins and local files exactly."""
    path = recipe.lock_file
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the lock file: {exc.strerror}") from None
    lock = Lock.from_json(data, str(path))
    try:
        check_lock(lock, recipe.packages, recipe.locked_files)
    except PinError as exc:
        raise PinError(f"{path}: {exc.message}", hint=exc.hint) from None
    return lock


def load_keys(recipe: Recipe, override: Path | None) -> KeySet:
    """The recipe's key set (or ``--keys``), validated."""
    return load_keyset(override if override is not None else recipe.keys)


def check_signer(signer: Signer, keyset: KeySet) -> None:
    """The signer must sign with the key set's db certificate, or nothing would boot."""
    if signer.certificate != keyset.db:
        raise UserInputError(
            f"signer {signer.description} does not hold the db certificate of key set "
            f"{keyset.directory}",
            hint="sign with the db key of the recipe's key set",
        )


# The parts of each package a build reads; the rest is never decompressed.
PACKAGE_PARTS: dict[str, tuple[str, ...]] = {
    "kernel": ("boot/vmlinuz-", "lib/modules/"),
    "systemd-boot": ("usr/lib/systemd/boot/efi/",),
    "busybox": ("bin/busybox",),
    "ovmf": ("usr/share/OVMF/",),
}


def fetch_inputs(ctx: _Context) -> None:
    """Download (or take from the cache) every pinned package and unpack it in memory."""
    for role, pin in sorted(ctx.recipe.packages.items()):
        path = fetch_package(pin, offline=ctx.offline)
        ctx.packages[role] = read_deb(path, pin, select=_starts_with(PACKAGE_PARTS[role]))


def _starts_with(prefixes: tuple[str, ...]) -> Callable[[str], bool]:
    def select(path: str) -> bool:
        return path.startswith(prefixes)

    return select


def kernel_release(kernel: DebPackage) -> str:
    """The release string of the one kernel in the package (``6.1.0-56-amd64``)."""
    releases = sorted(
        {
            p.split("/")[2]
            for p in kernel.members
            if p.startswith("lib/modules/") and p.count("/") >= 3
        }
    )
    if len(releases) != 1:
        raise InputFileError(
            f"kernel package {kernel.name} {kernel.version}: expected one release under "
            f"lib/modules/, found {releases or 'none'}"
        )
    return releases[0]


def _member(package: DebPackage, path: str) -> bytes:
    member = package.members.get(path)
    if member is None or member.kind != "file":
        raise InputFileError(f"package {package.name} {package.version} has no file {path}")
    return member.data


def make_initrd_stage(ctx: _Context) -> None:
    recipe = ctx.recipe
    init = render_template(
        recipe.init_template,
        {
            "name": recipe.name,
            "version": recipe.version,
            "cmdline": recipe.cmdline,
            "modules": list(recipe.modules),
        },
    )
    extra = [
        CpioEntry.file(item.dst.lstrip("/"), item.src.read_bytes(), item.mode)
        for item in recipe.initrd_files
    ]
    if recipe.probe:
        extra.append(CpioEntry.file("bootchain/probe.sh", PROBE.read_bytes(), 0o755))
    kernel = ctx.packages["kernel"]
    data = make_initrd(
        busybox_members=ctx.packages["busybox"].members,
        kernel_members=kernel.members,
        kernel_release=kernel_release(kernel),
        modules=recipe.modules,
        init_script=init.encode(),
        extra_files=extra,
        compression=recipe.compression,
        source_date_epoch=recipe.source_date_epoch,
    )
    _write(ctx, "initrd.img", data)


def _osrel(recipe: Recipe) -> bytes:
    base = recipe.osrel.read_bytes() if recipe.osrel else b""
    if base and not base.endswith(b"\n"):
        base += b"\n"
    # The image's identity is appended so each build says what it is.
    return base + f'IMAGE_ID={recipe.name}\nIMAGE_VERSION="{recipe.version}"\n'.encode()


def make_uki_stage(ctx: _Context) -> None:
    recipe = ctx.recipe
    kernel = ctx.packages["kernel"]
    linux = _member(kernel, f"boot/vmlinuz-{kernel_release(kernel)}")
    stub = _member(ctx.packages["systemd-boot"], STUB_PATH)
    sections = [
        UKISection(".osrel", _osrel(recipe), measure=True),
        UKISection(".cmdline", recipe.cmdline.encode(), measure=True),
    ]
    for name, path in ((".splash", recipe.splash), (".dtb", recipe.dtb)):
        if path is not None:
            sections.append(UKISection(name, path.read_bytes(), measure=True))
    if recipe.pcrpkey is not None:
        sections.append(UKISection(".pcrpkey", recipe.pcrpkey.read_bytes(), measure=True))
    # As ukify does: .initrd, then .linux last.
    sections += [
        UKISection(".initrd", ctx.outputs["initrd.img"].read_bytes(), measure=True),
        UKISection(".linux", linux, measure=True),
    ]
    try:
        uki = make_uki(stub, sections, recipe.source_date_epoch)
    except InputFileError as exc:
        sources = (
            f"{STUB_PATH} of {ctx.packages['systemd-boot'].name} "
            f"{ctx.packages['systemd-boot'].version}, boot/vmlinuz-{kernel_release(kernel)} of "
            f"{kernel.name} {kernel.version}"
        )
        raise InputFileError(f"{exc.message} (from {sources})", hint=exc.hint) from None
    _write(ctx, recipe.uki_filename, uki)


def sign_stage(ctx: _Context) -> None:
    """Authenticode-sign systemd-boot and the UKI with the db key."""
    loader = _member(ctx.packages["systemd-boot"], BOOTLOADER_PATH)
    if is_signed(loader):
        raise InputFileError(
            f"{BOOTLOADER_PATH} from {ctx.packages['systemd-boot'].name} is "
            "already signed; bootchain signs it with your db key"
        )
    _write(ctx, "BOOTX64.EFI", sign_pe(loader, ctx.signer))
    uki = ctx.outputs[ctx.recipe.uki_filename]
    _write(ctx, ctx.recipe.uki_filename, sign_pe(uki.read_bytes(), ctx.signer))
    for name in ("PK", "KEK", "db"):
        # PEM made from the checked DER: nothing else in the .crt file (a private key in a
        # combined PEM, bag attributes) can reach the output.
        cert = x509.load_der_x509_certificate(ctx.keyset.certificate(name))
        _write(ctx, f"keys/{name}.crt", cert.public_bytes(serialization.Encoding.PEM))


def loader_conf(recipe: Recipe) -> bytes:
    """systemd-boot's loader.conf: boot the one UKI, no menu, no editing of the command line."""
    return (f"timeout {recipe.loader_timeout}\ndefault {recipe.uki_filename}\neditor no\n").encode()


def esp_files(ctx: _Context) -> dict[str, bytes]:
    return {
        ESP_BOOTLOADER: ctx.outputs["BOOTX64.EFI"].read_bytes(),
        f"EFI/Linux/{ctx.recipe.uki_filename}": ctx.outputs[ctx.recipe.uki_filename].read_bytes(),
        "loader/loader.conf": loader_conf(ctx.recipe),
    }


def disk_seed(recipe: Recipe) -> bytes:
    """What the disk and partition GUIDs and the FAT volume id derive from.

    The image name and the disk layout only: the GPT is measured into PCR 5, and a new command
    line, kernel or version must not move PCR 5 (fleet policies can keep it across releases).
    """
    layout = json.dumps(
        {"name": recipe.name, "disk": recipe.data.get("disk", {})}, sort_keys=True
    ).encode()
    return hashlib.sha256(b"bootchain disk\0" + layout).digest()


def make_disk_stage(ctx: _Context) -> None:
    recipe = ctx.recipe
    layout = DiskLayout(
        size_mib=recipe.disk.size_mib,
        esp_size_mib=recipe.disk.esp_size_mib,
        partitions=tuple(
            DiskPartition(
                name=p.name,
                type_guid=uuid.UUID(p.type_guid),
                size_mib=p.size_mib,
                content=p.content.read_bytes() if p.content else None,
            )
            for p in recipe.disk.partitions
        ),
    )
    path = ctx.stage / "disk.img"
    make_disk(
        path,
        layout,
        esp_files(ctx),
        seed=disk_seed(recipe),
        source_date_epoch=recipe.source_date_epoch,
    )
    ctx.outputs["disk.img"] = path


def make_varstore_stage(ctx: _Context) -> None:
    platform_ref = load_platform(ctx.recipe.platform)
    if platform_ref.machine is None:
        raise UserInputError(
            f"platform {platform_ref.name} has no machine definition to take the varstore from"
        )
    template = _member(ctx.packages["ovmf"], platform_ref.machine.firmware_vars_template)
    data = make_varstore(
        template,
        ctx.keyset,
        extra_db=tuple(
            load_certificate(p).public_bytes(serialization.Encoding.DER)
            for p in ctx.recipe.extra_db
        ),
        dbx_sha256=tuple(bytes.fromhex(h) for h in ctx.recipe.dbx),
        source_date_epoch=ctx.recipe.source_date_epoch,
    )
    _write(ctx, "ovmf-vars.fd", data)


def predict_stage(ctx: _Context) -> None:
    recipe = ctx.recipe
    platform_ref = load_platform(recipe.platform)
    measurements = predict(
        platform=platform_ref,
        chain=load_chain(platform_ref.chain),
        bootloader=ctx.outputs["BOOTX64.EFI"].read_bytes(),
        uki=ctx.outputs[recipe.uki_filename].read_bytes(),
        uki_path_on_esp=f"\\EFI\\Linux\\{recipe.uki_filename}",
        gpt_event_data=gpt_event_data(ctx.outputs["disk.img"]),
        varstore=ctx.outputs["ovmf-vars.fd"].read_bytes(),
        db_cert=ctx.keyset.db,
        loader_cmdline=recipe.cmdline,
    )
    path = ctx.stage / "measurements.json"
    write_measurements(path, measurements)
    ctx.outputs["measurements.json"] = path


# --------------------------------------------------------------------------- build.json


def _library_versions() -> dict[str, str]:
    names = (
        "cryptography",
        "pefile",
        "asn1crypto",
        "virt-firmware",
        "zstandard",
        "jinja2",
        "PyYAML",
    )
    out = {"bootchain": __version__, "python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _artifact_records(ctx: _Context) -> list[dict[str, Any]]:
    records = []
    for name in sorted(ctx.outputs):
        path = ctx.outputs[name]
        record: dict[str, Any] = {
            "name": name,
            "path": name,
            "size": path.stat().st_size,
            "sha256": sha256_file(path),
        }
        if name.endswith(".efi") or name.endswith(".EFI"):
            record["authenticode_sha256"] = authenticode_digest(path.read_bytes()).hex()
        records.append(record)
    return records


def write_build_json(ctx: _Context) -> None:
    """Record inputs, tools and artifacts. Written last: its presence means a whole build."""
    recipe = ctx.recipe
    inputs: list[dict[str, Any]] = [
        {
            "role": role,
            "name": pin.name,
            "version": pin.version,
            "sha256": pin.sha256,
            "source": f"debian:{pin.name}={pin.version}",
        }
        for role, pin in sorted(recipe.packages.items())
    ]
    root = recipe.path.parent
    inputs += [
        {"role": label, "path": path.relative_to(root).as_posix(), "sha256": sha256_file(path)}
        for label, path in sorted(recipe.local_inputs.items())
    ]
    if recipe.probe:
        inputs.append(
            {"role": "initrd.probe", "path": "qemu/probe/probe.sh", "sha256": sha256_file(PROBE)}
        )
    db = ctx.keyset.db
    ctx.artifacts = _artifact_records(ctx)
    doc = {
        "schema": SCHEMA,
        "name": recipe.name,
        "version": recipe.version,
        "recipe": {
            "file": recipe.path.name,
            "digest": recipe.digest,
            "variables": dict(sorted(recipe.variables.items())),
            "document": recipe.data,
            "lock": ctx.lock.to_dict() if ctx.lock else None,
        },
        "source_date_epoch": recipe.source_date_epoch,
        "platform": recipe.platform,
        "inputs": inputs,
        "tools": _library_versions(),
        "signer": {
            "certificate_sha256": hashlib.sha256(db).hexdigest(),
            "subject": x509.load_der_x509_certificate(db).subject.rfc4514_string(),
            "example_keys": ctx.keyset.example,
            "keyset": dict(ctx.keyset.fingerprints),
        },
        "artifacts": ctx.artifacts,
    }
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    write_atomic(ctx.stage / "build.json", text.encode())


def _write(ctx: _Context, name: str, data: bytes) -> None:
    path = ctx.stage / name
    write_atomic(path, data)
    ctx.outputs[name] = path
