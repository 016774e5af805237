"""invoke tasks: the entry points CI and release engineers use.

invoke build [--recipe R]     build a recipe (default: recipes/debian-minimal.yaml)
invoke repro [--recipe R]     build twice under different conditions, compare every artifact
invoke boot-test [--negative] boot the build under QEMU + OVMF + swtpm, compare with the
                              golden measurements (and prove refusals with --negative)
invoke publish                publish the build and its signed golden manifest
invoke release                build -> boot-test -> publish
invoke lint                   ruff check, ruff format --check, mypy --strict
invoke test                   lint, then the whole test suite
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from invoke import Context, task

ROOT = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
DEFAULT_RECIPE = "recipes/debian-minimal.yaml"
DEFAULT_STORE = "store"
RELEASE_KEY = "keys.release/release.key"


def _bin(name: str) -> str:
    return str(VENV_BIN / name)


def _outdir(c: Context, recipe: str) -> str:
    """OUT/<name>/<version> of a recipe, as the build will make it."""
    code = (
        "import sys; from pathlib import Path; from builder.recipe import load_recipe; "
        "r = load_recipe(Path(sys.argv[1])); print(f'out/{r.name}/{r.version}')"
    )
    result = c.run(f'{_bin("python")} -c "{code}" {recipe}', hide=True)
    assert result is not None
    return str(result.stdout.strip())


@task
def build(c: Context, recipe: str = DEFAULT_RECIPE, offline: bool = False) -> None:
    """Build a recipe into out/<name>/<version>/."""
    with c.cd(str(ROOT)):
        c.run(f"{_bin('bootchain')} build {recipe}" + (" --offline" if offline else ""), pty=False)


@task
def repro(c: Context, recipe: str = DEFAULT_RECIPE) -> None:
    """Build twice (other folder, TZ, umask, locale, clock) and compare every artifact."""
    with c.cd(str(ROOT)):
        c.run(f"{_bin('bootchain')} repro {recipe}")


@task(name="boot-test")
def boot_test(c: Context, recipe: str = DEFAULT_RECIPE, negative: bool = False) -> None:
    """Boot the recipe's build and compare the guest's PCRs and event log with the prediction."""
    with c.cd(str(ROOT)):
        outdir = _outdir(c, recipe)
        c.run(f"{_bin('bootchain')} boot-test {outdir}" + (" --negative" if negative else ""))


@task
def publish(
    c: Context,
    recipe: str = DEFAULT_RECIPE,
    store: str = DEFAULT_STORE,
    channel: str = "stable",
    key: str = RELEASE_KEY,
) -> None:
    """Publish the recipe's build and its signed golden manifest to a store."""
    with c.cd(str(ROOT)):
        if not Path(key).exists():
            c.run(f"{_bin('bootchain')} keys generate-release {Path(key).parent}")
        outdir = _outdir(c, recipe)
        c.run(
            f"{_bin('bootchain')} publish {outdir} --store {store} --channel {channel} --key {key}"
        )


@task
def release(c: Context, recipe: str = DEFAULT_RECIPE, store: str = DEFAULT_STORE) -> None:
    """build -> boot-test -> publish."""
    build(c, recipe=recipe)
    boot_test(c, recipe=recipe)
    publish(c, recipe=recipe, store=store)


@task
def lint(c: Context) -> None:
    """ruff check, ruff format --check and mypy --strict."""
    with c.cd(str(ROOT)):
        c.run(f"{_bin('ruff')} check builder tests bench tasks.py")
        c.run(f"{_bin('ruff')} format --check builder tests bench tasks.py")
        c.run(f"{_bin('mypy')}")


@task
def test(c: Context, fast: bool = False) -> None:
    """Lint, then the test suite (--fast skips the boot tests)."""
    lint(c)
    with c.cd(str(ROOT)):
        marks = ' -m "not boot"' if fast else ""
        env = {"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
        c.run(f"{_bin('pytest')} -ra{marks}", env=env, pty=False)
