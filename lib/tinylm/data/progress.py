"""Progress lines for the long data steps (raw splits, tokenizer counting, packing)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("tinylm.data")


class Progress:
    """A log line at most every `every` seconds: `what: 120.0 of 437.2 MB (35.1 MB/s)`, or of a unit other
    than MB in whole numbers: `writing train.txt: 900 of 900 stories (215538 stories/s)`."""

    def __init__(self, what: str, total: float | None = None, unit: str = "MB", every: float = 5.0):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.done = 0.0
        self.start = self.last = time.perf_counter()

    def update(self, amount: float) -> None:
        self.done += amount
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._log(now)

    def close(self) -> float:
        """Log the final line; return the seconds since the start."""
        now = time.perf_counter()
        self._log(now)
        return now - self.start

    def _log(self, now: float) -> None:
        digits = 1 if self.unit == "MB" else 0  # other units count whole things (stories)
        of = f" of {self.total:.{digits}f}" if self.total is not None else ""
        rate = self.done / max(now - self.start, 1e-9)
        log.info("%s: %.*f%s %s (%.*f %s/s)", self.what, digits, self.done, of, self.unit, digits, rate, self.unit)
