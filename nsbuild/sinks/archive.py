"""The outer archive of a docker-archive or an OCI archive, written front to back while the layers are built.

A layer that is next in line streams its bytes straight into the output file: its member header is
reserved first and filled in once the layer's digest and size are known (the file is seekable); any
other layer is built into a blob file and copied in when its turn comes (`copy_file_range`).  So a
one-layer image is written once, not built into a temporary file and copied.  Nothing is written
before the first layer that has to be built: when every layer came from the cache and the output file
already holds these exact bytes (nsbuild.cache.outputs), it is left as it is.

A compressed docker-archive (dockerTools compresses the whole archive) is a sequence of frames: each
layer's data is the layer blob itself, compressed while the layer was built (the OCI blob: one gzip
member or one zstd frame), and the tar headers between them are stored frames (gzip members with a
stored deflate block, zstd frames with a raw block) that can be filled in after the fact.  Any gzip or
zstd reader gives back the exact tar; the archive is never compressed a second time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from nsbuild.core.compress import Sink
from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Image, canonical_json
from nsbuild.layer.layer import MEDIA_BY_COMPRESSOR, Blob, Layer
from nsbuild.tar.owners import Owner
from nsbuild.tar.tarwriter import BLOCK, Entry, encode_header

# Bump whenever the archive bytes for the same image change (it keys the cache's output stamps).
ARCHIVE_VERSION = "nsbuild-archive-v2"
ARCHIVE_OWNER = Owner(0, 0, "", "")
OCI_LAYOUT = canonical_json({"imageLayoutVersion": "1.0.0"})
REF_NAME = "org.opencontainers.image.ref.name"
# A stored deflate block holds at most 65535 bytes; the same bound keeps zstd raw blocks small.
STORED_MAX = 65535
COPY_CHUNK = 1 << 20


class Envelope:
    """How the archive's own bytes (headers, small members) are framed: as they are, or as stored
    gzip members / raw zstd frames whose length does not depend on their content."""

    def __init__(self, kind: str) -> None:
        if kind not in ("none", "gz", "zstd"):
            raise ValueError(kind)
        self.kind = kind

    def header_len(self) -> int:
        return {"none": 0, "gz": 15, "zstd": 12}[self.kind]

    def frame(self, data: bytes) -> bytes:
        """One frame holding `data` verbatim (len(data) <= STORED_MAX)."""
        n = len(data)
        if self.kind == "none":
            return bytes(data)
        if self.kind == "gz":
            # RFC 1952 member (no name, mtime 0, OS unknown) around one final stored block (RFC 1951).
            head = (
                b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff\x01"
                + n.to_bytes(2, "little")
                + (n ^ 0xFFFF).to_bytes(2, "little")
            )
            return head + data + zlib.crc32(data).to_bytes(4, "little") + n.to_bytes(4, "little")
        # RFC 8878 frame: single segment, 4-byte content size, no checksum; one last raw block.
        return b"\x28\xb5\x2f\xfd\xa0" + n.to_bytes(4, "little") + ((n << 3) | 1).to_bytes(3, "little") + data

    def frames(self, data: bytes | bytearray) -> bytes:
        if self.kind == "none":
            return bytes(data)
        return b"".join(self.frame(bytes(data[i : i + STORED_MAX])) for i in range(0, len(data), STORED_MAX))

    def patch(self, fd: int, frame_offset: int, data: bytes) -> None:
        """Overwrite the content of a frame written by frame() with bytes of the same length."""
        os.pwrite(fd, data, frame_offset + self.header_len())
        if self.kind == "gz":
            os.pwrite(fd, zlib.crc32(data).to_bytes(4, "little"), frame_offset + self.header_len() + len(data))


@dataclass
class Slot:
    """A member whose header is written after its data: `length` reserved bytes at `offset`."""

    offset: int
    length: int
    out: Sink  # where the member's data goes, straight after the reserved header


class ArchiveStream:
    """A tar archive of a few members, written in order through an Envelope."""

    def __init__(self, out: BinaryIO, *, mtime: int, envelope: str, name: str | None = None) -> None:
        self.out = out
        self.name = name  # the output file, for errors
        self.mtime = mtime
        self.envelope = Envelope(envelope)
        self.dirs: set[str] = set()
        self.pending = bytearray()  # tar bytes not yet framed and written
        self.emitted = 0  # bytes written to `out` so far
        # Blob bytes go file-to-file in the kernel when the archive is a regular file (`nsbuild stream >
        # file` too); headers are filled in later only in an unbuffered one (the build's own output).
        self.copy_fd: int | None = None
        self.fd: int | None = None
        try:
            fd = out.fileno()
            if os.path.isfile(f"/proc/self/fd/{fd}"):
                self.copy_fd = fd
                if getattr(out, "raw", None) is None:
                    self.fd = fd
        except (AttributeError, OSError, ValueError):
            pass

    @property
    def seekable(self) -> bool:
        return self.fd is not None

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:  # an unbuffered file may take part of a write
                view = view[self.out.write(view) or 0 :]
        except OSError as exc:
            # A full disk while a layer streams in: say which file (a closed pipe stays what it is).
            if self.name is None or isinstance(exc, BrokenPipeError):
                raise
            raise BuildError(f"{self.name}: cannot write: {exc.strerror or exc}") from None
        self.emitted += len(data)

    def _emit_pending(self) -> None:
        if self.pending:
            self._write(self.envelope.frames(self.pending))
            self.pending = bytearray()

    def parents(self, name: str) -> bytes:
        out = b""
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                out += encode_header(
                    Entry(name=d.encode(), kind="dir", mode=0o755, uid=0, gid=0), ARCHIVE_OWNER, self.mtime
                )
        return out

    def member_header(self, name: str, size: int, *, blob: bool = False) -> bytes:
        """The header of a file member; a blob's carries its size in a PAX record whatever the size,
        so that it has the same length (1536 bytes) when it is reserved before the size is known."""
        entry = Entry(name=name.encode(), kind="file", mode=0o644, uid=0, gid=0, size=size)
        return encode_header(entry, ARCHIVE_OWNER, self.mtime, pax_size=blob)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.pending += self.parents(name) + self.member_header(name, len(data)) + data
        self.pending += b"\0" * (-len(data) % BLOCK)

    def add_file(self, name: str, path: Path, data_size: int, member_size: int) -> None:
        """A member whose data is the file's bytes; `member_size` is what the tar header says (the
        uncompressed size when the file is a compressed frame of a compressed docker-archive)."""
        self.pending += self.parents(name) + self.member_header(name, member_size, blob=True)
        self._emit_pending()
        with open(path, "rb") as f:
            remaining = data_size
            if self.copy_fd is not None:
                self.out.flush()
                remaining = _kernel_copy(f.fileno(), self.copy_fd, remaining)
                self.emitted += data_size - remaining
            while remaining:
                chunk = f.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise BuildError(f"{path}: blob shorter than recorded ({data_size} bytes)")
                self._write(chunk)
                remaining -= len(chunk)
        self.after_data(member_size)

    def reserve(self, length: int) -> Slot:
        assert self.fd is not None
        self._emit_pending()
        offset = os.lseek(self.fd, 0, os.SEEK_CUR)
        self._write(self.envelope.frame(b"\0" * length))
        return Slot(offset, length, _Counted(self))

    def fill(self, slot: Slot, header: bytes) -> None:
        assert self.fd is not None and len(header) == slot.length, (len(header), slot.length)
        self.envelope.patch(self.fd, slot.offset, header)

    def cancel(self, slot: Slot) -> None:
        """Forget a reserved member and everything written after it."""
        assert self.fd is not None
        os.ftruncate(self.fd, slot.offset)
        os.lseek(self.fd, slot.offset, os.SEEK_SET)
        self.emitted = slot.offset

    def after_data(self, member_size: int) -> None:
        self.pending += b"\0" * (-member_size % BLOCK)

    def close(self) -> None:
        self.pending += b"\0" * (2 * BLOCK)
        self._emit_pending()


class _Counted:
    """A slot's data writer: the archive file, counting what passes."""

    def __init__(self, stream: ArchiveStream) -> None:
        self.stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.stream._write(data)
        return len(data)


