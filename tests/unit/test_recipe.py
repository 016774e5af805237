"""Recipe loading: rendering, extends, variables, and one clear line for each bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from builder.errors import RecipeError
from builder.recipe import load_recipe, parse_variables

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
