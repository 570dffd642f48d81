"""Push an image index to a registry: every platform's blobs and manifest by digest (a blob the
platforms share goes up once: the later ones find it there), then the index by its tag, so that a tag
never names a manifest the registry does not hold. The platforms' referrers go up as nsbuild attaches
them to a single image (the referrers API, else the referrers tag).

This module imports nsbuild.registry (requests): import it only when a registry is the output."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nsbuild.core.progress import Progress, human
from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_OCI_MANIFEST, sha256_digest
from nsbuild.image.index import Attached, ImageIndex, PlatformManifest
from nsbuild.registry import BlobRecord, PushResult, RegistryOptions, push_manifest
from nsbuild.registry.reference import Reference
from nsbuild.registry.usage import TransferReporter
from nsbuild.sbom.attach import CREATED, TITLE, Artifact, Subject, artifact_manifest
from nsbuild.sbom.referrers import attach_to_registry


@dataclass(frozen=True)
class IndexPush:
    index: PushResult
    platforms: tuple[PushResult, ...]


def push_index(
    index: ImageIndex,
    target: Reference,
    *,
    options: RegistryOptions | None,
    progress: Progress,
    blob_record: BlobRecord | None = None,
) -> IndexPush:
    """`target` names the repository and the tag of the index."""
    reporter = TransferReporter(progress, "push")
    pushed = []
    for m in index.manifests:
        progress.info(f"pushing {m.platform.name} ({m.digest}, {len(m.blobs)} blobs)")
        blobs: dict[str, bytes | Path] = {}
        for blob in m.blobs:
            content = blob.data if blob.data is not None else blob.path
            assert content is not None
            blobs[blob.digest] = content
        by_digest = Reference(target.registry, target.repository, None, m.digest)
        result = push_manifest(
            by_digest,
            m.manifest,
            m.media_type,
            blobs=blobs,
            options=options,
            progress=reporter,
            blob_record=blob_record,
        )
        progress.info(
            f"pushed {m.platform.name}: {len(result.uploaded_blobs)} blobs uploaded ({human(result.uploaded_bytes)}), "
            f"{len(result.skipped_blobs)} already there, {len(result.mounted_blobs)} mounted"
        )
        pushed.append(result)
    tagged = Reference(target.registry, target.repository, target.tag or "latest", None)
    result = push_manifest(tagged, index.data, index.media_type, options=options, progress=reporter)
    progress.info(f"pushed {result.reference}@{result.digest} ({len(index.manifests)} platforms)")
    return IndexPush(result, tuple(pushed))


def push_referrers(m: PlatformManifest, target: Reference, options: RegistryOptions | None) -> str:
    """The platform's referrers as the registry finds them ("api" or "tag"; "" when it has none)."""
    if not m.referrers:
        return ""
    subject = Subject(m.media_type, m.digest, len(m.manifest))
    by_created: dict[str, list[Artifact]] = {}
    for referrer in m.referrers:
        created, artifact = _artifact(referrer, subject)
        by_created.setdefault(created, []).append(artifact)
    mode = ""
    for created, artifacts in by_created.items():
        mode = attach_to_registry(target, subject, artifacts, created=created, options=options).mode
    return mode


def _artifact(referrer: Attached, subject: Subject) -> tuple[str, Artifact]:
    """The document a referrer manifest carries, as nsbuild.sbom attaches it again: the same bytes
    come out (canonical JSON) or the referrer is not one this module can carry."""
    manifest, _config, *docs = referrer.blobs
    doc = json.loads(manifest)
    layers = doc.get("layers") or []
    if len(layers) != 1 or len(docs) != 1 or not isinstance(layers[0], dict):
        raise BuildError(f"referrer {sha256_digest(manifest)}: not a one-document artifact")
    title = (layers[0].get("annotations") or {}).get(TITLE, "")
    created = (doc.get("annotations") or {}).get(CREATED, "")
    artifact = Artifact(str(doc.get("artifactType") or layers[0].get("mediaType")), str(title), docs[0])
    if doc.get("mediaType") != MEDIA_OCI_MANIFEST or artifact_manifest(artifact, subject, created) != manifest:
        raise BuildError(f"referrer {sha256_digest(manifest)}: not an artifact nsbuild made; push it with oras")
    return created, artifact
