"""A layer is a value: produced once, consumed by every sink (DESIGN.md §1)."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from nsbuild.core.compress import Compressor, HashingWriter, Pipelined, Sink, open_decompressed
from nsbuild.errors import BuildError
from nsbuild.tar.fasttree import write_tar
from nsbuild.tar.owners import OwnerPolicy
from nsbuild.tar.tarinput import TarLayer
from nsbuild.tar.tarwriter import Source, write_entries

MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

MEDIA_BY_COMPRESSOR = {"none": MEDIA_TAR, "gz": MEDIA_TAR_GZIP, "zstd": MEDIA_TAR_ZSTD}
COMPRESSION_OF_MEDIA = {MEDIA_TAR: "none", MEDIA_TAR_GZIP: "gz", MEDIA_TAR_ZSTD: "zstd"}


@dataclass(frozen=True)
class Blob:
    """Bytes stored on disk under their digest."""

    digest: str  # "sha256:<hex>"
    size: int
    path: Path | None  # None: only the digest was needed (the bytes went straight to a sink)


@dataclass(frozen=True)
class Layer:
    """One image layer.

    `diff_id` is the digest of the uncompressed tar (config rootfs.diff_ids); `tar` is that tar on
    disk.  `compressed` holds the blob as it is referenced by an OCI manifest (equal to `tar` when the
    compressor is "none").  `comment` becomes the history entry's `created_by`/`comment`.
    """

    diff_id: str
    tar: Blob
    compressed: Blob
    media_type: str
    comment: str
    empty: bool = False
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.compressed.digest

    @property
    def size(self) -> int:
        return self.compressed.size


def file_digest(path: Path) -> str:
    """`sha256:<hex>` of a file's bytes (to re-check a blob that someone else may have written)."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def copy_verified(src: IO[bytes], dest_dir: Path, expected: str | None, what: str) -> Blob:
    """Store `src`'s bytes in `dest_dir` under their digest, refused unless it is `expected` (when
    given); a failure leaves no temporary file (dest_dir may be the shared layer cache)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir / f".tmp-{uuid.uuid4().hex}"
    h = HashingWriter(None)
    try:
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                h.write(chunk)
                out.write(chunk)
        if expected is not None and h.digest != expected:
            raise BuildError(
                f"{what}: digest mismatch: expected {expected}, the data has {h.digest} (corrupted or truncated)"
            )
        final = dest_dir / h.digest.split(":", 1)[1]
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Blob(h.digest, h.size, final)


def decompress_verified(src: Path, dest_dir: Path, expected_diff_id: str | None, what: str) -> Blob:
    """The layer tar inside the compressed blob `src`, stored by copy_verified."""
    try:
        with open_decompressed(src) as f:
            return copy_verified(f, dest_dir, expected_diff_id, what)
    except (OSError, EOFError) as exc:
        raise BuildError(f"{what}: cannot decompress: {exc}") from None


def check_blobs(blobs: list[Blob]) -> None:
    """Hash every blob file again before it is read for something else than its copy (a registry push,
    the SBOM's package scan): a cached blob damaged where its stamp cannot see (the disk, the raw
    device) must not reach a registry, nor be read as if it were the layer."""
    for blob in blobs:
        if blob.path is not None and file_digest(blob.path) != blob.digest:
            raise BuildError(
                f"{blob.path}: the blob {blob.digest[:19]} is corrupted (its bytes have another "
                "digest); run `nsbuild cache verify` and build again"
            )


# --- producing layers ------------------------------------------------------------------------------


class _Tee:
    def __init__(self, *outs: object) -> None:
        self.outs = [out for out in outs if out is not None]

    def write(self, data: bytes | bytearray | memoryview) -> int:
        for out in self.outs:
            out.write(data)  # type: ignore[attr-defined]
        return len(data)


def _store_blob(tmp: Path, digest: str, size: int, blob_dir: Path) -> Blob:
    final = blob_dir / digest.split(":", 1)[1]
    if final.exists():
        tmp.unlink()
    else:
        os.replace(tmp, final)
    return Blob(digest, size, final)


@dataclass(frozen=True)
class LayerRequest:
    """What one new layer holds and what of it stays on disk (build_layer).

    `keep_blob` False: no compressed blob file, only its digest and size (then `keep_tar` decides alone
    what stays on disk).
    """

    sources: list[Source]
    mtime: int
    owner: OwnerPolicy
    compression: str
    keep_tar: bool
    comment: str
    keep_blob: bool = True
    tar: TarLayer | None = None  # the layer is this tar's members (`sources` is empty)


def build_layer(
    request: LayerRequest,
    blob_dir: Path,
    *,
    watch: Callable[[HashingWriter], None] | None = None,
    cancel: threading.Event | None = None,
    blob_out: Sink | None = None,
) -> Layer:
    """Write one layer in one pass: tar → (diff_id hash, optional tar file, optional compressed blob).

    `blob_out` also gets the layer's blob as it is made (the compressed stream; the tar itself when
    the compression is "none"): the output archive it streams into.
    """
    blob_dir.mkdir(parents=True, exist_ok=True)
    unique = uuid.uuid4().hex
    tmp_tar = blob_dir / f".tmp-{unique}.tar"
    tmp_blob = blob_dir / f".tmp-{unique}.blob"
    compression = request.compression
    compressed_kept = compression != "none" and request.keep_blob
    tar_file = open(tmp_tar, "wb", buffering=0) if request.keep_tar else None  # noqa: SIM115
    blob_file = open(tmp_blob, "wb", buffering=0) if compressed_kept else None  # noqa: SIM115
    try:
        tar_hash = HashingWriter(_Tee(tar_file, blob_out if compression == "none" else None))
        if watch is not None:
            watch(tar_hash)
        blob_hash = HashingWriter(_Tee(blob_file, blob_out)) if compression != "none" else None
        _write_layer_tar(request, tar_hash, blob_hash, cancel)
    except BaseException:
        for f, p in ((tar_file, tmp_tar), (blob_file, tmp_blob)):
            if f is not None:
                f.close()
                p.unlink(missing_ok=True)
        raise
    for f in (tar_file, blob_file):
        if f is not None:
            f.close()
    tar_blob = (
        _store_blob(tmp_tar, tar_hash.digest, tar_hash.size, blob_dir)
        if request.keep_tar
        else Blob(tar_hash.digest, tar_hash.size, None)
    )
    compressed = tar_blob
    if blob_hash is not None:
        compressed = (
            _store_blob(tmp_blob, blob_hash.digest, blob_hash.size, blob_dir)
            if compressed_kept
            else Blob(blob_hash.digest, blob_hash.size, None)
        )
    return Layer(
        diff_id=tar_hash.digest,
        tar=tar_blob,
        compressed=compressed,
        media_type=MEDIA_BY_COMPRESSOR[compression],
        comment=request.comment,
    )


def _write_layer_tar(
    request: LayerRequest, tar_hash: HashingWriter, blob_hash: HashingWriter | None, cancel: threading.Event | None
) -> None:
    """The tar into `tar_hash` and, compressed, into `blob_hash` (when there is one), in one pass."""
    # The tar's hash and the compressor each in a thread of their own: hashing the uncompressed stream
    # runs beside the compressor's feeding, not before it (a zstd layer then costs what `tar | zstd`
    # does).  Both get the same chunk objects, which nobody changes after handing them over.
    compressor = None
    pipes = [Pipelined(tar_hash)]
    if blob_hash is not None:
        compressor = Compressor(request.compression, blob_hash)
        pipes.append(Pipelined(compressor))
    try:
        out = _Tee(*pipes)
        if request.tar is not None:
            write_entries(iter(request.tar.entries), out, mtime=request.mtime, owner=request.owner, cancel=cancel)
        else:
            write_tar(request.sources, out, mtime=request.mtime, owner=request.owner, cancel=cancel)
    finally:
        _close_all(pipes)
    if compressor is not None:
        compressor.close()


def _close_all(pipes: list[Pipelined]) -> None:
    """Close every pipe (each thread ends), then raise the first one's error."""
    errors: list[BaseException] = []
    for pipe in pipes:
        try:
            pipe.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other pipes
            errors.append(exc)
    if errors:
        raise errors[0]


