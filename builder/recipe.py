"""Recipes: YAML rendered through a sandboxed jinja2, parsed safely, validated against a schema.

A recipe may ``extends:`` a base recipe (mappings merge key by key, everything else replaces)
and takes variables (``--set version=1.2.3``). Every error names the file, the line and the key.
Local paths are relative to the recipe that names them and may not escape its folder; the key
set (``secureboot.keys``) is not an image input and is resolved against the working directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import jinja2
import jinja2.sandbox
import yaml

from builder.errors import RecipeError
from builder.initrd import Compression
from builder.inputs import PackagePin

PACKAGE_ROLES = ("kernel", "systemd-boot", "busybox", "ovmf")
COMPRESSIONS = ("none", "gzip", "zstd")
DEFAULT_PLATFORM = "ovmf-2022.11-q35-secboot"
MAX_EXTENDS_DEPTH = 8

Where = tuple[Path, int]  # file, 1-based line
KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class InitrdFile:
    """A local file placed into the initramfs."""

    src: Path
    dst: str
    mode: int


@dataclass(frozen=True)
class Partition:
    """An extra GPT partition after the ESP."""

    name: str
    type_guid: str
    size_mib: int
    content: Path | None


@dataclass(frozen=True)
class DiskSpec:
    size_mib: int
    esp_size_mib: int
    partitions: tuple[Partition, ...]


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``data`` is the merged, rendered document as plain data."""

    path: Path
    files: tuple[Path, ...]
    name: str
    version: str
    source_date_epoch: int
    platform: str
    packages: Mapping[str, PackagePin]
    cmdline: str
    modules: tuple[str, ...]
    compression: Compression
    init_template: Path
    probe: bool
    initrd_files: tuple[InitrdFile, ...]
    osrel: Path | None
    splash: Path | None
    dtb: Path | None
    pcrpkey: Path | None
    keys: Path
    extra_db: tuple[Path, ...]
    dbx: tuple[str, ...]
    loader_timeout: int
    disk: DiskSpec
    variables: Mapping[str, str]
    data: Mapping[str, Any] = field(repr=False)
    digest: str = ""

    @property
    def local_inputs(self) -> dict[str, Path]:
        """Every local file the image is built from, keyed by a stable label."""
        found: dict[str, Path] = {"initrd.init": self.init_template}
        for item in self.initrd_files:
            found[f"initrd.files:{item.dst}"] = item.src
        for key in ("osrel", "splash", "dtb", "pcrpkey"):
            value = getattr(self, key)
            if value is not None:
                found[f"uki.{key}"] = value
        for part in self.disk.partitions:
            if part.content is not None:
                found[f"disk.partitions:{part.name}"] = part.content
        for i, cert in enumerate(self.extra_db):
            found[f"secureboot.extra_db:{i}"] = cert
        return found

    @property
    def locked_files(self) -> dict[str, Path]:
        """The recipe, its bases and its local inputs, keyed by path relative to the recipe."""
        base = self.path.parent
        paths = [*self.files, *self.local_inputs.values()]
        return {p.relative_to(base).as_posix(): p for p in paths}

    @property
    def lock_file(self) -> Path:
        """``recipes/<name>.yaml`` -> ``recipes/<name>.lock.json``."""
        return self.path.with_name(f"{self.path.name.removesuffix('.yaml')}.lock.json")

    @property
    def uki_filename(self) -> str:
        return f"{self.name}-{self.version}.efi"


# --------------------------------------------------------------------------- rendering


