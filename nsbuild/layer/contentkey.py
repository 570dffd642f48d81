"""Content fingerprints of layers (nsbuild.build.remote's docstring), and checking a layer tar against one.

A layer tar from a shared cache is somebody else's bytes.  The content fingerprint this build computed
from its own inputs pins down every byte the writer would emit: the headers verbatim, each file's data
by its sha256.  check_tar reads a tar the way the writer writes it (header blocks, data, zero padding,
two zero blocks, nothing after), rebuilds the fingerprint from what it holds and compares: a tar that
passes is the tar this build would have written, so a record cannot put other content in the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import zstandard

from nsbuild.core.compress import compression_of, open_decompressed
from nsbuild.layer.layer import Blob
from nsbuild.tar.owners import OwnerPolicy
from nsbuild.tar.tarwriter import FORMAT_VERSION  # the writer's version: its bytes for these inputs

# Bump when the content fingerprint itself changes (the writer's FORMAT_VERSION is hashed in too).
CONTENT_VERSION = "nsbuild-content-v1"
BLOCK = 512
ZERO = b"\0" * BLOCK
CHUNK = 1 << 20


class TarMismatch(Exception):
    """The tar is not what the writer would have written for the fingerprinted content."""


def content_hasher(*, mtime: int, owner: OwnerPolicy, overlay_whiteouts: bool) -> hashlib._Hash:
    """The fingerprint's hash with the layer-wide parameters in; entries follow."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [CONTENT_VERSION, FORMAT_VERSION, mtime, owner.to_json(), overlay_whiteouts], sort_keys=True
        ).encode()
    )
    return h


def file_record(digest: bytes, size: int) -> bytes:
    """What a file's data contributes: its sha256 and its size."""
    return digest + size.to_bytes(8, "big")


def check_tar(
    read: Callable[[int], bytes], key: str, *, mtime: int, owner: OwnerPolicy, overlay_whiteouts: bool = False
) -> None:
    """Raise TarMismatch unless the tar that `read` yields has the content fingerprint `key`."""
    h = content_hasher(mtime=mtime, owner=owner, overlay_whiteouts=overlay_whiteouts)
    while True:
        block = _exact(read, BLOCK)
        if block == ZERO:
            if _exact(read, BLOCK) != ZERO or read(1):
                raise TarMismatch("the end of the archive is not two zero blocks")
            break
        header, size, typeflag = _header(read, block)
        h.update(header)
        if size:
            if typeflag != b"0":
                raise TarMismatch("data in an entry that is not a regular file")
            h.update(file_record(_hash_data(read, size), size))
            if _exact(read, -size % BLOCK).strip(b"\0"):
                raise TarMismatch("padding that is not zeros")
    if h.hexdigest() != key:
        raise TarMismatch("its content is not the content this build has")


def _header(read: Callable[[int], bytes], block: bytes) -> tuple[bytes, int, bytes]:
    """An entry's header bytes (a PAX extended header and its ustar block), data size and type."""
    header = block
    pax_size = None
    if block[156:157] == b"x":
        n = _octal(block[124:136])
        body = _exact(read, n + (-n % BLOCK))
        pax_size = _pax_size(body[:n])
        block = _exact(read, BLOCK)
        if block == ZERO or block[156:157] == b"x":
            raise TarMismatch("a PAX header without its entry")
        header += body + block
    size = pax_size if pax_size is not None else _octal(block[124:136])
    return header, size, block[156:157]


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarMismatch(f"a header number that is not octal ({field!r})") from None


def _pax_size(body: bytes) -> int | None:
    """The `size` record of a PAX body, if any (the writer uses it above the ustar limit)."""
    pos = 0
    size = None
    while pos < len(body):
        length_text, sep, _ = body[pos : pos + 24].partition(b" ")
        if not sep or not length_text.isdigit() or int(length_text) <= 0:
            raise TarMismatch("a malformed PAX record")
        record = body[pos : pos + int(length_text)]
        key, _, value = record[len(length_text) + 1 : -1].partition(b"=")
        if key == b"size":
            if not value.isdigit():
                raise TarMismatch("a malformed PAX size")
            size = int(value)
        pos += int(length_text)
    return size


def _exact(read: Callable[[int], bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = read(n - len(out))
        if not chunk:
            raise TarMismatch("the archive is truncated")
        out += chunk
    return out


def _hash_data(read: Callable[[int], bytes], size: int) -> bytes:
    h = hashlib.sha256()
    left = size
    while left:
        chunk = read(min(left, CHUNK))
        if not chunk:
            raise TarMismatch("the archive is truncated")
        h.update(chunk)
        left -= len(chunk)
    return h.digest()


class TeeReader:
    """Reads from `src`, hashing (the tar's diff_id) and optionally copying what it reads."""

    def __init__(self, src: BinaryIO, out: BinaryIO | None) -> None:
        self.src = src
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int) -> bytes:
        data = self.src.read(n)
        if data:
            self.hash.update(data)
            self.size += len(data)
            if self.out is not None:
                self.out.write(data)
        return data

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def verified_tar(blob: Blob, *, diff_id: str, key: str, mtime: int, owner: OwnerPolicy, save_dir: Path | None) -> Blob:
    """The layer tar of a downloaded `blob` (a tar, or compressed), checked against the content
    fingerprint `key` and the recorded `diff_id` (TarMismatch otherwise); kept in `save_dir` when given
    and the blob is compressed.  Nothing half-written stays behind."""
    assert blob.path is not None
    plain = compression_of(blob.path) == "none"
    tmp = save_dir / f".{uuid.uuid4().hex}.{os.getpid()}.tmp" if save_dir is not None and not plain else None
    try:
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(open(blob.path, "rb") if plain else open_decompressed(blob.path))  # noqa: SIM115
            out = stack.enter_context(open(tmp, "wb")) if tmp is not None else None
            tee = TeeReader(src, out)
            check_tar(tee.read, key, mtime=mtime, owner=owner)
        if tee.digest != diff_id:
            raise TarMismatch(f"its tar is {tee.digest}, the record says {diff_id}")
        if plain:
            return Blob(diff_id, tee.size, blob.path)
        if tmp is None:
            return Blob(diff_id, tee.size, None)
        final = tmp.with_name(diff_id.split(":", 1)[1])
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        return Blob(diff_id, tee.size, final)
    except (OSError, EOFError, ValueError, zstandard.ZstdError) as exc:
        raise TarMismatch(f"it cannot be read ({exc})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
