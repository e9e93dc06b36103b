"""A one-line progress bar per training run, without a dependency.

On a terminal the line is redrawn in place after every epoch; otherwise (a log file, CI) only the
finished line is written, so logs get one line per run instead of one per epoch.
"""
from __future__ import annotations

import sys
import time


class RunProgress:
    def __init__(self, label: str, total: int, *, stream=None, width: int = 24, enabled: bool = True):
        self.label, self.total, self.width, self.enabled = label, total, width, enabled
        self.stream = sys.stderr if stream is None else stream
        self.live = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.done = 0
        self.loss = float("nan")
        if self.live:
            self._draw()

    def _line(self) -> str:
        filled = int(round(self.width * self.done / max(self.total, 1)))
        bar = "#" * filled + "-" * (self.width - filled)
        return (f"{self.label} [{bar}] {self.done}/{self.total} epochs  loss {self.loss:.4f}  "
                f"{time.perf_counter() - self.start:.1f}s")

    def _draw(self) -> None:
        self.stream.write("\r" + self._line() + "\x1b[K")
        self.stream.flush()

    def update(self, done: int, total: int, loss: float) -> None:
        self.done, self.total, self.loss = done, total, loss
        if self.live:
            self._draw()

    def close(self, suffix: str = "") -> None:
        if not self.enabled:
            return
        line = self._line() + (f"  {suffix}" if suffix else "")
        self.stream.write(("\r" + line + "\x1b[K\n") if self.live else line + "\n")
        self.stream.flush()
