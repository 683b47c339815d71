"""Errors that reach the user. Each one renders as a single line that says what went wrong and where."""
from __future__ import annotations

# Exit codes a job script can branch on.
EXIT_FAILED = 1        # internal failure, or a rank died
EXIT_USAGE = 2         # bad command line or job file
EXIT_INVALID_INPUT = 3  # a row or file of the corpus is invalid (fail-fast mode)
EXIT_STOPPED = 75      # stopped early by a signal, committed work kept: rerun (or requeue) to resume


class HpcEmbedError(Exception):
    """An error with a message meant for the user, not a traceback."""

    exit_code = EXIT_FAILED


class ConfigError(HpcEmbedError):
    exit_code = EXIT_USAGE


class InputError(HpcEmbedError):
    """Invalid input: names the file, and the row and its id where there is one."""

    exit_code = EXIT_INVALID_INPUT

    def __init__(self, path: str, reason: str, row: int | None = None, row_id: str | None = None):
        self.path, self.reason, self.row, self.row_id = str(path), reason, row, row_id
        super().__init__(self.describe())

    def describe(self) -> str:
        where = self.path
        if self.row is not None:
            where += f" row {self.row}"
        if self.row_id is not None:
            where += f" (id {self.row_id!r})"
        return f"{where}: {self.reason}"

    def as_reject(self) -> dict:
        return {"file": self.path, "row": self.row, "id": self.row_id, "reason": self.reason}


class TransportError(HpcEmbedError):
    """A peer's connection broke (it died, or its node did): the job cannot finish, so it ends with this."""


class JobAborted(Exception):
    """Raised inside a role when another part of the job failed; the failing part reports the cause."""
