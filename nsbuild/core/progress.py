"""Progress on stderr: one line per step, a live line on a terminal, nothing with -q."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
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
        self._lock = threading.Lock()
        self._watched: dict[str, Callable[[], int]] = {}
        self._ticker: threading.Thread | None = None

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
        self.stream.write(message[:200])
        self.stream.flush()
        self._live = True

    def watch(self, label: str, counter: Callable[[], int]) -> Callable[[], None]:
        """On a terminal, redraw `label: N MiB` from `counter` until the returned stop() is called."""
        with self._lock:
            self._watched[label] = counter
            if self.tty and not self.quiet and self._ticker is None:
                self._ticker = threading.Thread(target=self._tick, daemon=True)
                self._ticker.start()

        def stop() -> None:
            with self._lock:
                self._watched.pop(label, None)

        return stop

    def _tick(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                if not self._watched:
                    self._ticker = None
                    return
                line = "  ".join(f"{label}: {human(c())}" for label, c in self._watched.items())
            self.live(f"{line}  [{self.elapsed():.0f}s]")

    def layer_done(self, index: int, total: int, what: str, size: int, seconds: float, cached: bool = False) -> None:
        state = "cached" if cached else f"{seconds:.2f}s"
        self.info(f"[{index}/{total}] {what}: {human(size)} ({state})")

    def elapsed(self) -> float:
        return time.monotonic() - self.start
