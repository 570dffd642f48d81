"""The steps the layered build (build.py) and the single-layer build (buildimage.py) share: check a
registry output, read the base, give layers the output's compression, the new layer's own tree and its
scripts, finish the image, write it to its sink."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.build.context import BuildContext
from nsbuild.cache.cache import LayerCache, open_cache
from nsbuild.cache.outputs import OutputStamps
from nsbuild.core.refs import ImageRef, is_registry
from nsbuild.errors import SpecError
from nsbuild.image.image import Image, docker_manifest, make_config, oci_manifest
from nsbuild.layer.layer import MEDIA_BY_COMPRESSOR, Layer, LayerRequest, build_layer, layer_from_tar
from nsbuild.sinks.load import load_image, pick_client
from nsbuild.sinks.sinks import (
    ArchiveOutput,
    Referrer,
    check_ref_name,
    check_repo_tag,
    docker_envelope,
    write_docker_archive,
    write_oci_dir,
)
from nsbuild.sources.baseimage import BaseImage, load_base
from nsbuild.spec.imageconfig import healthcheck_warning
from nsbuild.spec.spec import Spec
from nsbuild.tar.owners import OwnerPolicy
from nsbuild.tar.tarwriter import Source

if TYPE_CHECKING:
    from nsbuild.registry import PushResult


@dataclass(frozen=True)
class Written:
    """What write_output did: the output as messages name it, and what its sink reports."""

    output: str
    written: bool = True  # False: the output file already held these bytes
    push: PushResult | None = None  # docker:// output
    loaded: str | None = None  # --load: the name the client loaded


def preflight_output(ctx: BuildContext) -> None:
    """A docker:// output: the registry reached and the push authorised before anything is built; a
    client to load into: there."""
    if ctx.output.format == "load":
        pick_client(ctx.output.location or None)
    if ctx.output.format == "registry":
        from nsbuild.sinks import push as push_sink

        push_sink.preflight("docker://" + ctx.output.location, "-o", ctx.options.registry)


def read_base(ctx: BuildContext, *, need_tar: bool) -> tuple[BaseImage | None, dict[str, str], dict[str, Any] | None]:
    """fromImage for both kinds: pulled from a registry or read from a file; (base, annotations, --json info)."""
    spec, options, ws, progress = ctx.spec, ctx.options, ctx.ws, ctx.progress
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
            variant=spec.variant,
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
        variant=spec.variant,
        image_name=spec.from_image_name,
        image_tag=spec.from_image_tag,
    )
    return base, {}, None


def layer_compression(output: ImageRef, spec: Spec) -> str:
    """The form of the new layers' blobs: the spec's compressor, except where the output decides: stdout
    and a client's `load` are never compressed, and a docker-archive named .tar.gz / .tar.zst is one
    compressed stream whose layers are its frames (nsbuild.sinks.archive)."""
    if output.format == "load" or (output.format == "docker-archive" and output.location == "-"):
        return "none"
    if output.format == "docker-archive" and (envelope := docker_envelope(output.path)) != "none":
        return envelope
    return spec.compressor


def compression_warning(output: ImageRef, spec: Spec) -> str | None:
    """A compressor the spec asks for that the output's file name overrules, and the fix."""
    if output.format != "docker-archive" or output.location == "-" or "compressor" not in spec.raw:
        return None
    envelope = docker_envelope(output.path)
    if envelope == "none" or envelope == spec.compressor:
        return None
    name = output.path.name
    return (
        f"compressor {spec.compressor}: {name} is one {envelope} stream by its name, so its layers are "
        f"{envelope} too; name it {name.rsplit('.tar', 1)[0]}.tar for a plain archive of {spec.compressor} layers"
    )


def open_archive(ctx: BuildContext, cache: LayerCache | None, *, positions: int) -> ArchiveOutput | None:
    """The output archive file, written while the layers are built (docker-archive, oci-archive)."""
    output, spec = ctx.output, ctx.spec
    if output.format not in ("docker-archive", "oci-archive") or output.location == "-":
        return None
    docker = output.format == "docker-archive"
    return ArchiveOutput(
        output.path,
        kind="docker" if docker else "oci",
        envelope=docker_envelope(output.path) if docker else "none",
        mtime=spec.mtime,
        positions=positions,
        stamps=OutputStamps(cache.root) if cache else None,
    )


def new_image(
    ctx: BuildContext,
    base: BaseImage | None,
    base_layers: list[Layer],
    layers: list[Layer],
    annotations: dict[str, str],
) -> Image:
    """The image value every sink takes: the base's layers and history, then the new layers; with no tag
    given, the tag follows the content (config digest)."""
    spec, all_layers = ctx.spec, [*base_layers, *layers]
    # dockerTools' buildImage concatenates Env (the base's entries, then the spec's); layered merges
    # key-wise. Runtimes take the last entry of a name, so the spec's value wins either way.
    config = make_config(
        platform=(spec.architecture, spec.variant),
        created=spec.created,
        config=spec.config,
        base_config=base.config if base else None,
        base_history=base.history if base else [],
        layers=all_layers,
        new_from=len(base_layers),
        env_mode="concat" if spec.kind == "image" else "merge",
    )
    tag = ctx.output.tag or spec.tag or hashlib.sha256(config).hexdigest()[:32]
    return Image(
        name=spec.name,
        tag=tag,
        layers=all_layers,
        config=config,
        # the spec's annotations over what nsbuild records (the base's digest and name)
        manifest=oci_manifest(config, all_layers, {**annotations, **spec.annotations}),
    )


