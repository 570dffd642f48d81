"""SBOMs and attestations as OCI 1.1 artifacts whose `subject` is the image manifest, in an OCI layout.

Each document is an image manifest with `artifactType` set to the document's media type, the empty
config (`application/vnd.oci.empty.v1+json`, `{}`) and the document as its one layer. The layout's
index.json lists it beside the image, with its `artifactType` and without a ref.name, so that a
tag still names exactly the image (skopeo `oci:DIR:TAG`), and a reader finds the referrers of a
manifest by the `subject` of the manifests the index lists. Attaching again replaces what was attached
to the same subject with the same artifact type.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, canonical_json, sha256_digest

MEDIA_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"


@dataclass(frozen=True)
class Artifact:
    """One document to attach: its media type (the artifactType too), a file name, its bytes."""

    media_type: str
    filename: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)


@dataclass(frozen=True)
class Subject:
    """The descriptor of the image manifest the artifacts refer to."""

    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def subject_of(manifest: bytes, media_type: str = MEDIA_OCI_MANIFEST) -> Subject:
    return Subject(media_type, sha256_digest(manifest), len(manifest))


def artifact_manifest(artifact: Artifact, subject: Subject, created: str = "") -> bytes:
    """The artifact's manifest (canonical JSON: its digest depends only on the inputs)."""
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": artifact.media_type,
        "config": {"mediaType": MEDIA_EMPTY, "digest": sha256_digest(EMPTY_CONFIG), "size": len(EMPTY_CONFIG)},
        "layers": [
            {
                "mediaType": artifact.media_type,
                "digest": artifact.digest,
                "size": len(artifact.data),
                "annotations": {TITLE: artifact.filename},
            }
        ],
        "subject": subject.descriptor(),
    }
    if created:
        manifest["annotations"] = {CREATED: created}
    return canonical_json(manifest)


def referrer_descriptor(artifact: Artifact, manifest: bytes) -> dict[str, Any]:
    """How an index (index.json, a referrers list) names the artifact's manifest."""
    doc = json.loads(manifest)
    desc: dict[str, Any] = {
        "mediaType": MEDIA_OCI_MANIFEST,
        "digest": sha256_digest(manifest),
        "size": len(manifest),
        "artifactType": artifact.media_type,
    }
    if doc.get("annotations"):
        desc["annotations"] = doc["annotations"]
    return desc


def _write_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    if path.is_file() and path.stat().st_size == len(data):
        return digest
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return digest


def atomic_write(path: Path, data: bytes) -> None:
    """`data` as `path` (0644), through a temporary file beside it: never a partial file."""
    path = path.absolute()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _subject_and_type(layout: Path, desc: dict[str, Any]) -> tuple[str, str] | None:
    """(subject digest, artifactType) of an index entry that is an artifact, else None."""
    if "artifactType" not in desc or not isinstance(desc.get("digest"), str):
        return None
    path = layout / "blobs" / "sha256" / desc["digest"].split(":", 1)[-1]
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    if not isinstance(subject, dict):
        return None
    return str(subject.get("digest")), str(desc["artifactType"])


def attach_to_layout(layout: Path, subject: Subject, artifacts: list[Artifact], created: str = "") -> list[dict]:
    """Write `artifacts` into the OCI layout at `layout` as referrers of `subject` (which must be there);
    the index.json descriptors added, in the order given."""
    index_path = layout / "index.json"
    try:
        index = json.loads(index_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BuildError(f"{layout}: not an OCI layout with a readable index.json ({exc})") from None
    if not (layout / "blobs" / "sha256" / subject.digest.split(":", 1)[1]).is_file():
        raise BuildError(f"{layout}: the image {subject.digest} is not in the layout")
    _write_blob(layout, EMPTY_CONFIG)
    added = []
    for artifact in artifacts:
        _write_blob(layout, artifact.data)
        manifest = artifact_manifest(artifact, subject, created)
        _write_blob(layout, manifest)
        added.append(referrer_descriptor(artifact, manifest))
    replaced = {(subject.digest, a.media_type) for a in artifacts}
    kept = [m for m in index.get("manifests") or [] if _subject_and_type(layout, m) not in replaced]
    index["manifests"] = kept + added
    index.setdefault("schemaVersion", 2)
    index.setdefault("mediaType", MEDIA_OCI_INDEX)
    atomic_write(index_path, canonical_json(index))
    return added


def layout_referrers(layout: Path, digest: str) -> list[dict[str, Any]]:
    """The index.json entries of `layout` whose manifests have `digest` as their subject."""
    index = json.loads((layout / "index.json").read_bytes())
    return [m for m in index.get("manifests") or [] if (_subject_and_type(layout, m) or ("",))[0] == digest]
