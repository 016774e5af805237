"""boot-test helpers that need no boot: measurement editing, case names, UKI byte flips."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from builder import boottest
from builder.errors import InputFileError, UserInputError

MEASUREMENTS = {
    "schema": "bootchain.measurements/v1",
    "pcrs": {"sha256": {"4": "00" * 32, "7": "11" * 32}, "sha1": {"4": "22" * 20}},
    "events": [
        {"recnum": 0, "pcr": 4, "digests": [{"hashAlg": "sha256", "digest": "aa" * 32}]},
        {"recnum": 1, "pcr": 4, "digests": [{"hashAlg": "sha256", "digest": "bb" * 32}]},
    ],
}


def test_edit_measurements_changes_exactly_one_digest() -> None:
    before = copy.deepcopy(MEASUREMENTS)
    edited = boottest.edit_measurements(MEASUREMENTS)
    assert before == MEASUREMENTS  # the input is not touched
    # The last PCR 4 event (the UKI) changes; the PCR values stay as they were.
    assert edited["events"][1]["digests"][0]["digest"] == "bb" * 31 + "ba"
    edited["events"][1]["digests"][0]["digest"] = "bb" * 32
    assert edited == MEASUREMENTS


def test_edit_measurements_needs_pcr4() -> None:
    with pytest.raises(InputFileError, match="PCR 4"):
        boottest.edit_measurements({"pcrs": {}, "events": []})


def test_load_build_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"build\.json not found"):
        boottest.load_build(tmp_path)


def test_flip_section_needs_the_section() -> None:
    from tests.boot.efiapp import tiny_efi_app

    app = tiny_efi_app()
    flipped = boottest._flip_section(app, ".text")
    assert len(flipped) == len(app)
    assert sum(a != b for a, b in zip(app, flipped, strict=True)) == 1
    with pytest.raises(InputFileError, match=r"\.linux"):
        boottest._flip_section(app, ".linux")


def test_negative_case_names() -> None:
    assert set(boottest.NEGATIVE_CASES) == {
        "uki-linux-byte",
        "uki-initrd-byte",
        "uki-cmdline-byte",
        "uki-foreign-key",
        "bootloader-unsigned",
        "varstore-foreign-db",
    }


@pytest.mark.parametrize("cases", [[], ["no-such-case"]], ids=["none", "unknown"])
def test_bug_negative_suite_with_no_or_unknown_case_is_an_error(
    cases: list[str], tmp_path: Path
) -> None:
    """Regression: no case made an empty suite that reported ok; an unknown one a KeyError."""
    with pytest.raises(UserInputError, match="negative case"):
        boottest.run_negative(tmp_path, cases=cases)