def layer_from_tar(
    tar_path: Path, blob_dir: Path, *, compression: str, comment: str, expected_diff_id: str | None = None
) -> Layer:
    """A layer from an uncompressed tar already on disk (a script's layer, a base image's layer)."""
    blob_dir.mkdir(parents=True, exist_ok=True)
    tmp_blob = blob_dir / f".tmp-{uuid.uuid4().hex}.blob"
    tar_hash = HashingWriter(None)
    blob_hash = None
    blob_file = open(tmp_blob, "wb", buffering=0) if compression != "none" else None  # noqa: SIM115
    try:
        outs: list[object] = [tar_hash]
        compressor = None
        if blob_file is not None:
            blob_hash = HashingWriter(blob_file)
            compressor = Compressor(compression, blob_hash)
            outs.append(compressor)
        tee = _Tee(*outs)
        with open(tar_path, "rb") as f:
            while chunk := f.read(1 << 20):
                tee.write(chunk)
        if compressor is not None:
            compressor.close()
    except BaseException:
        if blob_file is not None:
            blob_file.close()
            tmp_blob.unlink(missing_ok=True)
        raise
    if blob_file is not None:
        blob_file.close()
    if expected_diff_id is not None and tar_hash.digest != expected_diff_id:
        tmp_blob.unlink(missing_ok=True)
        raise BuildError(f"{tar_path}: content digest {tar_hash.digest} does not match {expected_diff_id}")
    final_tar = blob_dir / tar_hash.digest.split(":", 1)[1]
    if tar_path != final_tar:
        if final_tar.exists():
            tar_path.unlink()
        else:
            os.replace(tar_path, final_tar)
    tar_blob = Blob(tar_hash.digest, tar_hash.size, final_tar)
    compressed = tar_blob
    if blob_hash is not None:
        compressed = _store_blob(tmp_blob, blob_hash.digest, blob_hash.size, blob_dir)
    return Layer(
        diff_id=tar_hash.digest,
        tar=tar_blob,
        compressed=compressed,
        media_type=MEDIA_BY_COMPRESSOR[compression],
        comment=comment,
    )
