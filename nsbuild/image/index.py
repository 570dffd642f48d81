"""Image indexes (multi-platform images): the OCI image index and the Docker manifest list, as values
that every sink (OCI layout, OCI archive, registry) writes the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsbuild.image.image import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    canonical_json,
    sha256_digest,
)

MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
# The index type that goes with the platforms' manifest type, and the config type of each.
INDEX_OF_MANIFEST = {MEDIA_OCI_MANIFEST: MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST: MEDIA_DOCKER_LIST}
CONFIG_OF_MANIFEST = {MEDIA_OCI_MANIFEST: MEDIA_OCI_CONFIG, MEDIA_DOCKER_MANIFEST: MEDIA_DOCKER_CONFIG}


@dataclass(frozen=True)
class BlobFile:
    """A blob a manifest names, verified, on disk (`path`) or in memory (`data`)."""

    digest: str
    size: int
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Attached:
    """A referrer (SBOM, provenance) of one platform's manifest: its descriptor as an OCI layout's
    index.json lists it, and the blobs it needs (its manifest, config and document)."""

    descriptor: dict[str, Any]
    blobs: tuple[bytes, ...]


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def as_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    @property
    def name(self) -> str:
        return "/".join([self.os, self.architecture] + ([self.variant] if self.variant else []))


@dataclass(frozen=True)
class PlatformManifest:
    """One platform's image: its manifest's exact bytes and type, the blobs it names (config first,
    then the layers, each once) and its referrers."""

    platform: Platform
    manifest: bytes
    media_type: str
    blobs: tuple[BlobFile, ...]
    referrers: tuple[Attached, ...] = ()

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest),
            "platform": self.platform.as_json(),
        }


@dataclass(frozen=True)
class ImageIndex:
    """An index of platform images, in the order given. `raw` is the index's bytes when it was read
    (kept as they are: its digest is what a tag names), None for one made here. `annotations` go into
    an OCI image index made here; a Docker manifest list has no place for them (none are written)."""

    manifests: tuple[PlatformManifest, ...]
    media_type: str = MEDIA_OCI_INDEX
    raw: bytes | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def data(self) -> bytes:
        if self.raw is not None:
            return self.raw
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "manifests": [m.descriptor() for m in self.manifests],
        }
        if self.annotations and self.media_type == MEDIA_OCI_INDEX:
            doc["annotations"] = dict(sorted(self.annotations.items()))
        return canonical_json(doc)

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    def blobs(self) -> list[BlobFile]:
        """Every blob of every platform (layers shared between platforms once), then the platforms'
        manifests, then their referrers' blobs: the order a writer stores them in."""
        out: dict[str, BlobFile] = {}
        for m in self.manifests:
            for blob in m.blobs:
                out.setdefault(blob.digest, blob)
        for m in self.manifests:
            out.setdefault(m.digest, BlobFile(m.digest, len(m.manifest), data=m.manifest))
        for m in self.manifests:
            for data in (b for r in m.referrers for b in r.blobs):
                digest = sha256_digest(data)
                out.setdefault(digest, BlobFile(digest, len(data), data=data))
        return list(out.values())

    def referrer_descriptors(self) -> list[dict[str, Any]]:
        return [r.descriptor for m in self.manifests for r in m.referrers]


def duplicate_platform(platforms: list[Platform]) -> Platform | None:
    """The first platform given twice (arm64 and arm64/v8 are the same), None if each is once."""
    seen: set[tuple[str, str, str]] = set()
    for p in platforms:
        key = (p.os, p.architecture, p.variant or ("v8" if p.architecture == "arm64" else ""))
        if key in seen:
            return p
        seen.add(key)
    return None
