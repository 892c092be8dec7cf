"""Progress of a long run on stderr: a tqdm bar (rate, ETA) on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

__all__ = ["PLAIN_EVERY", "Progress", "duration"]

PLAIN_EVERY = 5.0  # seconds between plain lines: enough for a CI log, not a flood


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12s`: what an operator reads at a glance."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Counts done and left-out units of work out of `total`.

    On a terminal tqdm draws the bar; elsewhere (a CI log, `2>file`) a carriage-return bar would be
    one endless line, so a plain line goes out at most every PLAIN_EVERY seconds of `clock`, which
    tests inject.
    """

    def __init__(self, total: int, stream: TextIO, *, unit: str = "point", terminal: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self.left_out = 0
        self._stream = stream
        self._unit = unit
        self._clock = clock
        self._started = clock()
        self._last_line = self._started
        terminal = stream.isatty() if terminal is None else terminal
        self._bar = tqdm(total=total, file=stream, unit=unit, dynamic_ncols=True, leave=True) if terminal else None

    def advance(self, *, left_out: bool = False) -> None:
        self.done += 1
        self.left_out += left_out
        if self._bar is not None:
            self._bar.update(1)
            if left_out:
                self._bar.set_postfix_str(f"{self.left_out} left out", refresh=False)
            return
        now = self._clock()
        if now - self._last_line >= PLAIN_EVERY:
            self._last_line = now
            self._stream.write(self.line(now) + "\n")
            self._stream.flush()

    def line(self, now: float | None = None) -> str:
        """`backfill: 120/600 points (20%), 2 left out, 4.1 points/s, ETA 1m57s`."""
        elapsed = (self._clock() if now is None else now) - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"backfill: {self.done}/{self.total} {self._unit}s ({100 * self.done // max(1, self.total)}%)"]
        if self.left_out:
            parts.append(f"{self.left_out} left out")
        parts.append(f"{rate:.1f} {self._unit}s/s")
        if rate > 0 and self.done < self.total:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        return ", ".join(parts)

    def note(self, message: str) -> None:
        """A line of its own, above the bar on a terminal."""
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            self._stream.write(message + "\n")
            self._stream.flush()

    def elapsed(self) -> float:
        return self._clock() - self._started

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
