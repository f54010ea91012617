"""Errors that reach the user as one clear line (exit code 2), never as a traceback."""
from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user (a file, a folder, an option). The message names the culprit.

    The CLI prints ``Error: <message>`` and exits with code 2.
    """


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and suggests a fix."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
