"""The steps the layered build (build.py) and the single-layer build (buildimage.py) share: read the
base, give layers the output's compression, finish the image, write it to its sink."""

from __future__ import annotations

import hashlib
import shutil
import sys
from typing import Any

from nsbuild.build.context import BuildOptions, BuildResult, Workspace
from nsbuild.cache.cache import LayerCache, open_cache
from nsbuild.core.progress import Progress
from nsbuild.core.refs import ImageRef, is_registry
from nsbuild.errors import SpecError
from nsbuild.image.image import Image, oci_manifest
from nsbuild.layer.layer import MEDIA_BY_COMPRESSOR, Layer, layer_from_tar
from nsbuild.sinks.archive import OutputStamps
from nsbuild.sinks.sinks import ArchiveOutput, check_ref_name, check_repo_tag, write_docker_archive, write_oci_dir
from nsbuild.sources.baseimage import BaseImage, load_base
from nsbuild.spec.imageconfig import healthcheck_warning
from nsbuild.spec.spec import Spec


def read_base(
    spec: Spec, ws: Workspace, options: BuildOptions, progress: Progress, *, need_tar: bool
) -> tuple[BaseImage | None, dict[str, str], dict[str, Any] | None]:
    """fromImage for both kinds: pulled from a registry or read from a file; (base, annotations, --json info)."""
    if not spec.from_image:
        return None, {}, None
    if is_registry(spec.from_image):
        from nsbuild.sources import pull

        # Pulled blobs live in the layer cache (the next build downloads nothing), else the workspace.
        pin = open_cache(options.cache_dir).pin_present if options.cache_dir else None
        pulled = pull.pull_base(
            spec.from_image,
            store_root=options.cache_dir or ws.path("pull"),
            architecture=spec.architecture,
            options=options.registry,
            progress=progress,
            need_tar=need_tar,
            pin=pin,
        )
        return pulled.base, pulled.annotations, pulled.to_json()
    progress.info(f"reading base image {spec.from_image}")
    base = load_base(
        spec.from_image,
        ws.blobs,
        ws.path("base"),
        architecture=spec.architecture,
        image_name=spec.from_image_name,
        image_tag=spec.from_image_tag,
    )
    return base, {}, None


def layer_compression(output: ImageRef, spec: Spec) -> str:
    """The form of the new layers' blobs: the spec's compressor, for a docker-archive too (its layers are
    frames of the compressed archive, nsbuild.sinks.archive), except on stdout, which is never compressed."""
    if output.format == "docker-archive" and output.location == "-":
        return "none"
    return spec.compressor


def open_archive(output: ImageRef, spec: Spec, cache: LayerCache | None, *, positions: int) -> ArchiveOutput | None:
    """The output archive file, written while the layers are built (docker-archive, oci-archive)."""
    if output.format not in ("docker-archive", "oci-archive") or output.location == "-":
        return None
    docker = output.format == "docker-archive"
    return ArchiveOutput(
        output.path,
        kind="docker" if docker else "oci",
        envelope=spec.compressor if docker else "none",
        mtime=spec.mtime,
        positions=positions,
        stamps=OutputStamps(cache.root) if cache else None,
    )


def finished_image(
    spec: Spec, output: ImageRef, config: bytes, layers: list[Layer], annotations: dict[str, str]
) -> Image:
    """The image value every sink takes; with no tag given, the tag follows the content (config digest)."""
    tag = output.tag or spec.tag or hashlib.sha256(config).hexdigest()[:32]
    return Image(
        name=spec.name, tag=tag, layers=layers, config=config, manifest=oci_manifest(config, layers, annotations)
    )


def recompress(layer: Layer, compression: str, ws: Workspace, *, exact: bool = False) -> Layer:
    """Base layers keep their bytes when they already have the wanted form: compressed, or for a
    docker-archive (`exact`: frames of the archive's own compression) in exactly that compression."""
    if exact:
        if layer.media_type == MEDIA_BY_COMPRESSOR[compression]:
            return layer
    elif compression == "none" or layer.media_type.endswith(("+gzip", "+zstd")):
        return layer
    assert layer.tar.path is not None
    tar = layer.tar.path
    if tar.parent != ws.blobs:
        # layer_from_tar files the tar under ws.blobs by moving it: a tar of the shared cache is
        # copied first. One already in ws.blobs (a local fromImage) is where it would go: no copy.
        tar = ws.path("recompress") / tar.name
        shutil.copyfile(layer.tar.path, tar)
    return layer_from_tar(tar, ws.blobs, compression=compression, comment=layer.comment)


def write_output(
    image: Image,
    output: ImageRef,
    spec: Spec,
    progress: Progress,
    options: BuildOptions | None = None,
    result: BuildResult | None = None,
    archive: ArchiveOutput | None = None,
) -> str:
    fmt = output.format
    if warning := healthcheck_warning(image.config, fmt, (options or BuildOptions()).manifest_format):
        progress.warn(warning)
    if fmt in ("docker-archive", "oci-archive") and output.location != "-":
        if archive is None:
            archive = open_archive(output, spec, None, positions=len(image.layers))
            assert archive is not None
        if fmt == "docker-archive":
            ref = check_repo_tag(f"{output.name}:{output.tag}" if output.name and output.tag else image.reference)
        else:
            ref = check_ref_name(output.tag or image.tag)
        if not archive.finish(image, ref) and result is not None:
            result.written = False
        return str(output.path)
    if fmt == "docker-archive":
        repo_tag = f"{output.name}:{output.tag}" if output.name and output.tag else None
        write_docker_archive(image, sys.stdout.buffer, compressor="none", mtime=spec.mtime, repo_tag=repo_tag)
        sys.stdout.buffer.flush()
        return "-"
    if fmt == "oci-dir":
        write_oci_dir(image, output.path, tag=output.tag or image.tag)
        return str(output.path)
    if fmt == "registry":
        from nsbuild.registry.usage import has_explicit_tag, registry_reference
        from nsbuild.sinks import push as push_sink

        options = options or BuildOptions()
        text = "docker://" + output.location
        target = registry_reference(text, "-o")
        if not has_explicit_tag(text):
            target = target.with_tag(image.tag)  # no tag given: the spec's tag (or content hash)
        pushed = push_sink.push(
            image,
            target,
            manifest_format=options.manifest_format,
            options=options.registry,
            progress=progress,
            cache_dir=options.cache_dir,
        )
        if result is not None:
            result.push = pushed
        return f"docker://{pushed.reference}"
    raise SpecError("--format", f"unknown output format {fmt!r}")
