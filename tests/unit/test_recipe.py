"""Recipe loading: rendering, extends, variables, and one clear line for each bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import RecipeError
from builder.recipe import load_recipe, parse_variables, render_template

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    """A copy of the shipped recipes folder that a test may edit."""
    dest = tmp_path / "recipes"
    shutil.copytree(RECIPES, dest)
    return dest


def test_default_recipe_loads() -> None:
    recipe = load_recipe(RECIPES / "debian-minimal.yaml")
    assert recipe.name == "debian-minimal"
    assert recipe.version == "1.0.0"
    assert recipe.packages["kernel"].name.startswith("linux-image-6.1.0-")
    assert recipe.uki_filename == "debian-minimal-1.0.0.efi"


def test_extends_merges_and_overrides() -> None:
    base = load_recipe(RECIPES / "debian-minimal.yaml")
    child = load_recipe(RECIPES / "debian-console.yaml")
    assert child.packages == base.packages
    assert child.cmdline != base.cmdline
    assert [f.dst for f in child.initrd_files] == ["/etc/motd"]
    assert child.files == (RECIPES / "debian-minimal.yaml", RECIPES / "debian-console.yaml")


def test_variables_change_the_digest() -> None:
    one = load_recipe(RECIPES / "debian-minimal.yaml")
    two = load_recipe(RECIPES / "debian-minimal.yaml", {"version": "2.0.0"})
    assert two.version == "2.0.0"
    assert one.digest != two.digest


def test_digest_does_not_depend_on_the_folder(recipes: Path) -> None:
    assert (
        load_recipe(recipes / "debian-console.yaml").digest
        == load_recipe(RECIPES / "debian-console.yaml").digest
    )


def test_digest_covers_local_file_contents(recipes: Path) -> None:
    before = load_recipe(recipes / "debian-console.yaml").digest
    (recipes / "files" / "motd").write_text("changed\n")
    assert load_recipe(recipes / "debian-console.yaml").digest != before


SHA = "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744"

# case: (text in debian-minimal.yaml, what replaces it, the one line expected)
BAD = {
    "malformed-yaml": (
        "name: debian-minimal",
        "name: [unclosed",
        r"debian-minimal\.yaml:\d+: invalid YAML",
    ),
    "unknown-key": (
        "platform:",
        "colour: blue\nplatform:",
        r"debian-minimal\.yaml:8: colour: unknown key",
    ),
    "unknown-nested-key": (
        "  modules:",
        "  modulez:",
        r"debian-minimal\.yaml:\d+: kernel\.modulez: unknown key",
    ),
    "undefined-variable": (
        "'1.0.0'",
        "nope",
        r"debian-minimal\.yaml:5: undefined variable: 'nope' is undefined",
    ),
    "python-internals": (
        "version | default('1.0.0')",
        "''.__class__.__mro__[1].__subclasses__()",
        r"debian-minimal\.yaml:5: template tried an unsafe operation",
    ),
    "path-escape": (
        "files/os-release",
        "../../etc/passwd",
        r"debian-minimal\.yaml:\d+: uki\.osrel: '\.\./\.\./etc/passwd' escapes the recipe folder",
    ),
    "absolute-path": (
        "files/os-release",
        "/etc/os-release",
        r"uki\.osrel: '/etc/os-release' must be relative",
    ),
    "bad-sha256": (
        SHA,
        "XYZ",
        r"debian-minimal\.yaml:\d+: packages\.busybox\.sha256: 'XYZ' is not a lower-case",
    ),
    "wrong-type": (
        "1735689600",
        "soon",
        r"debian-minimal\.yaml:7: source_date_epoch: expected an integer",
    ),
    "duplicate-key": (
        "platform:",
        "name: again\nplatform:",
        r"debian-minimal\.yaml:8: invalid YAML: duplicate key 'name'",
    ),
    "bad-compression": (
        "compression: zstd",
        "compression: lz4",
        r"initrd\.compression: 'lz4' is not one of none, gzip, zstd",
    ),
    "missing-file": ("files/os-release", "files/nope", r"uki\.osrel: 'files/nope': no such file"),
    "missing-pin-field": (f"    sha256: {SHA}\n", "", r"packages\.busybox: missing sha256"),
    # Regression: pin names and versions went unchecked onto apt's command line, where a
    # leading '-' is an option ("-oDir::Etc::sourcelist=...").
    "pin-name-is-an-option": (
        "name: busybox-static",
        "name: -oDir::Etc::sourcelist=/tmp/x",
        r"packages\.busybox\.name: '-oDir::Etc::sourcelist=/tmp/x' is not a Debian package name",
    ),
    "pin-version-with-space": (
        '"1:1.35.0-4+deb12u1+b1"',
        '"1.35 -o"',
        r"packages\.busybox\.version: '1\.35 -o' is not a Debian version",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=sorted(BAD))
def test_bad_recipe_names_file_line_and_key(recipes: Path, case: str) -> None:
    old, new, pattern = BAD[case]
    path = recipes / "debian-minimal.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(RecipeError, match=pattern) as info:
        load_recipe(path)
    assert "\n" not in info.value.one_line()


def test_extends_escape_is_refused(recipes: Path) -> None:
    child = recipes / "escape.yaml"
    child.write_text("extends: ../outside.yaml\n")
    (recipes.parent / "outside.yaml").write_text("name: x\n")
    with pytest.raises(RecipeError, match=r"escape\.yaml:1: extends: .* escapes"):
        load_recipe(child)


def test_extends_loop_is_refused(recipes: Path) -> None:
    (recipes / "a.yaml").write_text("extends: b.yaml\n")
    (recipes / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(RecipeError, match="loops"):
        load_recipe(recipes / "a.yaml")


@pytest.mark.parametrize("pair", ["novalue", "=x", "1x=2"])
def test_bad_set_variable(pair: str) -> None:
    with pytest.raises(RecipeError, match="expected NAME=VALUE"):
        parse_variables([pair])


# Regression: an expression that fails at render time ({{ 1/0 }}) escaped as a traceback.
TEMPLATE_RUNTIME_ERRORS = {
    "zero-division": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "str-plus-int": ('{{ "a" + 1 }}', "TypeError"),
    "bad-format": ('{{ "%d" % "x" }}', "TypeError"),
    "zero-step": ("{{ range(1, 2, 0) | list }}", "ValueError"),
    "endless-macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
}


@pytest.mark.parametrize(
    "case", sorted(TEMPLATE_RUNTIME_ERRORS), ids=sorted(TEMPLATE_RUNTIME_ERRORS)
)
def test_template_runtime_error_is_one_line(tmp_path: Path, case: str) -> None:
    expr, kind = TEMPLATE_RUNTIME_ERRORS[case]
    template = tmp_path / "init.sh.j2"
    template.write_text(f"#!/bin/sh\n{expr}\n")
    with pytest.raises(RecipeError, match=rf"init\.sh\.j2:2: template error: {kind}") as info:
        render_template(template, {})
    assert "\n" not in info.value.one_line()


def test_template_runtime_error_in_recipe_names_the_recipe(recipes: Path) -> None:
    path = recipes / "debian-minimal.yaml"
    path.write_text(path.read_text().replace("'1.0.0'", "1 / 0", 1))
    with pytest.raises(RecipeError, match=r"debian-minimal\.yaml:5: template error"):
        load_recipe(path)


# Regression: {% include %} read a file that neither the recipe digest nor the lock covered,
# so the image could change while the digest and the lock stayed the same.
@pytest.mark.parametrize(
    "statement",
    ['{% include "files/motd" %}', '{% import "files/motd" as m %}', '{% extends "x.j2" %}'],
    ids=["include", "import", "extends"],
)
def test_template_include_of_untracked_file_is_refused(recipes: Path, statement: str) -> None:
    init = recipes / "init" / "init.sh.j2"
    init.write_text(init.read_text() + statement + "\n")
    with pytest.raises(RecipeError, match="may not include other files") as info:
        render_template(init, {"name": "n", "version": "v", "modules": []})
    assert "\n" not in info.value.one_line()


# Regression: jinja's lipsum() and |random put random values into the initrd and the recipe.
@pytest.mark.parametrize(
    "expr", ["{{ lipsum(1) }}", "{{ [1, 2, 3] | random }}"], ids=["lipsum", "random"]
)
def test_template_random_values_are_refused(tmp_path: Path, expr: str) -> None:
    template = tmp_path / "t.j2"
    template.write_text(expr + "\n")
    with pytest.raises(RecipeError, match=r"t\.j2:1: "):
        render_template(template, {})


# Regression: a local input the builder cannot read passed the recipe check and crashed
# with a PermissionError traceback while hashing it.
def test_unreadable_local_input_is_one_line(recipes: Path) -> None:
    osrel = recipes / "files" / "os-release"
    osrel.chmod(0)
    script = (
        "import sys\nfrom pathlib import Path\nfrom builder.errors import RecipeError\n"
        "from builder.recipe import load_recipe\n"
        "try:\n    load_recipe(Path(sys.argv[1]))\n"
        "except RecipeError as exc:\n    print(exc.one_line())\n"
    )
    argv = [sys.executable, "-c", script, str(recipes / "debian-minimal.yaml")]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that allow it
        caps = "-dac_override,-dac_read_search"
        argv = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]
    proc = subprocess.run(
        argv, capture_output=True, text=True, check=False, cwd=Path(__file__).parents[2]
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        r".*debian-minimal\.yaml:\d+: uki\.osrel: 'files/os-release': cannot read: "
        r"Permission denied\n",
        proc.stdout,
    )


# Regression: two unknown keys of different types in a pin raised TypeError from sorted().
def test_pin_with_unknown_keys_of_mixed_types(recipes: Path) -> None:
    path = recipes / "debian-minimal.yaml"
    text = path.read_text().replace(
        f"    sha256: {SHA}\n", f"    sha256: {SHA}\n    1: x\n    y: z\n"
    )
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"packages\.busybox\.1: unknown key"):
        load_recipe(path)


# Regression: secureboot.keys (a folder on the build host, often absolute) went into the recipe
# digest and build.json, so the same image built with keys in another folder differed.
def test_key_set_folder_is_not_part_of_the_digest(recipes: Path) -> None:
    path = recipes / "debian-minimal.yaml"
    one = load_recipe(path, {"keys": "keys.example"})
    two = load_recipe(path, {"keys": "/home/someone/customer-keys"})
    assert two.keys == Path("/home/someone/customer-keys")
    assert one.digest == two.digest
    assert "keys" not in one.data["secureboot"]
    assert "/home/someone" not in repr(two.data)
