"""Progress of long work (scan, decode, train, embed): a tqdm bar on a terminal, lines in a log.

Without a terminal — a Prefect run (whose ``log_prints`` forwards these lines to the run's log),
CI, ``nohup``, ``dvc repro`` piped to a file — tqdm either stays silent (``disable=None``) or
fills the log with carriage-return frames. There a :class:`LogLines` prints one plain line at
each tenth of the work and, when a tenth takes longer, one a minute (at the next step: a single
step longer than that is silent until it ends).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

EVERY_S = 60.0  # a line at least this often while steps complete


class LogLines:
    """The part of tqdm's interface the stages use (``update``, ``set_postfix``, ``close``, ``n``),
    printing ``desc: 40% (400/1,000 img) 12 s, 33 img/s, k=v`` lines to stderr."""

    def __init__(self, desc: str, unit: str, total: int | None = None, initial: int = 0):
        self.desc, self.unit, self.total, self.n, self._initial = desc, unit, total, initial, initial
        self.postfix: dict[str, Any] = {}
        self._start = self._said_at = time.monotonic()
        self._tenth = self._tenths(initial)
        self._said: tuple = (initial, {})  # count and postfix of the last line

    def _tenths(self, n: int) -> int:
        return 10 * n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        tenth, now = self._tenths(self.n), time.monotonic()
        if tenth > self._tenth or now - self._said_at >= EVERY_S:
            self._tenth = tenth
            self._say(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if (self.n, self.postfix) != self._said:  # the end, unless the last line already said it
            self._say(time.monotonic())

    def _say(self, now: float) -> None:
        elapsed = now - self._start
        done = f"{100 * self.n // self.total}% ({self.n:,}/{self.total:,} {self.unit})" if self.total else f"{self.n:,} {self.unit}"
        rate = f", {(self.n - self._initial) / elapsed:,.0f} {self.unit}/s" if elapsed > 0 else ""  # this run's
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {done} {elapsed:.0f} s{rate}{extra}", file=sys.stderr, flush=True)
        self._said_at, self._said = now, (self.n, dict(self.postfix))


def bar(desc: str, unit: str, total: int | None = None, initial: int = 0, enabled: bool = True) -> tqdm | LogLines:
    """A progress bar for ``total`` units (None: unknown) on stderr: tqdm on a terminal, log
    lines elsewhere, nothing when not ``enabled`` (a torchrun rank other than the first)."""
    if not enabled:
        return tqdm(disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr)
    return LogLines(desc, unit, total, initial)
