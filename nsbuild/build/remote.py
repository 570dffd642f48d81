"""`nsbuild push`: an existing image (docker-archive, OCI layout or archive) to a registry."""

from __future__ import annotations

from pathlib import Path

from nsbuild.build.context import Workspace
from nsbuild.cache.shared import blob_record
from nsbuild.core.progress import Progress
from nsbuild.core.refs import is_registry
from nsbuild.errors import NsbuildError, UsageError
from nsbuild.image.image import Image, canonical_json, oci_manifest
from nsbuild.image.index import MEDIA_DOCKER_LIST, ImageIndex
from nsbuild.layer.layer import MEDIA_TAR, layer_from_tar
from nsbuild.registry import PushResult, RegistryOptions
from nsbuild.registry.reference import Reference
from nsbuild.sinks.indexpush import push_index, push_referrers
from nsbuild.sinks.push import push
from nsbuild.sources.baseimage import load_base
from nsbuild.sources.indexsource import read_layout_index
from nsbuild.spec.imageconfig import healthcheck_warning
from nsbuild.spec.spec import host_architecture


def push_existing(
    text: str,
    target: Reference,
    *,
    compressor: str | None,
    manifest_format: str,
    options: RegistryOptions | None,
    progress: Progress,
    cache_dir: Path | None,
) -> PushResult:
    """`nsbuild push IMAGE REF`: an image on disk as it is; uncompressed layers compressed first
    (`compressor`, gz when None). An index is pushed byte for byte: a compressor that would change
    its layers is refused."""
    if is_registry(text):
        raise UsageError(f"IMAGE {text!r}: copying between registries is skopeo's job; give an archive or layout")
    ws = Workspace()
    try:
        progress.info(f"reading {text}")
        index = read_layout_index(text, ws.path("index"))
        if index is not None:
            if compressor not in (None, "none"):
                # Compressed again, every layer, manifest and index digest would change, and the SBOMs'
                # subjects with them: not a push of this index. Said, not ignored.
                raise UsageError(
                    f"--compressor {compressor}: {text} is an index of {len(index.manifests)} platforms, pushed byte "
                    "for byte (its digests and its SBOMs' subjects name these blobs); rebuild it with "
                    f"nsbuild index --compressor {compressor}, or leave --compressor out"
                )
            if manifest_format == "docker" and index.media_type != MEDIA_DOCKER_LIST:
                # Docker manifests in its place would change every digest the index names.
                progress.warn("--manifest-format docker: an OCI image index is pushed as it is")
            return _push_index(index, target, options, progress, cache_dir)
        # Here the image is the command's argument, not the spec's fromImage: no label.
        base = load_base(text, ws.blobs, ws.path("base"), architecture=host_architecture(), label="")
        layers = []
        for layer in base.layers:
            if compressor == "none" or layer.media_type != MEDIA_TAR or layer.tar.path is None:
                layers.append(layer)  # compressed blobs are pushed byte for byte
            else:
                layers.append(
                    layer_from_tar(
                        layer.tar.path,
                        ws.blobs,
                        compression=compressor or "gz",
                        comment=layer.comment,
                        expected_diff_id=layer.diff_id,
                    )
                )
        config = base.raw_config if base.raw_config is not None else canonical_json(base.config)
        image = Image(
            name=target.repository,
            tag=target.tag or "latest",
            layers=layers,
            config=config,
            manifest=oci_manifest(config, layers),
        )
        if warning := healthcheck_warning(config, "registry", manifest_format):
            progress.warn(warning)
        return push(
            image,
            target,
            manifest_format=manifest_format,
            options=options,
            progress=progress,
            blob_record=blob_record(cache_dir),
        )
    finally:
        ws.close()


def _push_index(
    index: ImageIndex, target: Reference, options: RegistryOptions | None, progress: Progress, cache_dir: Path | None
) -> PushResult:
    """An index and all its images (`skopeo copy --all`), byte for byte: the digests the index names
    stay what they are, whatever --compressor and --manifest-format say. Their referrers follow."""
    progress.info(
        f"an index of {len(index.manifests)} platforms: {', '.join(m.platform.name for m in index.manifests)}"
    )
    pushed = push_index(index, target, options=options, progress=progress, blob_record=blob_record(cache_dir))
    for m in index.manifests:
        try:
            push_referrers(m, target, options)
        except NsbuildError as exc:
            progress.warn(f"{m.platform.name}: its referrers are not pushed: {exc}")
    parts = pushed.platforms
    return PushResult(
        pushed.index.reference,
        pushed.index.digest,
        pushed.index.manifest_media_type,
        uploaded_blobs=[d for p in parts for d in p.uploaded_blobs],
        skipped_blobs=[d for p in parts for d in p.skipped_blobs],
        mounted_blobs=[d for p in parts for d in p.mounted_blobs],
        uploaded_bytes=sum(p.uploaded_bytes for p in parts),
    )
