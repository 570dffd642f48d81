"""Write an image index (nsbuild.image.index) with every platform's image into an OCI layout or an
OCI archive: each blob once, however many platforms share it; index.json names the index by its tag,
and lists the platforms' referrers (SBOMs, provenance) beside it, as for a single image."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_OCI_INDEX, canonical_json
from nsbuild.image.index import BlobFile, ImageIndex
from nsbuild.layer.layer import Blob
from nsbuild.sinks.archive import OCI_LAYOUT, REF_NAME, ArchiveStream
from nsbuild.sinks.sinks import (
    AtomicFile,
    _atomic_bytes,
    _link_or_copy,
    _locked_layout,
    check_destination,
    check_ref_name,
    kept_manifests,
)


def layout_index_json(index: ImageIndex, tag: str, existing: list[dict[str, Any]] | None = None) -> bytes:
    """index.json: the entries that stay (other tags; not what is written again), the index tagged
    `tag`, then the platforms' referrers."""
    new = {d.get("digest") for d in index.referrer_descriptors()} | {index.digest}
    kept = [m for m in existing or [] if _tag_of(m) != tag and m.get("digest") not in new]
    entry = {
        "mediaType": index.media_type,
        "digest": index.digest,
        "size": len(index.data),
        "annotations": {REF_NAME: tag},
    }
    manifests = [*kept, entry, *index.referrer_descriptors()]
    return canonical_json({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests})


def _tag_of(entry: dict[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    return annotations.get(REF_NAME) if isinstance(annotations, dict) else None


def write_index_dir(index: ImageIndex, dest: Path, *, tag: str) -> None:
    """Add the index and its images to the OCI layout `dest` (created if missing) under `tag`,
    replacing what that tag named; the layout is locked as for a single image (sinks.write_oci_dir)."""
    check_ref_name(tag)
    check_destination("oci-dir", dest)
    with _locked_layout(dest) as created:
        try:
            check_destination("oci-dir", dest)
            _fill(index, dest, tag)
        except BaseException as exc:
            if created and not (dest / "index.json").exists():
                shutil.rmtree(dest, ignore_errors=True)
            if isinstance(exc, OSError):
                raise BuildError(f"{dest}: cannot write the OCI layout: {exc.strerror or exc}") from None
            raise


def _fill(index: ImageIndex, dest: Path, tag: str) -> None:
    layout = dest / "oci-layout"
    if not layout.exists():
        _atomic_bytes(layout, OCI_LAYOUT)
    blob_dir = dest / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    for blob in [*index.blobs(), BlobFile(index.digest, len(index.data), data=index.data)]:
        final = blob_dir / blob.digest.split(":", 1)[1]
        if final.exists() and final.stat().st_size == blob.size:
            continue
        if blob.data is not None:
            _atomic_bytes(final, blob.data)
        else:
            _link_or_copy(Blob(blob.digest, blob.size, blob.path), final)
    _atomic_bytes(dest / "index.json", layout_index_json(index, tag, kept_manifests(dest, tag)))


def write_index_archive(index: ImageIndex, path: Path, *, ref: str, mtime: int) -> None:
    """An OCI archive holding only the index (tagged `ref`) and its images; atomic."""
    check_ref_name(ref)
    with AtomicFile(path) as out:
        stream = ArchiveStream(out.file, mtime=mtime, envelope="none", name=str(out.path))
        stream.add_bytes("oci-layout", OCI_LAYOUT)
        for blob in [*index.blobs(), BlobFile(index.digest, len(index.data), data=index.data)]:
            name = "blobs/sha256/" + blob.digest.split(":", 1)[1]
            if blob.data is not None:
                stream.add_bytes(name, blob.data)
            else:
                assert blob.path is not None
                stream.add_file(name, blob.path, blob.size, blob.size)
        stream.add_bytes("index.json", layout_index_json(index, ref))
        stream.close()