def _kernel_copy(src: int, dst: int, size: int) -> int:
    """copy_file_range (reflink or in-kernel copy); returns what is left to copy the slow way."""
    try:
        while size:
            n = os.copy_file_range(src, dst, min(size, 1 << 30))
            if n == 0:
                break
            size -= n
    except OSError:
        pass
    return size


# --- an image as an archive ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    name: str
    blob: Blob  # the bytes in the archive
    member_size: int  # the size in the tar header


class ImageArchive:
    """A docker-archive (`kind` "docker": layers, config, manifest.json, repositories; `envelope` its
    compression) or an OCI archive ("oci": oci-layout, blobs, index.json) of the image's layers at
    positions 0..n-1, which arrive in any order from the layer threads (`done`)."""

    def __init__(
        self, out: BinaryIO, *, kind: str, envelope: str, mtime: int, positions: int, name: str | None = None
    ) -> None:
        if kind == "oci" and envelope != "none":
            raise ValueError("an OCI archive is not compressed as a whole")
        self.kind = kind
        self.stream = ArchiveStream(out, mtime=mtime, envelope=envelope, name=name)
        self._layers: list[Layer | None] = [None] * positions
        self._written = 0  # positions 0.._written-1 are in the file (or skipped as repeats)
        self._slot: tuple[int, Slot] | None = None
        self._names: set[str] = set()
        self._lock = threading.Lock()
        if kind == "oci":
            self.stream.add_bytes("oci-layout", OCI_LAYOUT)

    def member(self, layer: Layer) -> _Member:
        if self.kind == "oci":
            return _Member("blobs/sha256/" + layer.digest.split(":", 1)[1], layer.compressed, layer.compressed.size)
        name = layer.diff_id.split(":", 1)[1] + "/layer.tar"
        compression = self.stream.envelope.kind  # a compressed docker-archive's layers are its frames
        if compression == "none":
            # A plain archive holds each layer's blob as it is, compressed or not: every loader
            # (docker, podman, skopeo, ctr) reads compressed layer files, and none a gzip archive.
            return _Member(name, layer.compressed, layer.compressed.size)
        if layer.media_type != MEDIA_BY_COMPRESSOR[compression]:
            raise BuildError(f"internal: layer {layer.diff_id} is {layer.media_type}, not the archive's {compression}")
        return _Member(name, layer.compressed, layer.tar.size)

    def claim(self, position: int) -> Slot | None:
        """A slot for the layer at `position` to stream into, if it is next in line and the file allows."""
        with self._lock:
            if not self.stream.seekable or self._slot is not None:
                return None
            if any(layer is None for layer in self._layers[self._written : position]):
                return None
            self._append_through(position)
            if self.kind == "oci":
                self.stream.pending += self.stream.parents("blobs/sha256/x")
            # docker: the member's directory (named by the digest) is part of the reserved header.
            slot = self.stream.reserve((BLOCK if self.kind == "docker" else 0) + 3 * BLOCK)
            self._slot = (position, slot)
            return slot

    def done(self, position: int, layer: Layer) -> None:
        with self._lock:
            self._layers[position] = layer
            if self._slot is None or self._slot[0] != position:
                return
            slot = self._slot[1]
            self._slot = None
            self._written = position + 1
            m = self.member(layer)
            if m.name in self._names:
                self.stream.cancel(slot)  # the same layer twice: once in the archive, as docker save does
                return
            self._names.add(m.name)
            header = self.stream.parents(m.name) + self.stream.member_header(m.name, m.member_size, blob=True)
            self.stream.fill(slot, header)
            self.stream.after_data(m.member_size)

    def _append_through(self, end: int) -> None:
        for position in range(self._written, end):
            layer = self._layers[position]
            assert layer is not None
            m = self.member(layer)
            if m.name not in self._names:
                if m.blob.path is None:
                    raise BuildError(f"internal: blob {m.blob.digest} was not kept on disk")
                self._names.add(m.name)
                self.stream.add_file(m.name, m.blob.path, m.blob.size, m.member_size)
        self._written = max(self._written, end)

    def metadata(self, image: Image, ref: str, referrers: Sequence[Referrer] = ()) -> list[tuple[str, bytes]]:
        """The members after the layers: docker `ref` is NAME:TAG, OCI `ref` the ref.name; an OCI
        archive's `referrers` (their blobs, each once) before its index.json lists them."""
        if self.kind == "oci":
            members = [
                ("blobs/sha256/" + image.config_digest.split(":", 1)[1], image.config),
                ("blobs/sha256/" + image.manifest_digest.split(":", 1)[1], image.manifest),
            ]
            for data in (blob for r in referrers for blob in r.blobs):
                name = "blobs/sha256/" + hashlib.sha256(data).hexdigest()
                if name not in self._names and name not in (m[0] for m in members):
                    members.append((name, data))
            return [*members, ("index.json", oci_index(image, ref, referrers=referrers))]
        config_name = image.config_digest.split(":", 1)[1] + ".json"
        layers = [self.member(layer).name for layer in image.layers]
        manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": layers}]
        repo, _, tag = ref.rpartition(":")
        top = image.layers[-1].diff_id.split(":", 1)[1] if image.layers else ""
        return [
            (config_name, image.config),
            ("manifest.json", canonical_json(manifest)),
            ("repositories", canonical_json({repo: {tag: top}})),
        ]

    def identity(self, image: Image, ref: str, referrers: Sequence[Referrer] = ()) -> str:
        """A digest of everything that decides the archive's bytes."""
        h = hashlib.sha256(
            json.dumps(
                [
                    ARCHIVE_VERSION,
                    self.kind,
                    self.stream.envelope.kind,
                    self.stream.mtime,
                    [(m.name, m.blob.digest, m.member_size) for m in (self.member(layer) for layer in image.layers)],
                ]
            ).encode()
        )
        for name, data in self.metadata(image, ref, referrers):
            h.update(b"\0%s\0%d\0" % (name.encode(), len(data)) + data)
        return h.hexdigest()

    @property
    def untouched(self) -> bool:
        """Nothing is in the file yet (every layer came from a blob on disk)."""
        return self.stream.emitted == 0

    def finish(self, image: Image, ref: str, referrers: Sequence[Referrer] = ()) -> None:
        with self._lock:
            if len(image.layers) != len(self._layers):
                raise BuildError("internal: the image's layers are not the archive's")
            for position, layer in enumerate(image.layers):
                if self._layers[position] is None:
                    self._layers[position] = layer
            self._append_through(len(self._layers))
            for name, data in self.metadata(image, ref, referrers):
                self.stream.add_bytes(name, data)
            self.stream.close()


