"""A layer is a value: produced once, consumed by every sink (DESIGN.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MEDIA_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MEDIA_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MEDIA_BY_COMPRESSOR = {"none": MEDIA_TAR, "gz": MEDIA_TAR_GZIP, "zstd": MEDIA_TAR_ZSTD}


@dataclass(frozen=True)
class Blob:
    """Bytes stored on disk under their digest."""

    digest: str  # "sha256:<hex>"
    size: int
    path: Path


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