class _NoIncludes(jinja2.BaseLoader):
    """Refuses ``include``/``import``/``extends``: a file read that way would be an input that
    neither the recipe digest nor the lock covers."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        raise jinja2.exceptions.TemplateNotFound(
            template,
            f"{template!r}: templates may not include other files; name every local input "
            "in the recipe",
        )


def _make_env() -> jinja2.sandbox.SandboxedEnvironment:
    env = jinja2.sandbox.SandboxedEnvironment(
        loader=_NoIncludes(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    # Random values must not reach an output: drop jinja's random text and random choice.
    env.globals.pop("lipsum", None)
    env.filters.pop("random", None)
    return env


def _template_line(exc: BaseException, name: str) -> int | None:
    line = getattr(exc, "lineno", None)
    if isinstance(line, int):
        return line
    found = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename.endswith(name):
            found = lineno
    return found


def render_template(path: Path, context: Mapping[str, Any]) -> str:
    """Render one file through the sandbox. Errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read: {exc}") from None
    env = _make_env()
    try:
        return env.from_string(text).render(**context)
    except jinja2.exceptions.SecurityError as exc:
        line = _template_line(exc, "<template>")
        raise RecipeError(
            f"{path}:{line or '?'}: template tried an unsafe operation: {exc}",
            hint="recipes may only use plain values, filters and tests",
        ) from None
    except jinja2.exceptions.UndefinedError as exc:
        line = _template_line(exc, "<template>")
        raise RecipeError(
            f"{path}:{line or '?'}: undefined variable: {exc.message}",
            hint="pass it with --set NAME=VALUE or give a default: {{ x | default('v') }}",
        ) from None
    except jinja2.exceptions.TemplateError as exc:
        line = _template_line(exc, "<template>")
        raise RecipeError(f"{path}:{line or '?'}: template error: {exc}") from None
    except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as exc:
        # Raised by the template's own expressions ({{ 1/0 }}, {{ "a" + 1 }}): the recipe's
        # fault, not ours.
        line = _template_line(exc, "<template>")
        raise RecipeError(
            f"{path}:{line or '?'}: template error: {type(exc).__name__}: {exc}"
        ) from None


# --------------------------------------------------------------------------- YAML with marks


