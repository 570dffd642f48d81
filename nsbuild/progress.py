"""Progress on stderr: one line per step, a live line on a terminal, nothing with -q."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._live = False

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\033[K")
            self._live = False

    def info(self, message: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(f"nsbuild: {message}\n")
        self.stream.flush()

    def warn(self, message: str) -> None:
        self._clear()
        self.stream.write(f"nsbuild: warning: {message}\n")
        self.stream.flush()

    def live(self, message: str) -> None:
        """A line that the next message replaces (terminals only)."""
        if self.quiet or not self.tty:
            return
        self._clear()
        self.stream.write(message[: 200])
        self.stream.flush()
        self._live = True

    def layer_done(self, index: int, total: int, what: str, size: int, seconds: float,
                   cached: bool = False) -> None:
        state = "cached" if cached else f"{seconds:.2f}s"
        self.info(f"[{index}/{total}] {what}: {human(size)} ({state})")

    def elapsed(self) -> float:
        return time.monotonic() - self.start
