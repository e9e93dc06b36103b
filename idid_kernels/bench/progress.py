"""A small progress bar on stderr, shown once a run has taken more than a couple of seconds.

On a terminal it redraws one line in place; otherwise (a log file, CI) it writes one plain line per
step, so nothing depends on terminal control characters.
"""
from __future__ import annotations

import shutil
import sys
import time


class Progress:
    def __init__(self, total: int, *, enabled: bool = True, delay_s: float = 2.0, stream=None):
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.delay_s = delay_s
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = False

    def step(self, label: str) -> None:
        """Mark the start of the next unit of work, described by ``label``."""
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        if elapsed < self.delay_s:
            return
        head = f"[{self.done}/{self.total} {elapsed:5.0f}s]"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            bar_w = 20
            filled = int(bar_w * (self.done - 1) / self.total)
            line = f"{head} |{'#' * filled}{'.' * (bar_w - filled)}| {label}"
            self.stream.write("\r" + line[: width - 1].ljust(width - 1))
        else:
            self.stream.write(f"{head} {label}\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.enabled and self.drawn and self.tty:
            self.stream.write("\n")
            self.stream.flush()
