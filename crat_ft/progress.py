"""A one-line progress report on stderr (a bar on a terminal, a line every 10 s in logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress report with items/s and ETA (stderr)."""

    def __init__(self, total: int, label: str, unit: str = "images") -> None:
        self.total, self.label, self.unit = total, label, unit
        self.done = 0
        self.t0 = time.time()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.last < (0.5 if self.tty else 10.0) and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        per = "img" if self.unit == "images" else "it"
        msg = f"{self.label}: {self.done}/{self.total} {self.unit}  {rate:.1f} {per}/s  ETA {eta:.0f}s"
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and self.done >= self.total:
            print(file=sys.stderr)