@dataclass(frozen=True)
class Referrer:
    """An OCI 1.1 artifact (an SBOM, an attestation) whose subject is the image: its index.json
    descriptor (an artifactType, no tag) and the blobs it needs (its manifest, config and document).
    nsbuild.sbom makes them; a sink only stores them beside the image."""

    descriptor: dict[str, Any]
    blobs: tuple[bytes, ...]


def oci_index(image: Image, tag: str, existing: list[dict] | None = None, referrers: Sequence[Referrer] = ()) -> bytes:
    """The image tagged `tag`, then its referrers, after the `existing` entries that stay: other tags,
    and what is neither the image tagged `tag` before nor one of these referrers again."""
    new = {r.descriptor.get("digest") for r in referrers}
    manifests = [
        m for m in existing or [] if m.get("annotations", {}).get(REF_NAME) != tag and m.get("digest") not in new
    ]
    manifests.append(
        {
            "mediaType": MEDIA_OCI_MANIFEST,
            "digest": image.manifest_digest,
            "size": len(image.manifest),
            "annotations": {REF_NAME: tag},
        }
    )
    manifests += [r.descriptor for r in referrers]
    return canonical_json({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests})


def stale_referrers(existing: list[dict], tag: str, subject_of: Callable[[dict], str | None]) -> list[dict]:
    """`existing` without the referrers of the image that the new one tagged `tag` replaces (unless
    another tag still names that image); `subject_of`: an entry's subject digest, None if it has none."""
    tagged = [m for m in existing if REF_NAME in m.get("annotations", {})]
    replaced = {m.get("digest") for m in tagged if m["annotations"][REF_NAME] == tag}
    replaced -= {m.get("digest") for m in tagged if m["annotations"][REF_NAME] != tag}
    if not replaced:
        return existing
    return [m for m in existing if REF_NAME in m.get("annotations", {}) or subject_of(m) not in replaced]
