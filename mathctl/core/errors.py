"""User-facing errors and the exit codes scripts rely on.

Anything a user can fix (a missing file, a bad key, a malformed data line) is raised as a
`MathctlError`; `cli.py` prints it as one `error:` line plus a `hint:` and exits with 2.
Everything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_GATE = 3


class MathctlError(Exception):
    """An error the user can fix. `hint` says how."""

    exit_code = EXIT_USER

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(MathctlError):
    """A recipe or override is wrong."""


class DataError(MathctlError):
    """Input data is missing or malformed."""


class CheckpointError(MathctlError):
    """A checkpoint or model folder is missing or does not match."""


class EngineError(MathctlError):
    """An inference engine cannot run as configured."""


class GateFailed(MathctlError):
    """A quality gate (for example `eval --min-score`) was not met."""

    exit_code = EXIT_GATE