class _Loader(yaml.SafeLoader):
    """Safe YAML that also refuses duplicate keys."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _marks(node: yaml.Node, file: Path, prefix: KeyPath, out: dict[KeyPath, Where]) -> None:
    out[prefix] = (file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            out[(*prefix, key)] = (file, key_node.start_mark.line + 1)
            _marks(value_node, file, (*prefix, key), out)
            out[(*prefix, key)] = (file, key_node.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _marks(item, file, (*prefix, i), out)


def _parse_yaml(text: str, file: Path) -> tuple[dict[str, Any], dict[KeyPath, Where]]:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else "?"
        raise RecipeError(f"{file}:{line}: invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{file}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or node is None:
        raise RecipeError(f"{file}:1: a recipe must be a mapping of keys")
    marks: dict[KeyPath, Where] = {}
    _marks(node, file, (), marks)
    return data, marks


# --------------------------------------------------------------------------- schema

_PIN_KEYS = {"name", "version", "sha256"}
_SCHEMA: dict[str, Any] = {
    "extends": str,
    "name": str,
    "version": str,
    "source_date_epoch": int,
    "platform": str,
    "packages": {role: dict for role in PACKAGE_ROLES},
    "kernel": {"cmdline": str, "modules": list},
    "initrd": {"compression": str, "init": Path, "probe": bool, "files": list},
    "uki": {"osrel": Path, "splash": Path, "dtb": Path, "pcrpkey": Path},
    "loader": {"timeout": int},
    "secureboot": {"keys": str, "extra_db": list, "dbx": list},
    "disk": {"size_mib": int, "esp_size_mib": int, "partitions": list},
}
_REQUIRED: tuple[KeyPath, ...] = (
    ("name",),
    ("version",),
    ("source_date_epoch",),
    ("packages",),
    *(("packages", role) for role in PACKAGE_ROLES),
    ("kernel",),
    ("kernel", "cmdline"),
    ("initrd", "init"),
    ("secureboot", "keys"),
)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+~_-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1
_DEB_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+~:-]*$")  # Debian policy 5.6.12
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_GUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-([0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$")
_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
    Path: "a file path",
}


class _Checker:
    """Validates the merged document; every error names file, line and key."""

    def __init__(self, recipe_path: Path, marks: Mapping[KeyPath, Where]) -> None:
        self.recipe_path = recipe_path
        self.marks = marks

    def where(self, key: KeyPath) -> str:
        probe = key
        while probe not in self.marks and probe:
            probe = probe[:-1]
        file, line = self.marks.get(probe, (self.recipe_path, 1))
        return f"{file}:{line}"

    def fail(self, key: KeyPath, message: str, hint: str | None = None) -> RecipeError:
        dotted = ".".join(str(k) for k in key) or "(top level)"
        return RecipeError(f"{self.where(key)}: {dotted}: {message}", hint=hint)

    def check_shape(self, data: Any, schema: Any, key: KeyPath) -> None:
        if isinstance(schema, dict):
            if not isinstance(data, dict):
                raise self.fail(key, f"expected a mapping, got {type(data).__name__}")
            for k, v in data.items():
                if k not in schema:
                    allowed = ", ".join(sorted(schema))
                    raise self.fail((*key, k), "unknown key", hint=f"allowed here: {allowed}")
                self.check_shape(v, schema[k], (*key, k))
            return
        # bool is an int in Python: refuse it where an int is wanted
        wrong = not isinstance(data, schema) or (schema is int and isinstance(data, bool))
        if wrong:
            raise self.fail(key, f"expected {_TYPE_NAMES[schema]}, got {data!r}")

    def require(self, data: Mapping[str, Any]) -> None:
        for key in _REQUIRED:
            node: Any = data
            for part in key:
                if not isinstance(node, dict) or part not in node:
                    raise self.fail(key[:-1], f"missing required key {key[-1]!r}")
                node = node[part]

    def pattern(self, value: str, regex: re.Pattern[str], key: KeyPath, what: str) -> str:
        if not regex.match(value):
            raise self.fail(key, f"{value!r} is not {what}")
        return value


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- loading


@dataclass
class _Layer:
    file: Path
    data: dict[str, Any]
    marks: dict[KeyPath, Where]


def _load_layers(path: Path, variables: Mapping[str, str]) -> list[_Layer]:
    layers: list[_Layer] = []
    seen: set[Path] = set()
    current = path
    while True:
        if current in seen or len(layers) >= MAX_EXTENDS_DEPTH:
            raise RecipeError(
                f"{current}: extends chain loops or is deeper than {MAX_EXTENDS_DEPTH}"
            )
        seen.add(current)
        text = render_template(current, variables)
        data, marks = _parse_yaml(text, current)
        _resolve_paths(data, marks, current)
        layers.append(_Layer(current, data, marks))
        base = data.pop("extends", None)
        if base is None:
            break
        if not isinstance(base, str):
            file, line = marks[("extends",)]
            raise RecipeError(f"{file}:{line}: extends: expected a file name")
        current = _contained(current.parent, base, marks[("extends",)], "extends")
    layers.reverse()  # base first
    return layers


def _contained(folder: Path, rel: str, where: Where, key: str) -> Path:
    """``folder/rel`` resolved, refusing absolute paths and escapes from ``folder``."""
    file, line = where
    candidate = Path(rel)
    if candidate.is_absolute():
        raise RecipeError(f"{file}:{line}: {key}: {rel!r} must be relative to the recipe")
    resolved = (folder / candidate).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise RecipeError(
            f"{file}:{line}: {key}: {rel!r} escapes the recipe folder {folder}",
            hint="keep local inputs inside the recipe's folder",
        )
    if not resolved.is_file():
        raise RecipeError(f"{file}:{line}: {key}: {rel!r}: no such file")
    try:
        with resolved.open("rb"):
            pass
    except OSError as exc:
        raise RecipeError(f"{file}:{line}: {key}: {rel!r}: cannot read: {exc.strerror}") from None
    return resolved


_PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("initrd", "init"),
    ("uki", "osrel"),
    ("uki", "splash"),
    ("uki", "dtb"),
    ("uki", "pcrpkey"),
)


def _resolve_paths(data: dict[str, Any], marks: Mapping[KeyPath, Where], file: Path) -> None:
    """Turn every local path of one layer into an absolute, contained Path."""

    def fix(container: Any, key: str | int, keypath: KeyPath) -> None:
        value = container[key]
        if isinstance(value, str):
            where = marks.get(keypath, (file, 1))
            container[key] = _contained(file.parent, value, where, ".".join(map(str, keypath)))

    for keypath in _PATH_KEYS:
        section = data.get(keypath[0])
        if isinstance(section, dict) and keypath[1] in section:
            fix(section, keypath[1], keypath)
    initrd = data.get("initrd")
    if isinstance(initrd, dict) and isinstance(initrd.get("files"), list):
        for i, item in enumerate(initrd["files"]):
            if isinstance(item, dict) and "src" in item:
                fix(item, "src", ("initrd", "files", i, "src"))
    sb = data.get("secureboot")
    if isinstance(sb, dict) and isinstance(sb.get("extra_db"), list):
        for i in range(len(sb["extra_db"])):
            fix(sb["extra_db"], i, ("secureboot", "extra_db", i))
    disk = data.get("disk")
    if isinstance(disk, dict) and isinstance(disk.get("partitions"), list):
        for i, item in enumerate(disk["partitions"]):
            if isinstance(item, dict) and "content" in item:
                fix(item, "content", ("disk", "partitions", i, "content"))


def _plain(value: Any, root: Path) -> Any:
    """The document as JSON-able data, local paths relative to the recipe folder."""
    if isinstance(value, dict):
        return {k: _plain(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, root) for v in value]
    if isinstance(value, Path):
        return {"path": value.relative_to(root).as_posix(), "sha256": _sha256(value)}
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_variables(pairs: Sequence[str]) -> dict[str, str]:
    """``NAME=VALUE`` strings from ``--set`` into a mapping."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise RecipeError(f"--set {pair!r}: expected NAME=VALUE")
        out[name] = value
    return out


