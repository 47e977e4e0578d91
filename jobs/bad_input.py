"""Input `m2f evaluate` and `m2f export-coco` cannot use: one error type, one line on stderr, exit code 2.

A user who points evaluation at the wrong folder or file needs to read which file and why, not a
traceback; a scheduler needs a stable exit code. Both jobs catch `USER_ERRORS` at their entry point
and report them with `report_error`.
"""

from __future__ import annotations

from m2f.jobs.console import Console

EXIT_OK, EXIT_BAD_INPUT = 0, 2


class BadInput(ValueError):
    """User input the job cannot evaluate; the message says which file and why."""


# Errors that mean "this input cannot be evaluated": reported in one line, exit code 2.
USER_ERRORS = (ValueError, KeyError, OSError)


def user_message(e: BaseException) -> str:
    """One of `USER_ERRORS` as the one line a user reads (a KeyError's text is only the key's name)."""
    if isinstance(e, KeyError):
        return f"malformed input: a record lacks the field {e}"
    if isinstance(e, FileNotFoundError):
        return f"not found: {e.filename or e}"
    return str(e) or type(e).__name__


def report_error(e: BaseException, console: Console | None = None) -> None:
    """Print one of `USER_ERRORS` as one `error: ...` line on stderr."""
    (console or Console()).line(f"error: {user_message(e)}", err=True)
