"""The one exception tree. Library code raises these; only ``builder.cli`` prints them.

Split by whose fault it is, so the CLI (and CI logs) can say what to do next:

- ``UserInputError``: a recipe, file, key, event log, manifest or option given by the user.
- ``ToolError``: an external program is missing or failed.
- ``VerificationError``: a signature, digest or measurement did not verify (fail closed).
- ``StoreError``: object storage or network.

Any exception that is not a ``BootchainError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class BootchainError(Exception):
    """Base class. ``message`` is one line naming what and where; ``hint`` says what to do."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        """The line the CLI prints: message, then the hint when there is one."""
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class UserInputError(BootchainError):
    """Bad input from the user: a file, option or value that cannot be used."""

    exit_code = 2


class RecipeError(UserInputError):
    """A recipe that does not render, parse or validate. Names file, line and key."""


class InputFileError(UserInputError):
    """A file that is not what it must be (PE image, event log, manifest, key, certificate)."""


class PinError(UserInputError):
    """A pinned input whose digest or version does not match what was found."""


class ToolError(BootchainError):
    """An external tool is missing or failed."""

    exit_code = 3


class VerificationError(BootchainError):
    """A signature, digest or measurement failed to verify. Never returned, always raised."""

    exit_code = 4


class StoreError(BootchainError):
    """Object storage or network trouble."""

    exit_code = 5


class ConflictError(StoreError):
    """A conditional write lost: the object exists already or moved under us."""


class BootError(BootchainError):
    """A boot test could not run to a verdict (QEMU or swtpm died, timeout, no probe output)."""

    exit_code = 6
