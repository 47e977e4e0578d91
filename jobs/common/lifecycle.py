"""How a run ends early: signals, stalls, and the run's log file.

`Stop` is the one place a run learns that it must end before its work is done. SIGTERM (a scheduler's
cancel, Kubernetes' pod deletion) and SIGINT (Ctrl-C) set it; so does the driver's loop when nothing has
finished for `--stall-timeout` seconds. Before results flow, a signal raises `Cancelled` at once (there is
nothing to save yet); while they flow, it only sets the flag, and the driver's loop (which wakes every
second) stops taking results, commits what it holds within `--grace-seconds`, writes the run report and
shuts Ray down. A second signal cuts the grace period short.

`ray.init()` installs its own SIGTERM handler (it ends the process with a native crash dump), so
`Stop.install()` is called again once Ray is up. Handlers are installed only in the main thread and the
previous ones are restored when the run ends, so `run()` can be called from tests and notebooks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from types import FrameType

from m2f.jobs.common.configs import GRACE_SECONDS

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it
# A second signal ends the grace period (a person pressing Ctrl-C twice), unless it is the same signal
# within this many seconds: `timeout` signals its child and then the child's process group, which
# delivers it twice, and a scheduler may signal both the process and its group.
DUPLICATE_SIGNAL_S = 1.0


class Cancelled(Exception):  # noqa: N818 (it is a signal, not an error)
    """Raised by the signal handler while no results are in flight."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stop:
    """Why and when a run was asked to stop early. Thread-safe; read by the driver's loop."""

    def __init__(self, grace_seconds: float = GRACE_SECONDS) -> None:
        self.grace_seconds = grace_seconds
        self.signum: int | None = None
        self.stalled: str | None = None  # the stall's explanation
        self.deadline: float | None = None  # monotonic time by which the run must be gone
        self.raise_now = True  # raise Cancelled from the handler (no results in flight yet)
        self._previous: dict[int, object] = {}
        self._first_signal = 0.0
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.stalled is not None

    @property
    def exit_code(self) -> int | None:
        if self.signum is not None:
            return EXIT_CODES[self.signum]
        return 3 if self.stalled is not None else None

    @property
    def status(self) -> str | None:
        if self.signum is not None:
            return "cancelled"
        return "stalled" if self.stalled is not None else None

    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def stall(self, explanation: str) -> None:
        with self._lock:
            if not self.requested:
                self.stalled = explanation
                self.deadline = time.monotonic() + self.grace_seconds

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        with self._lock:
            if self.signum is not None or self.stalled is not None:
                if signum == self.signum and now - self._first_signal < DUPLICATE_SIGNAL_S:
                    return  # the same signal twice at once (`timeout` and `killpg` both reach us): one request
                self.deadline = now  # a second request: no more grace
                return
            self.signum = signum
            self._first_signal = now
            self.deadline = now + self.grace_seconds
        if self.raise_now:
            raise Cancelled(signum)

    def install(self) -> None:
        """(Re)install the handlers for SIGTERM and SIGINT; no-op outside the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in EXIT_CODES:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous.clear()


@contextlib.contextmanager
def handling_signals(stop: Stop) -> Iterator[Stop]:
    """SIGTERM and SIGINT go to `stop` for the length of the block."""
    stop.install()
    try:
        yield stop
    finally:
        stop.restore()


class RunLog:
    """The run's own log file: warnings and failures with their tracebacks, which the terminal gets as one
    line. Written locally while the run goes (OUTPUT may be the thing that failed) and copied next to the
    run report at the end."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self, run_id: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix=f"m2f-{run_id}-", suffix=".log")
        os.close(fd)
        self._handler = logging.FileHandler(self.path, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(self.FORMAT))
        self._handler.setLevel(logging.INFO)
        self._loggers = [logging.getLogger(name) for name in ("m2f",)]
        self._saved = [(logger.level, logger.propagate) for logger in self._loggers]
        for logger in self._loggers:  # ours go to the file only: the terminal gets one line per event
            logger.addHandler(self._handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False

    def text(self) -> str:
        self._handler.flush()
        with open(self.path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def close(self, *, keep: bool = False) -> None:
        for logger, (level, propagate) in zip(self._loggers, self._saved, strict=True):
            logger.removeHandler(self._handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self._handler.close()
        if not keep:
            with contextlib.suppress(OSError):
                os.remove(self.path)
