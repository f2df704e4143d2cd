"""User-facing errors.

A `QvlError` is a problem with the user's input (a wrong path, a truncated checkpoint, an image
that cannot be read). The CLI prints it as one line plus a hint and exits with code 2; anything
else is an internal error and keeps its traceback.
"""

from __future__ import annotations


class QvlError(Exception):
    """An error caused by the user's input, reported as one line and exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, always
        return self.message.replace("\n", " ")
