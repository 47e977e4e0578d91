"""Bad input or a bug: what a command's user did wrong is exit 2, in one line; anything else is exit 3.

Exit 2 is for the user's mistakes: `BadInput`, raised where the input is checked, saying which file and
why; a `ValueError` from pipeline/ (its readers and metrics refuse bad data that way, with the value in the
message); an `OSError` (a file that is missing or cannot be read). Those are `USER_ERRORS`. Anything else,
a `KeyError` or `TypeError` from our own code for one, is a bug: exit 3, one line on stderr naming the log
file that holds its traceback (`report_bug`). A user who points evaluation at the wrong folder or file
needs to read which file and why, not a traceback; a scheduler needs a stable exit code.
"""

from __future__ import annotations

import logging

from m2f.jobs.common.console import Console
from m2f.jobs.common.failure import one_line
from m2f.jobs.common.lifecycle import RunLog
from m2f.pipeline.output import new_run_id

EXIT_OK, EXIT_BAD_INPUT, EXIT_BUG = 0, 2, 3

log = logging.getLogger(__name__)


class BadInput(ValueError):
    """User input the job cannot use; the message says which file and why."""


# Errors that mean "this input cannot be used": reported in one line, exit code 2.
USER_ERRORS = (ValueError, OSError)


def user_message(e: BaseException) -> str:
    """One of `USER_ERRORS` as the one line a user reads."""
    if isinstance(e, FileNotFoundError):
        return f"not found: {e.filename or e}"
    return str(e) or type(e).__name__


def report_error(e: BaseException, console: Console | None = None) -> None:
    """Print one of `USER_ERRORS` as one `error: ...` line on stderr."""
    (console or Console()).line(f"error: {user_message(e)}", err=True)


def report_bug(command: str, e: BaseException, console: Console | None = None) -> int:
    """A bug (not the user's input): its traceback to a log file, one line on stderr naming it; EXIT_BUG."""
    run_log = RunLog(new_run_id())
    log.error("%s failed", command, exc_info=e)
    run_log.close(keep=True)
    line = f"{command}: error: {one_line(e)} (a bug, not your input: the traceback is in {run_log.path})"
    (console or Console()).line(line, err=True)
    return EXIT_BUG
