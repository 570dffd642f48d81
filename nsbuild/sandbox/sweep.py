"""What builds killed outright (`kill -9`, a power cut) leave behind, found and removed by the next one.

A build holds an exclusive flock(2) on each temporary thing it owns for as long as it lives: its
workspace (a lock file inside it) and each temporary output file (the file itself). The kernel drops
the lock when the process dies, however it dies, so a lock that can be taken marks a leftover of a dead
build; a live build's lock cannot be taken, and its files are never touched.

Creating and locking is two steps: a sweeper may take the lock in between and remove the new thing.
The creator notices (the path no longer leads to the file it locked) and makes another.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from pathlib import Path

from nsbuild.sandbox.cleanup import remove_tree

LOCK = ".nsbuild-lock"
WORKSPACE_PREFIX = "nsbuild-"
# tempfile.mkdtemp/mkstemp names: the prefix, then 8 characters of its alphabet.
_RANDOM = r"[a-z0-9_]{8}"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def new_workspace(parent: Path) -> tuple[Path, int]:
    """A fresh private directory under parent and the fd holding its lock (close it after removal)."""
    while True:
        root = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=parent))
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            continue  # swept before it held its lock
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while a sweeper that took it removes the tree
        if _same_file(fd, root / LOCK):
            return root, fd
        os.close(fd)


def sweep_workspaces(parent: Path) -> None:
    """Remove the workspaces under parent that belong to this user and whose build is dead (files owned
    by subordinate ids go through the user namespace: nsbuild.sandbox.cleanup.remove_tree)."""
    for entry in _own_entries(parent, re.compile(re.escape(WORKSPACE_PREFIX) + _RANDOM)):
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                _sweep_one(Path(entry.path))


def _own_entries(directory: Path, pattern: re.Pattern[str]) -> list[os.DirEntry[str]]:
    """The entries of directory whose name matches pattern and that this user owns (never followed)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    me = os.getuid()
    out = []
    for entry in entries:
        if pattern.fullmatch(entry.name):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == me:
                    out.append(entry)
    return out


def _sweep_one(root: Path) -> None:
    try:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        # Died before it held a lock (or is about to take one): only an empty directory can be that.
        with contextlib.suppress(OSError):
            os.rmdir(root)
        return
    try:
        if _try_lock(fd) and _same_file(fd, root / LOCK):
            remove_workspace(root)
    finally:
        os.close(fd)


def remove_workspace(root: Path) -> None:
    """Remove a workspace whose lock the caller holds: the lock file goes last, so a build killed
    while removing leaves a tree that still has it (the next sweep finishes the job), or an empty one."""
    import shutil

    try:
        names = sorted(os.listdir(root))
    except OSError:
        return
    for name in names:
        if name != LOCK:
            with contextlib.suppress(Exception):  # a plain removal follows anyway
                remove_tree(root / name)
            shutil.rmtree(root / name, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(root / LOCK)
    with contextlib.suppress(OSError):
        os.rmdir(root)


def locked_temp_file(directory: Path, prefix: str, suffix: str) -> tuple[int, str, int]:
    """mkstemp in directory, locked: (fd, path, lock fd). The lock fd (a dup: closing the file does not
    drop the lock) is closed once the file is renamed into place or removed."""
    while True:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
        if _try_lock(fd) and _same_file(fd, Path(name)):
            return fd, name, os.dup(fd)
        os.close(fd)  # a sweeper took it between mkstemp and the lock


def sweep_temp_files(directory: Path, prefix: str, suffix: str) -> None:
    """Remove this user's unlocked temporary files prefix+RANDOM+suffix in directory (dead builds')."""
    for entry in _own_entries(directory, re.compile(re.escape(prefix) + _RANDOM + re.escape(suffix))):
        with contextlib.suppress(OSError):
            if not entry.is_file(follow_symlinks=False):
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if _try_lock(fd) and _same_file(fd, Path(entry.path)):
                    os.unlink(entry.path)
            finally:
                os.close(fd)