def load_recipe(path: Path, variables: Mapping[str, str] | None = None) -> Recipe:
    """Render, parse, merge and validate a recipe and its bases."""
    variables = dict(variables or {})
    path = path.resolve()
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    layers = _load_layers(path, variables)
    merged: dict[str, Any] = {}
    marks: dict[KeyPath, Where] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer.data)
        marks.update(layer.marks)
    check = _Checker(path, marks)
    check.check_shape(merged, _SCHEMA, ())
    check.require(merged)
    return _build(path, tuple(layer.file for layer in layers), merged, check, variables)


def _build(
    path: Path,
    files: tuple[Path, ...],
    d: dict[str, Any],
    check: _Checker,
    variables: Mapping[str, str],
) -> Recipe:
    name = check.pattern(d["name"], _NAME_RE, ("name",), "a lower-case name")
    version = check.pattern(d["version"], _VERSION_RE, ("version",), "a version")
    sde = d["source_date_epoch"]
    if not 315532800 <= sde < 2**32:  # FAT timestamps start in 1980
        raise check.fail(("source_date_epoch",), f"{sde} is outside 1980..2106")

    packages: dict[str, PackagePin] = {}
    for role in PACKAGE_ROLES:
        pin = d["packages"][role]
        key: KeyPath = ("packages", role)
        missing = _PIN_KEYS - set(pin)
        extra = set(pin) - _PIN_KEYS
        if extra:
            raise check.fail(
                (*key, sorted(extra, key=str)[0]),
                "unknown key",
                hint="a pin has name, version and sha256",
            )
        if missing:
            raise check.fail(key, f"missing {', '.join(sorted(missing))}")
        for k in _PIN_KEYS:
            check.check_shape(pin[k], str, (*key, k))
        check.pattern(pin["sha256"], _SHA256_RE, (*key, "sha256"), "a lower-case sha256 hex")
        # Both go on apt's command line: a leading '-' would be read as an option.
        check.pattern(pin["name"], _PACKAGE_RE, (*key, "name"), "a Debian package name")
        check.pattern(pin["version"], _DEB_VERSION_RE, (*key, "version"), "a Debian version")
        packages[role] = PackagePin(pin["name"], pin["version"], pin["sha256"])

    kernel = d["kernel"]
    cmdline = kernel["cmdline"]
    if "\n" in cmdline or "\x00" in cmdline:
        raise check.fail(("kernel", "cmdline"), "must be one line")
    modules = tuple(kernel.get("modules", []))
    for i, mod in enumerate(modules):
        if not isinstance(mod, str) or not _MODULE_RE.match(mod):
            raise check.fail(("kernel", "modules", i), f"{mod!r} is not a module name")

    initrd = d.get("initrd", {})
    compression = initrd.get("compression", "zstd")
    if compression not in COMPRESSIONS:
        raise check.fail(
            ("initrd", "compression"), f"{compression!r} is not one of {', '.join(COMPRESSIONS)}"
        )
    init_files = []
    for i, item in enumerate(initrd.get("files", [])):
        key = ("initrd", "files", i)
        check.check_shape(item, {"src": Path, "dst": str, "mode": int}, key)
        if "src" not in item or "dst" not in item:
            raise check.fail(key, "a file needs src and dst")
        dst = item["dst"]
        if not dst.startswith("/") or ".." in dst.split("/") or dst == "/init":
            raise check.fail(
                (*key, "dst"),
                f"{dst!r} must be an absolute path in the initrd, without .. and not /init",
            )
        mode = item.get("mode", 0o644)
        if not 0 <= mode <= 0o7777:
            raise check.fail((*key, "mode"), f"{mode} is not a file mode")
        init_files.append(InitrdFile(item["src"], dst, mode))

    uki = d.get("uki", {})
    sb = d["secureboot"]
    for i, cert in enumerate(sb.get("extra_db", [])):
        check.check_shape(cert, Path, ("secureboot", "extra_db", i))
    dbx = tuple(sb.get("dbx", []))
    for i, entry in enumerate(dbx):
        if not isinstance(entry, str) or not _SHA256_RE.match(entry):
            raise check.fail(("secureboot", "dbx", i), f"{entry!r} is not a sha256 hex")

    disk = d.get("disk", {})
    parts = []
    for i, item in enumerate(disk.get("partitions", [])):
        key = ("disk", "partitions", i)
        check.check_shape(item, {"name": str, "type": str, "size_mib": int, "content": Path}, key)
        if not {"name", "type", "size_mib"} <= set(item):
            raise check.fail(key, "a partition needs name, type and size_mib")
        check.pattern(item["type"], _GUID_RE, (*key, "type"), "a GPT type GUID")
        parts.append(
            Partition(item["name"], item["type"].lower(), item["size_mib"], item.get("content"))
        )
    disk_spec = DiskSpec(disk.get("size_mib", 256), disk.get("esp_size_mib", 200), tuple(parts))
    if disk_spec.esp_size_mib < 33:
        raise check.fail(("disk", "esp_size_mib"), "FAT32 needs at least 33 MiB")
    needed = disk_spec.esp_size_mib + sum(p.size_mib for p in parts) + 2
    if disk_spec.size_mib < needed:
        raise check.fail(
            ("disk", "size_mib"),
            f"{disk_spec.size_mib} MiB cannot hold the partitions ({needed} MiB needed)",
        )

    root = path.parent
    plain = _plain(d, root)
    # The key set folder is a place on this host (relative to the working folder), not an
    # image input: its path must not reach the digest or build.json. The keys themselves are
    # recorded by fingerprint.
    plain["secureboot"] = {k: v for k, v in plain["secureboot"].items() if k != "keys"}
    recipe_digest = hashlib.sha256(
        json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return Recipe(
        path=path,
        files=files,
        name=name,
        version=version,
        source_date_epoch=sde,
        platform=d.get("platform", DEFAULT_PLATFORM),
        packages=packages,
        cmdline=cmdline,
        modules=modules,
        compression=cast(Compression, compression),
        init_template=initrd["init"],
        probe=initrd.get("probe", True),
        initrd_files=tuple(init_files),
        osrel=uki.get("osrel"),
        splash=uki.get("splash"),
        dtb=uki.get("dtb"),
        pcrpkey=uki.get("pcrpkey"),
        keys=Path(sb["keys"]),
        extra_db=tuple(sb.get("extra_db", [])),
        dbx=dbx,
        loader_timeout=d.get("loader", {}).get("timeout", 0),
        disk=disk_spec,
        variables=dict(variables),
        data=plain,
        digest=recipe_digest,
    )
