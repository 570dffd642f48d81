"""Timing helpers of the bench: one command's wall time and peak RSS, medians, and the result table."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


class CommandFailed(SystemExit):
    """A timed command exited non-zero. A SystemExit, so an unexpected failure still ends the bench with
    the command and its stderr; the peer rows catch it and print a note instead."""


# Peak RSS through GNU time, which forks the command from its own small process: a child forked by
# the bench itself reports at least the bench's RSS at fork time (Linux carries the parent's high-water
# mark through fork and exec into ru_maxrss).
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def run(cmd: list[str] | str, env: Mapping[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS MiB (largest process of the tree), stderr."""
    argv = ["/bin/bash", "-c", cmd] if isinstance(cmd, str) else cmd
    with tempfile.NamedTemporaryFile(prefix="nsbuild-bench-rss-") as rss:
        if GNU_TIME:
            argv = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        peak_kib = int(Path(rss.name).read_text().split()[-1]) if GNU_TIME and status == 0 else usage.ru_maxrss
    if status != 0:
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        raise CommandFailed(f"failed ({os.waitstatus_to_exitcode(status)}): {shown}\n{err.strip()}")
    return wall, peak_kib / 1024, err


def median_run(
    cmd: list[str] | str,
    runs: int,
    before: Callable[[], object] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[float, float]:
    """Median wall seconds and the largest peak RSS of `runs` runs; `before` runs untimed before each."""
    walls, peaks = [], []
    for _ in range(runs):
        if before is not None:
            before()
        wall, peak, _ = run(cmd, env)
        walls.append(wall)
        peaks.append(peak)
    return statistics.median(walls), max(peaks)


def spec(path: Path, contents: list, compressor: str, max_layers: int = 100) -> Path:
    path.write_text(
        json.dumps(
            {"name": "bench", "tag": "t", "contents": contents, "compressor": compressor, "maxLayers": max_layers}
        )
    )
    return path


@dataclass(frozen=True)
class Tree:
    """A tree the bench builds, with its entry count and byte size (for the table)."""

    path: Path
    files: int
    size: int

    @classmethod
    def of(cls, path: Path) -> Tree:
        n = size = 0
        for dirpath, dirnames, filenames in os.walk(path):
            n += len(filenames) + len(dirnames)
            for f in filenames:
                with contextlib.suppress(OSError):
                    size += os.lstat(os.path.join(dirpath, f)).st_size
        return cls(path, n, size)

    def scaled(self, factor: int) -> Tree:
        return Tree(self.path, self.files * factor, self.size * factor)


NO_TREE = Tree(Path(), 0, 0)


@dataclass
class Table:
    """The rows printed at the end (each is also printed to stderr as soon as it is measured)."""

    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(
        self, tool: str, comp: str, tree: Tree, wall: float | None, peak: float | None, ratio: float | None
    ) -> None:
        r = (
            tool,
            comp,
            str(tree.files) if tree.files else "",
            f"{tree.size / 2**20:.0f} MiB" if tree.size else "",
            "n/a" if wall is None else f"{wall:.2f}",
            "" if peak is None else f"{peak:.0f}",
            "" if ratio is None else f"{ratio:.2f}",
        )
        self.rows.append(r)
        print("  ".join(r), file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", file=sys.stderr, flush=True)

    def print(self, heading: str) -> None:
        header = ("tool", "compressor", "files", "bytes", "wall s", "peak MiB", "ratio")
        widths = [max(len(r[i]) for r in [*self.rows, header]) for i in range(len(header))]
        print(f"\n{heading}\n")
        print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in self.rows:
            # A pipeline's "|" would end a Markdown cell.
            print("| " + " | ".join(c.replace("|", "\\|").ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        for text in self.notes:
            print(f"\n- {text}", end="")
        if self.notes:
            print()
