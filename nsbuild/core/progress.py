"""Progress on stderr: one line per step; on a terminal, live bars for the work in flight; nothing
with -q."""

from __future__ import annotations

import os
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
        self._live = 0  # lines of the live area now on the terminal
        self._lock = threading.Lock()
        self._watched: dict[str, _Watched] = {}
        self._ticker: threading.Thread | None = None

    @property
    def live_lines(self) -> bool:
        """Live bars are drawn (a terminal, not -q): worth knowing a total for."""
        return self.tty and not self.quiet

    def _clear(self) -> None:
        if self._live:
            # Back to the first live line, then erase to the end of the screen.
            self.stream.write("\r" + "\033[A" * (self._live - 1) + "\033[J")
            self._live = 0

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
        """Lines that the next message replaces (terminals only)."""
        if self.quiet or not self.tty:
            return
        self._clear()
        lines = [line[: _width(self.stream) - 1] for line in message.splitlines()] or [""]
        self.stream.write("\n".join(lines))
        self.stream.flush()
        self._live = len(lines)

    def watch(self, label: str, counter: Callable[[], int], total: int = 0) -> Callable[[], None]:
        """On a terminal, a live line per watched label, redrawn from `counter` until the returned
        stop() is called: a bar with bytes done of `total`, rate and time left when a total is known,
        else the bytes done."""
        with self._lock:
            self._watched[label] = _Watched(counter, total, time.monotonic())
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
                width = _width(self.stream)
                lines = [w.render(label, width) for label, w in self._watched.items()]
            self.live("\n".join(lines))

    def layer_done(self, index: int, total: int, what: str, size: int, seconds: float, cached: bool = False) -> None:
        state = "cached" if cached else f"{seconds:.2f}s"
        self.info(f"[{index}/{total}] {what}: {human(size)} ({state})")

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def _width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return max(40, columns) if columns else 80  # a terminal that tells no size: the usual 80


class _Watched:
    """One live line: what it counts, the total expected (0: unknown) and when it began."""

    def __init__(self, counter: Callable[[], int], total: int, start: float) -> None:
        self.counter = counter
        self.total = total
        self.start = start

    def render(self, label: str, width: int) -> str:
        done = self.counter()
        seconds = max(time.monotonic() - self.start, 1e-3)
        rate = done / seconds
        if self.total <= 0:
            return f"{label}: {human(done)} ({human(rate)}/s)"
        frac = min(done / self.total, 1.0)
        eta = (self.total - done) / rate if rate > 0 and done < self.total else 0.0
        tail = f" {human(done)}/{human(self.total)} {human(rate)}/s ETA {eta:.0f}s"
        room = max(width - len(label) - len(tail) - 4, 10)
        filled = int(frac * room)
        return f"{label} [{'#' * filled}{'-' * (room - filled)}]{tail}"
