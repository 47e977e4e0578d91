"""The one way a job prints: `Console.line` for people, `Console.result` for machines (`--json`: the
result is the last line of stdout and everything else goes to stderr), and `capture_ray` to keep Ray's own
output out of both while it runs. `Voice` is a run's console: its lines scrubbed of the run's secrets, and
its warnings kept for the run report."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import IO

from m2f.pipeline.secrets import scrub

log = logging.getLogger(__name__)


class Console:
    """Where a job's own lines go: stdout for results, stderr for the rest, and apart from what Ray prints.

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


class Voice:
    """What a run tells people, never showing a secret: `say` a line, `warn` (a line on stderr, the run log,
    and `warnings`, which the run report lists), `note` (the report only), `result` (--json's last line)."""

    def __init__(self, console: Console, secrets: Sequence[str]) -> None:
        self.console = console
        self.secrets = secrets
        self.warnings: list[str] = []

    def say(self, message: str, *, err: bool = False) -> None:
        self.console.line(scrub(message, self.secrets), err=err)

    def warn(self, message: str) -> None:
        self.note(message)
        log.warning("%s", scrub(message, self.secrets))
        self.say(f"warning: {message}", err=True)

    def note(self, message: str) -> None:
        self.warnings.append(scrub(message, self.secrets))

    def result(self, text: str) -> None:
        self.console.result(scrub(text, self.secrets))


def _is_process_stream(stream: IO[str], fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False
