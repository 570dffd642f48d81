"""A tar file that may be compressed: which compression (by magic bytes), a plain reader, and whether it
is a tar at all (for `{"tar": …}` spec entries, nsbuild.spec, and their reader, nsbuild.tar.tarinput)."""

from __future__ import annotations

import lzma
from pathlib import Path
from typing import BinaryIO, cast

import zstandard
from isal import igzip_threaded

READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


def compression_of_tar(path: Path) -> str:
    """none, gz, zstd or xz by the file's magic bytes (its name says nothing)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return "gz"
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if magic == b"\xfd7zXZ\x00":
        return "xz"
    return "none"


def open_plain(path: Path) -> BinaryIO:
    kind = compression_of_tar(path)
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller
    if kind == "gz":
        return cast(BinaryIO, igzip_threaded.open(f, "rb"))
    if kind == "zstd":
        return cast(BinaryIO, zstandard.ZstdDecompressor().stream_reader(f, closefd=True, read_across_frames=True))
    if kind == "xz":
        return cast(BinaryIO, lzma.open(f, "rb"))
    return f


def not_a_tar(path: Path) -> str | None:
    """Why the file is not a tar (plain or compressed), or None: its first header block must carry a
    valid checksum.  What is wrong further in is found when the build reads it."""
    try:
        with open_plain(path) as f:
            block = f.read(512)
    except READ_ERRORS as exc:
        return f"cannot be read as {compression_of_tar(path)}: {exc}"
    if len(block) < 512:
        return "shorter than one tar header"
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return "its first 512 bytes are not a tar header (no checksum)"
    if stored != 256 + sum(block) - sum(block[148:156]):
        return "its first 512 bytes are not a tar header (bad checksum)"
    return None
