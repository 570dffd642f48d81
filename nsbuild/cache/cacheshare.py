"""One cache directory shared by concurrent processes: builds, `cache prune`, `cache verify` (issue 11).

    <cache>/lock              flock: shared while a build pins or publishes blobs, exclusive for prune
    <cache>/tmp/<id>/         one running build's private area (a "staging" directory):
        lock                  flocked exclusively by that build for its whole life
        pins                  digests (hex, one a line) of every cached blob the build uses
        blobs/sha256/         blobs it is still writing or has not published yet; its temporary files

Pin, then use: a build records a blob's digest in its `pins` under the shared lock, then checks that
the blob is there; prune reads every live build's pins and deletes blobs under the exclusive lock.
Whichever comes first, a build never loses a blob it decided to use, and prune never waits for a
build (the locks are held for milliseconds; a build holds only its own staging lock for long).
A staging directory whose lock is free belongs to a dead build (killed, power cut): the next build or
prune removes it with everything it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_DIR = "tmp"
# Temporary files other writers (the registry client, the output stamps) leave in the cache, by name.
_PID_TMP = re.compile(r"^\..*\.(\d+)(?:\.[0-9a-f]+)?\.tmp$")
_ANON_TMP = re.compile(r"^\.(tmp-|blobrecord\.)")
# A writer appends to its temporary file all the time; one untouched this long has no writer.
_STALE_S = 24 * 3600


@contextlib.contextmanager
def cache_lock(root: Path, *, exclusive: bool, block: bool = True) -> Iterator[bool]:
    """The cache-wide lock; yields False (not held) when `block` is off and someone holds it."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, flags if block else flags | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Staging:
    """This process's private directory in the cache: its pins and its unpublished blobs."""

    def __init__(self, root: Path) -> None:
        self.cache_root = root
        parent = root / TMP_DIR
        parent.mkdir(exist_ok=True)
        # Under the shared lock: a sweeper (exclusive) never sees it before its lock is taken.
        with cache_lock(root, exclusive=False):
            self.root = parent / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.root.mkdir()
            self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self.blobs = self.root / "blobs" / "sha256"
            self.blobs.mkdir(parents=True)
            self._pins = os.open(self.root / "pins", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.pinned: set[str] = set()

    def pin(self, digests: list[str]) -> None:
        """Record digests ("sha256:<hex>" or "<hex>"); call under the shared cache lock."""
        new = [d.split(":", 1)[-1] for d in digests if d.split(":", 1)[-1] not in self.pinned]
        if new:
            os.write(self._pins, "".join(f"{d}\n" for d in new).encode())
            self.pinned.update(new)

    def close(self) -> None:
        if self._pins < 0:
            return
        os.close(self._pins)
        self._pins = -1
        shutil.rmtree(self.root, ignore_errors=True)
        os.close(self._lock_fd)  # last: until the tree is gone, nobody else sweeps it


def _is_dead(staging: Path) -> bool:
    """No live process holds this staging directory's lock (a missing lock file: it died creating it)."""
    try:
        fd = os.open(staging / "lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def live_pins(root: Path, *, sweep: bool) -> tuple[set[str], int]:
    """Digests pinned by live builds, and how many live builds there are; dead builds' staging
    directories are removed when `sweep` (the caller holds the exclusive lock)."""
    pins: set[str] = set()
    live = 0
    parent = root / TMP_DIR
    if not parent.is_dir():
        return pins, 0
    for staging in parent.iterdir():
        if _is_dead(staging):
            if sweep:
                shutil.rmtree(staging, ignore_errors=True)
            continue
        live += 1
        with contextlib.suppress(OSError):
            pins.update((staging / "pins").read_text().split())
    return pins, live


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stray_temporaries(root: Path, *, no_live_builds: bool) -> Iterator[Path]:
    """Temporary files outside staging directories whose writer is gone: named with a pid that is
    not alive, anonymous ones when no build is running, any untouched for a day."""
    now = time.time()
    for d in (root, root / "layers", root / "blobs" / "sha256", root / "content", root / "outputs", root / "sbom"):
        with contextlib.suppress(OSError), os.scandir(d) as it:
            for e in it:
                if not e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                    continue
                m = _PID_TMP.match(e.name)
                if m is None and not _ANON_TMP.match(e.name):
                    continue
                try:
                    old = now - e.stat(follow_symlinks=False).st_mtime > _STALE_S
                except FileNotFoundError:
                    continue
                dead = not _pid_alive(int(m.group(1))) if m else no_live_builds
                if dead or old:
                    yield Path(e.path)


def sweep(root: Path, *, block: bool) -> tuple[set[str], int]:
    """Remove what dead writers left (under the exclusive lock); (live pins, live builds).  Without
    `block`, nothing is swept when another process holds the lock: the next run does it."""
    with cache_lock(root, exclusive=True, block=block) as held:
        if not held:
            return set(), -1
        pins, live = live_pins(root, sweep=True)
        for p in stray_temporaries(root, no_live_builds=live == 0):
            with contextlib.suppress(OSError):
                p.unlink()
        return pins, live


def temporary_usage(root: Path) -> tuple[int, int]:
    """(files, bytes) of temporaries in the cache: staging directories' contents and stray files."""
    count = size = 0
    paths: list[Path] = list(stray_temporaries(root, no_live_builds=True))
    parent = root / TMP_DIR
    if parent.is_dir():
        for dirpath, _dirs, files in os.walk(parent):
            paths.extend(Path(dirpath, f) for f in files if f not in ("lock", "pins"))
    for p in paths:
        with contextlib.suppress(OSError):
            size += p.lstat().st_size
            count += 1
    return count, size
