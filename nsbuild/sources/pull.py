"""A `docker://` fromImage: pulled into the layer cache (or the workspace), checked, and read as a BaseImage."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsbuild.core.progress import Progress, human
from nsbuild.errors import BuildError
from nsbuild.image.image import OCI_LAYER_OF_DOCKER
from nsbuild.layer.layer import COMPRESSION_OF_MEDIA, MEDIA_TAR, Blob, Layer, decompress_verified, file_digest
from nsbuild.registry import PulledBlob, PulledImage, RegistryOptions, pull_image
from nsbuild.registry.client import RegistryClient
from nsbuild.registry.pull import INDEX_TYPES, descriptor, fetch_manifest, index_entries, is_sha256, parse_document
from nsbuild.registry.reference import Reference
from nsbuild.registry.usage import TransferReporter, registry_reference
from nsbuild.sources.baseimage import BaseImage, check_layer_tar
from nsbuild.sources.indexsource import index_report

BASE_DIGEST = "org.opencontainers.image.base.digest"
BASE_NAME = "org.opencontainers.image.base.name"


@dataclass
class PulledBase:
    base: BaseImage
    pulled: PulledImage
    annotations: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": str(self.pulled.reference),
            "digest": self.pulled.resolved_digest,
            "manifest_digest": self.pulled.digest,
            "pinned": self.pulled.pinned,
            "downloaded": len(self.pulled.downloaded_blobs),
            "cached": len(self.pulled.cached_blobs),
            "downloaded_bytes": self.pulled.downloaded_bytes,
        }


def _verify_cached(pulled: PulledImage, store_dir: Path) -> list[str]:
    """pull_image trusts a blob already on disk when its size matches; a cache is shared with other
    writers, so hash those again. Returns the digests that were wrong (and removes them)."""
    bad = []
    for digest in pulled.cached_blobs:
        path = store_dir / digest.split(":", 1)[1]
        if path.exists() and file_digest(path) != digest:
            path.unlink()
            bad.append(digest)
    return bad


def _decompress_verified(src: Path, blob_dir: Path, diff_id: str, what: str) -> Blob:
    """decompress_verified into the layer cache's store, reusing a tar already there (re-hashed: the
    store is shared with other writers); stored read-only like every cached blob."""
    final = blob_dir / diff_id.split(":", 1)[1]
    if final.exists():
        if file_digest(final) == diff_id:
            return Blob(diff_id, final.stat().st_size, final)
        final.unlink(missing_ok=True)
    blob = decompress_verified(src, blob_dir, diff_id, what)
    os.chmod(final, 0o444)
    return blob


def _checked_config(pulled: PulledImage, ref: Reference) -> tuple[dict[str, Any], list[str]]:
    """The pulled config (pull_image made sure it is a JSON object) and its diff_ids, refused in one
    line unless each part the build reads has the type it must have."""
    config = parse_document(pulled.config, f"fromImage {ref}: config {pulled.config_digest}")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise BuildError(f"fromImage {ref}: the image config has no rootfs.diff_ids")
    if len(diff_ids) != len(pulled.layers):
        raise BuildError(
            f"fromImage {ref}: the manifest lists {len(pulled.layers)} layers but the config "
            f"has {len(diff_ids)} diff_ids"
        )
    if not all(is_sha256(d) for d in diff_ids):
        raise BuildError(f"fromImage {ref}: the image config's rootfs.diff_ids are not all sha256 digests")
    for name, kind, word in (("config", dict, "object"), ("history", list, "array")):
        if config.get(name) is not None and not isinstance(config[name], kind):
            raise BuildError(f"fromImage {ref}: the image config's {name!r} is not a JSON {word}")
    return config, diff_ids


Pin = Callable[[list[str], list[str]], list[str]]


def _diff_ids(pulled: PulledImage) -> list[str]:
    """The base's diff_ids (their tars are cached too), [] for a config that is not as expected."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return [str(d) for d in json.loads(pulled.config)["rootfs"]["diff_ids"]]
    return []


