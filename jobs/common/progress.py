"""Progress of a run (images segmented, training steps), for people and for logs.

On a terminal: a live bar (tqdm) on stderr. Anywhere else (a scheduler's log, a file, a pipe): one plain
line at least every `interval` seconds, whether or not anything finished since the last one, so that a
log that stops growing means a process that stopped, not a quiet one:

    m2f segment: 12,400/1,000,000 images (3 errors), 41.2 images/s, ETA 6h43m

The rate counts this run's images since its first result (the model's start-up is not in it); the ETA
divides what is left by that rate. Ray Data's own bars are switched off: they drew nothing useful in a
log and nothing at all on some terminals.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any

INTERVAL_S = float(os.environ.get("M2F_PROGRESS_SECONDS", "30"))  # a log line at least this often


def format_duration(seconds: float) -> str:
    """42 -> "42s", 403 -> "6m43s", 24180 -> "6h43m"."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Counts finished images and shows them: `update()` from whoever receives results, `tick()` from a
    timer (it prints the periodic line), `close()` at the end. Thread-safe."""

    def __init__(
        self,
        total: int,
        *,
        bar: bool | None = None,
        interval: float = INTERVAL_S,
        stream: IO[str] | None = None,
        prefix: str = "m2f segment",
        unit: str = "images",
        initial: int = 0,
    ) -> None:
        self.total = total
        self.done = self.initial = initial  # `initial`: done before this run (a resumed training)
        self.unit = unit
        self.note = ""  # appended to the line, e.g. "loss 0.412"
        self.errors = 0
        self.interval = interval
        self.prefix = prefix
        self._stream = stream if stream is not None else sys.stderr
        self._lock = threading.Lock()
        self._first: float | None = None  # monotonic time of the first result
        self._last_line = time.monotonic()
        self._bar: Any = None
        if bar if bar is not None else _is_terminal(self._stream):
            from tqdm import tqdm

            # A pseudo-terminal that was never given a size (a CI runner's, `script`'s) reports 0 x 0, and
            # tqdm then draws nothing: give it a size of its own there.
            width, height = _size(self._stream)
            sized = {"dynamic_ncols": True} if width and height else {"ncols": 100, "nrows": 24}
            unit_name = "img" if unit == "images" else unit.rstrip("s")
            self._bar = tqdm(total=total, initial=initial, file=self._stream, unit=unit_name, desc=prefix, **sized)

    def update(self, done: int, errors: int = 0) -> None:
        """`done` more images finished, `errors` of them as error rows."""
        with self._lock:
            now = time.monotonic()
            if self._first is None:
                self._first = now
            self.done += done
            self.errors += errors
            if self._bar is not None:
                self._bar.update(done)
                if errors:
                    self._bar.set_postfix(errors=self.errors, refresh=False)

    def set_note(self, note: str) -> None:
        with self._lock:
            self.note = note
            if self._bar is not None:
                self._bar.set_postfix_str(note, refresh=False)

    def rate(self) -> float | None:
        """Units per second since the first result; None before there is a rate to tell."""
        if self._first is None:
            return None
        elapsed = time.monotonic() - self._first
        done = self.done - self.initial
        return done / elapsed if elapsed > 1.0 and done else None

    def line(self) -> str:
        rate = self.rate()
        text = f"{self.prefix}: {self.done:,}/{self.total:,} {self.unit}"
        if self.unit == "images":
            text += f" ({self.errors:,} errors)"
        if self.note:
            text += f", {self.note}"
        if rate is None:
            return text + ", waiting for the first results" if self.done == self.initial else text
        left = max(0, self.total - self.done)
        return text + f", {rate:.1f} {self.unit}/s, ETA {format_duration(left / rate)}"

    def tick(self) -> None:
        """Print the periodic line when `interval` has passed (logs only; a bar redraws itself)."""
        if self._bar is not None:
            return
        with self._lock:
            now = time.monotonic()
            if now - self._last_line < self.interval:
                return
            self._last_line = now
            line = self.line()
        print(line, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _size(stream: IO[str]) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return 0, 0
    return size.columns, size.lines


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
