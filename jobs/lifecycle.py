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
import io
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import IO

from m2f.jobs.configs import GRACE_SECONDS

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


class Terminal:
    """Where a run's own lines go, apart from what Ray prints.

    Ray's C++ core writes warnings and errors straight to file descriptor 2, and the driver prints its
    workers' forwarded output to sys.stdout/sys.stderr; none of it is for the user of a clean run. While
    `capture_ray(path)` is active, descriptors 1 and 2 point at the run's log file, and our lines keep
    going to the original stdout and stderr through duplicates taken before. In-process callers whose
    streams are not the process's descriptors (tests, notebooks) see no redirection.

    `--json`: every human line goes to stderr; stdout carries the report as its last line only.
    """

    def __init__(self, *, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.out: IO[str] = sys.stdout
        self.err: IO[str] = sys.stderr

    def line(self, text: str, *, err: bool = False) -> None:
        stream = self.err if err or self.json_mode else self.out
        print(text, file=stream, flush=True)

    def result(self, text: str) -> None:
        """The machine-readable last line of stdout (--json)."""
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def capture_ray(self, path: str) -> Iterator[None]:
        if not _is_process_stream(sys.stdout, 1) or not _is_process_stream(sys.stderr, 2):
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        out_before, err_before = self.out, self.err
        self.out = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
        try:
            for fd in (1, 2):
                os.dup2(target, fd)
            yield
        finally:
            with contextlib.suppress(ValueError, OSError):
                sys.stdout.flush()
                sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            os.close(target)
            for stream in (self.out, self.err):
                with contextlib.suppress(OSError):
                    stream.close()
            self.out, self.err = out_before, err_before


def _is_process_stream(stream: IO[str], fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False