def pull_base(
    text: str,
    *,
    store_root: Path,
    architecture: str,
    options: RegistryOptions | None,
    progress: Progress,
    need_tar: bool,
    pin: Pin | None = None,
    variant: str | None = None,
) -> PulledBase:
    """Pull a `docker://` base into `store_root/blobs/sha256` (the layer cache, or the workspace).
    `pin(digests, required)`: the layer cache's pin_present, so a prune cannot take the blobs away."""
    ref = registry_reference(text, "fromImage")
    progress.info(f"pulling base image {ref} ({architecture}{'/' + variant if variant else ''})")
    store_dir = store_root / "blobs" / "sha256"
    pulled = _pull_checked(ref, store_root, (architecture, variant), options, progress, pin)
    progress.info(
        f"base image {ref} resolved to {pulled.resolved_digest} "
        f"({len(pulled.downloaded_blobs)} blobs downloaded, {human(pulled.downloaded_bytes)}; "
        f"{len(pulled.cached_blobs)} already cached)"
    )
    config, diff_ids = _checked_config(pulled, ref)
    layers = [
        _base_layer(i, blob, diff_id, store_dir, need_tar, pulled.pinned)
        for i, (blob, diff_id) in enumerate(zip(pulled.layers, diff_ids, strict=True))
    ]
    base = BaseImage(config, layers, _history(config, pulled.pinned))
    return PulledBase(base, pulled, {BASE_DIGEST: pulled.resolved_digest, BASE_NAME: str(ref)})


def _pull_checked(
    ref: Reference,
    store_root: Path,
    platform: tuple[str, str | None],
    options: RegistryOptions | None,
    progress: Progress,
    pin: Pin | None,
) -> PulledImage:
    """pull_image, then pinned and checked (the layer cache is shared with prunes and other writers):
    blobs a prune took away since the pull, or corrupted ones, are downloaded again."""
    reporter = TransferReporter(progress, "pull")
    store_dir = store_root / "blobs" / "sha256"

    def pull() -> PulledImage:
        return pull_image(
            ref,
            dest_dir=store_root,
            architecture=platform[0],
            variant=platform[1],
            options=options,
            progress=reporter,
        )

    pulled = pull()
    for _attempt in range(3):
        if pin is not None and pin(_diff_ids(pulled), [b.digest for b in pulled.layers]):
            progress.warn("cached base image blobs were pruned meanwhile; downloading them again")
        elif _verify_cached(pulled, store_dir):
            progress.warn("cached base image blobs were corrupted; downloading them again")
        else:
            break
        pulled = pull()
    return pulled


def _base_layer(i: int, blob: PulledBlob, diff_id: str, store_dir: Path, need_tar: bool, pinned: str) -> Layer:
    """Layer `i` of the base: its compressed blob as pulled, and its tar when the build reads it."""
    what = f"fromImage: layer {i} ({blob.digest[:19]})"
    media = OCI_LAYER_OF_DOCKER.get(blob.media_type, blob.media_type)
    if media not in COMPRESSION_OF_MEDIA:
        raise BuildError(f"{what}: media type {blob.media_type!r} is not a layer nsbuild can use")
    compressed = Blob(blob.digest, blob.size, blob.path)
    if media == MEDIA_TAR:
        if blob.digest != diff_id:
            raise BuildError(f"{what}: an uncompressed layer whose digest is not the config's diff_id")
        tar = compressed
    elif need_tar:
        tar = _decompress_verified(blob.path, store_dir, diff_id, what)
    else:
        tar = Blob(diff_id, 0, None)  # never needed: sinks use the compressed blob
    if need_tar or media == MEDIA_TAR:
        check_layer_tar(tar, what)  # every header, before the sandbox or a sink reads it
    return Layer(
        diff_id=diff_id,
        tar=tar,
        compressed=compressed,
        media_type=media,
        comment=f"base layer {i} from {pinned}",
    )


def _history(config: dict[str, Any], pinned: str) -> list[dict[str, Any]]:
    """Provenance in the config too (the docker-archive has no manifest annotations): every base
    history entry with a layer names the pinned base it came from."""
    history = [dict(h) for h in config.get("history") or [] if isinstance(h, dict)]
    for h in history:
        if not h.get("empty_layer"):
            old = h.get("comment")
            h["comment"] = f"{old}; from {pinned}" if old else f"from {pinned}"
    return history


def remote_index(text: str, options: RegistryOptions | None, work: Path) -> dict[str, Any] | None:
    """`nsbuild inspect docker://…`: what the reference names when it is an index (verified as every
    pulled manifest is: digest, size, JSON shape, each entry a descriptor with a platform), as
    index_report gives it; None when it names a single image."""
    ref = registry_reference(text, "IMAGE")
    with RegistryClient(ref, options, actions=("pull",)) as client:
        body, media_type, digest = fetch_manifest(client, work, ref.reference)
    if media_type not in INDEX_TYPES:
        return None
    doc = parse_document(body, f"image {ref}: index {digest}")
    entries = index_entries(doc, f"image {ref}: index {digest}")
    for i, desc in enumerate(entries):
        descriptor(desc, f"image {ref}: index {digest} manifests[{i}]")
    return index_report(media_type, digest, entries)
