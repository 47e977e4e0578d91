"""How a job stops short: `Failure` carries the one line the user sees and the exit code; `storage_step`
turns any storage error into one (a missing INPUT is a bad argument, 2; anything else, 3)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

from m2f.jobs.common.lifecycle import Cancelled
from m2f.pipeline.storage import StorageError, storage_failure, with_retries

T = TypeVar("T")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours its task names in exception texts

log = logging.getLogger(__name__)


class Failure(Exception):
    """The run cannot go on; the message is the one line the user sees."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, without terminal colours."""
    plain = ANSI_ESCAPE.sub("", str(e)).strip()
    text = plain.splitlines()[0] if plain else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def storage_step(action: str, uri: str, fn: Callable[[], T], *, retry: bool = True, secrets: Iterable[str] = ()) -> T:
    """Run a storage step: a missing INPUT is a bad argument (2); any other failure is one line (3).

    `retry`: start the step over on a transient error (each step reads, or rewrites whole files); not for
    the listing, whose every request is retried already (pipeline.sources).
    """
    try:
        return with_retries(fn) if retry else fn()
    except (Cancelled, Failure):
        raise
    except (FileNotFoundError, ValueError) as e:  # a missing INPUT, a manifest without a uri column, a bad URI
        raise Failure(str(e), 2) from None
    except StorageError as e:
        log.exception("storage failure")
        raise Failure(str(e), 3) from None
    except Exception as e:
        log.exception("storage failure")
        raise Failure(str(storage_failure(e, action, uri, secrets=secrets)), 3) from None