def recompressed(ctx: BuildContext, layers: list[Layer]) -> list[Layer]:
    """Base layers in the output's compression (recompress)."""
    return [recompress(layer, ctx, exact=ctx.docker) for layer in layers]


def recompress(layer: Layer, ctx: BuildContext, *, exact: bool = False) -> Layer:
    """Base layers keep their bytes when they already have the wanted form: compressed, or for a
    docker-archive (`exact`: frames of the archive's own compression) in exactly that compression."""
    compression, ws = ctx.compression, ctx.ws
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


def own_tree(ctx: BuildContext) -> Path:
    """The new layer's own tree in the workspace, 0755 whatever the caller's umask."""
    custom = ctx.ws.path("custom")
    os.chmod(custom, 0o755)
    return custom


def scripts_env(ctx: BuildContext) -> dict[str, str]:
    # Scripts' modules load only for a build that has scripts: the rest start without them.
    from nsbuild.sandbox.scripts import script_env

    return script_env(work=ctx.ws.root, spec_dir=ctx.spec.base_dir, mtime=ctx.spec.mtime)


def run_extra_commands(ctx: BuildContext, custom: Path, env: dict[str, str]) -> None:
    """extraCommands as the calling user, in the new layer's own tree."""
    from nsbuild.sandbox.scripts import run_bash

    ctx.progress.info("running extraCommands")
    run_bash(ctx.spec.extra_commands, cwd=custom, env=env, what="extraCommands", log_dir=ctx.ws.root)


def tree_layer(ctx: BuildContext, sources: list[Source], owner: OwnerPolicy, comment: str) -> Layer:
    """A new layer written from host trees, into the workspace."""
    request = LayerRequest(
        sources, mtime=ctx.spec.mtime, owner=owner, compression=ctx.compression, keep_tar=ctx.keep_tar, comment=comment
    )
    return build_layer(request, ctx.ws.blobs)


def script_layer(ctx: BuildContext, tar: Path, comment: str) -> Layer:
    """The layer the sandbox wrote as `tar`, in the output's compression."""
    return layer_from_tar(tar, ctx.ws.blobs, compression=ctx.compression, comment=comment)


def write_output(
    ctx: BuildContext, image: Image, archive: ArchiveOutput | None = None, referrers: Sequence[Referrer] = ()
) -> Written:
    """The image to its sink; `referrers` (SBOMs, attestations) beside it in an OCI layout or archive."""
    output, spec, options, progress = ctx.output, ctx.spec, ctx.options, ctx.progress
    fmt = output.format
    if warning := healthcheck_warning(image.config, fmt, options.manifest_format):
        progress.warn(warning)
    if fmt in ("docker-archive", "oci-archive") and output.location != "-":
        if archive is None:
            archive = open_archive(ctx, None, positions=len(image.layers))
            assert archive is not None
        if fmt == "docker-archive":
            ref = check_repo_tag(f"{output.name}:{output.tag}" if output.name and output.tag else image.reference)
        else:
            # NAME:TAG, so that `podman load` names the image after it (a bare tag becomes localhost/TAG)
            ref = check_ref_name(output.tag or image.reference)
        return Written(str(output.path), written=archive.finish(image, ref, referrers if fmt == "oci-archive" else ()))
    if fmt == "load":
        client = pick_client(output.location or None)
        load_tag = check_repo_tag(f"{output.name or image.name}:{output.tag or image.tag}")
        progress.info(f"loading {load_tag} into {client}")
        loaded = load_image(image, client, repo_tag=load_tag, mtime=spec.mtime)
        return Written(client, loaded=loaded)
    if fmt == "docker-archive":
        repo_tag = f"{output.name}:{output.tag}" if output.name and output.tag else None
        write_docker_archive(image, sys.stdout.buffer, compressor="none", mtime=spec.mtime, repo_tag=repo_tag)
        sys.stdout.buffer.flush()
        return Written("-")
    if fmt == "oci-dir":
        if options.docker_layout:
            image = dataclasses.replace(image, manifest=docker_manifest(image))
        write_oci_dir(image, output.path, tag=output.tag or image.tag, referrers=referrers)
        return Written(str(output.path))
    if fmt == "registry":
        from nsbuild.cache.shared import blob_record
        from nsbuild.registry.usage import has_explicit_tag, registry_reference
        from nsbuild.sinks import push as push_sink

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
            blob_record=blob_record(options.cache_dir),
        )
        return Written(f"docker://{pushed.reference}", push=pushed)
    raise SpecError("--format", f"unknown output format {fmt!r}")
