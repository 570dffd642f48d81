"""mount(2)/umount2(2) through libc: Python has no binding, and util-linux may be absent in images."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _b(value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    if value is None:
        return None
    return os.fsencode(value)


def mount(
    source: str | None, target: str | os.PathLike[str], fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    buf = _b(data)
    rc = _libc.mount(_b(source), _b(target), _b(fstype), flags, ctypes.c_char_p(buf) if buf else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {os.fsdecode(target)}: {os.strerror(err)}")


def umount(target: str | os.PathLike[str], flags: int = MNT_DETACH) -> None:
    if _libc.umount2(_b(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {os.fsdecode(target)}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2); os.unshare only exists from Python 3.12."""
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
