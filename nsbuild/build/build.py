"""Orchestration: spec → plan → layers → image → sink (DESIGN.md §1)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.cache.cache import LayerCache, close_caches, fingerprint, open_cache
from nsbuild.core.progress import Progress, human
from nsbuild.core.refs import ImageRef, is_registry
from nsbuild.errors import BuildError, SpecError
from nsbuild.image.image import Image, make_config, oci_manifest
from nsbuild.layer.layer import MEDIA_BY_COMPRESSOR, Layer, build_layer
from nsbuild.plan.plan import Plan, PlannedLayer, layer_hashes, make_plan, script_references
from nsbuild.rootfs.hosttree import warn_contents_links
from nsbuild.sandbox.scripts import run_bash, script_env
from nsbuild.sinks.archive import ImageArchive, OutputStamps
from nsbuild.sinks.sinks import (
    ArchiveOutput,
    check_destination,
    check_ref_name,
    check_repo_tag,
    write_docker_archive,
    write_oci_dir,
)
from nsbuild.sources.baseimage import BaseImage, load_base
from nsbuild.spec.imageconfig import healthcheck_warning
from nsbuild.spec.spec import Spec
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.tarwriter import Source

if TYPE_CHECKING:
    from nsbuild.registry import PushResult, RegistryOptions

EXTENSIONS = {"none": ".tar", "gz": ".tar.gz", "zstd": ".tar.zst"}


@dataclass
class BuildOptions:
    isolation: str = "auto"
    network: str = "none"
    cache_dir: Path | None = None  # None: no cache
    jobs: int = 0  # layers built at once; 0: one per CPU
    registry: RegistryOptions | None = None  # auth/TLS for docker:// outputs, bases and caches
    manifest_format: str = "oci"  # docker:// outputs: oci | docker (v2 schema 2)
    cache_from: str | None = None  # docker://REF of a shared layer cache to use
    cache_to: str | None = None  # docker://REF to push this build's layer cache to


@dataclass
class BuildResult:
    image: Image
    output: str
    format: str
    push: PushResult | None = None  # docker:// output
    base: dict[str, Any] | None = None  # docker:// fromImage: what was pulled
    cache_push: PushResult | None = None  # --cache-to
    remote_hits: int = 0  # layers taken from --cache-from
    written: bool = True  # False: the output file already held these bytes


def default_output(spec: Spec) -> ImageRef:
    base = spec.name.rsplit("/", 1)[-1]
    return ImageRef("docker-archive", base + EXTENSIONS[spec.compressor])


def resolve_output(ref: ImageRef | None, fmt: str | None, spec: Spec) -> ImageRef:
    if ref is None:
        ref = default_output(spec)
        if fmt and fmt != "docker-archive":
            ref = ImageRef(fmt, spec.name.rsplit("/", 1)[-1] + ("" if fmt == "oci-dir" else ".oci.tar"))
        return ref
    if ref.format == "auto":
        return ImageRef(fmt or "docker-archive", ref.location)
    if fmt and fmt != ref.format:
        raise SpecError("--format", f"{fmt} contradicts the output reference ({ref.format})")
    return ref


class Workspace:
    """The build's private temporary tree; removed whatever happens. It holds a lock while the build
    lives: a build killed outright leaves its tree, and the next build removes it (nsbuild.sandbox.sweep)."""

    def __init__(self) -> None:
        from nsbuild.sandbox import sweep

        parent = Path(tempfile.gettempdir())
        sweep.sweep_workspaces(parent)
        self.root, self._lock = sweep.new_workspace(parent)
        os.chmod(self.root, 0o700)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir()

    def path(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(exist_ok=True)
        return p

    def close(self) -> None:
        from nsbuild.sandbox import sweep

        # Whatever cannot be removed now stays with its lock file: the next build's sweep retries.
        sweep.remove_workspace(self.root)
        with contextlib.suppress(OSError):
            os.close(self._lock)


def link_store_contents(
    custom_root: Path, store_paths: list[Path], progress: Progress, store_dir: str | None = None
) -> None:
    """As symlinkJoin does: real directories, symlinks to every file of each store content path.

    A store path that is a symlink to a directory in the store is linked like that directory (the links
    go through it, as lndir's do); one that is a file, or leads to one or out of the store, is in the
    image at its store path only, and a warning says that nothing of it is linked into /.
    """
    for top in store_paths:
        if not _linkable(top, store_dir, progress):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            rel = os.path.relpath(dirpath, top)
            dest_dir = custom_root / rel if rel != "." else custom_root
            if os.path.islink(dest_dir) or (os.path.lexists(dest_dir) and not dest_dir.is_dir()):
                # An earlier content path put a symlink or file here: never create through it (it may
                # point anywhere on the host); the first provider wins, as for files.
                progress.warn(f"/{rel} is provided by several contents; keeping the first, not {dirpath}")
                dirnames[:] = []
                continue
            dest_dir.mkdir(exist_ok=True)
            os.chmod(dest_dir, 0o755)  # not the caller's umask: the layer must not depend on it
            for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                dest = dest_dir / name
                if os.path.lexists(dest):
                    progress.warn(
                        f"/{os.path.relpath(dest, custom_root)} is provided by several contents; "
                        f"keeping the first, not {os.path.join(dirpath, name)}"
                    )
                    continue
                os.symlink(os.path.join(dirpath, name), dest)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


def _linkable(top: Path, store_dir: str | None, progress: Progress) -> bool:
    real = os.path.realpath(top)
    # The store directory may itself be reached through a symlink (a bind of /nix elsewhere).
    inside = store_dir is None or real.startswith(os.path.realpath(store_dir).rstrip("/") + "/")
    if os.path.isdir(real) and (inside or not top.is_symlink()):
        return True
    if top.is_symlink():
        what = f"a symlink to {os.readlink(top)!r}, which is " + (
            "not in the store" if not inside else "not a directory" if os.path.lexists(real) else "missing"
        )
    else:
        what = "a single file"
    progress.warn(
        f"contents: {top} is {what}: it is in the image at its store path, and nothing is "
        'linked into / for it (give it a target, {"path": …, "target": …}, to place it)'
    )
    return False


def build_image(spec: Spec, output: ImageRef, progress: Progress, options: BuildOptions | None = None) -> BuildResult:
    options = options or BuildOptions()
    if output.format in ("docker-archive", "oci-dir", "oci-archive") and output.location != "-":
        check_destination(output.format, output.path, name=output.name, tag=output.tag)
    ws = Workspace()
    try:
        return _build(spec, output, progress, options, ws)
    finally:
        close_caches()  # the build's pins and staging area in the layer cache
        ws.close()


def read_base(
    spec: Spec, ws: Workspace, options: BuildOptions, progress: Progress, *, need_tar: bool
) -> tuple[BaseImage | None, dict[str, str], dict[str, Any] | None]:
    """fromImage for both kinds: pulled from a registry or read from a file; (base, annotations, --json info)."""
    if not spec.from_image:
        return None, {}, None
    if is_registry(spec.from_image):
        from nsbuild.build import remote

        # Pulled blobs live in the layer cache (the next build downloads nothing), else the workspace.
        pin = open_cache(options.cache_dir).pin_present if options.cache_dir else None
        pulled = remote.pull_base(
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


def _build(spec: Spec, output: ImageRef, progress: Progress, options: BuildOptions, ws: Workspace) -> BuildResult:
    if spec.kind == "image":
        from nsbuild.build import buildimage

        return buildimage.build(spec, output, progress, options, ws)
    # The registry glue (and its HTTP stack) only when a registry is involved: a rebuild is quick.
    remote: Any = None
    if output.format == "registry" or options.cache_to or options.cache_from:
        from nsbuild.build import remote
    docker = output.format == "docker-archive"
    compression = layer_compression(output, spec)
    keep_tar = compression == "none"
    base: BaseImage | None = None
    cache = open_cache(options.cache_dir) if options.cache_dir else None
    if output.format == "registry":
        remote.preflight("docker://" + output.location, "-o", options.registry)
    if options.cache_to:
        remote.preflight(options.cache_to, "--cache-to", options.registry)
    base, annotations, base_info = read_base(
        spec, ws, options, progress, need_tar=keep_tar or docker or bool(spec.fake_root_commands.strip())
    )
    if base is not None:
        base.layers = [_recompress(layer, compression, ws, exact=docker) for layer in base.layers]
    base_layers = base.layers if base else []
    plan = make_plan(spec, len(base_layers))
    warn_contents_links(spec, progress)  # links leading out of a root tree are kept, never followed
    if spec.include_nix_db and not plan.closure:
        raise SpecError(
            "includeNixDB",
            "the image has no store paths to register (no contents inside "
            f"{spec.store_dir}, or includeStorePaths is false)",
        )
    owner = Owner(spec.uid, spec.gid, spec.uname, spec.gname)
    fixed = OwnerPolicy.fixed_owner(owner)
    # The customisation layer first, as dockerTools: the store paths its scripts' output refers to
    # are part of the closure the store layers are made of.
    t0 = time.monotonic()
    custom_layer, plan = _customisation_layer(
        spec, plan, ws, progress, options, fixed, compression, keep_tar, base_layers
    )
    total = len(plan.layers) + 1
    progress.layer_done(total, total, "customisation layer", custom_layer.tar.size, time.monotonic() - t0)
    # New blobs go to the build's staging area in the cache; cache.store publishes them.
    blob_dir = cache.store_root / "blobs" / "sha256" if cache else ws.blobs
    archive = open_archive(output, spec, cache, positions=len(base_layers) + total)
    try:
        if archive is not None:
            for position, layer in enumerate(base_layers):
                archive.archive.done(position, layer)
        shared_cache = (
            remote.opened_cache(options.cache_from, options.registry, progress)
            if options.cache_from
            else contextlib.nullcontext()
        )
        with shared_cache as shared:
            layers, cached, content_keys = _content_layers(
                spec,
                plan,
                progress,
                options,
                ws,
                cache,
                shared,
                blob_dir,
                compression,
                keep_tar,
                fixed,
                total,
                archive.archive if archive else None,
                len(base_layers),
            )
        layers.append(custom_layer)
        all_layers = base_layers + layers
        config = make_config(
            architecture=spec.architecture,
            created=spec.created,
            config=spec.config,
            base_config=base.config if base else None,
            base_history=base.history if base else [],
            layers=all_layers,
            new_from=len(base_layers),
        )
        image = finished_image(spec, output, config, all_layers, annotations)
        result = BuildResult(
            image, "", output.format, base=base_info, remote_hits=sum(1 for c in cached if c == "remote")
        )
        result.output = write_output(image, output, spec, progress, options, result, archive)
    finally:
        if archive is not None:
            archive.file.discard()  # a no-op once the archive is in place
    if options.cache_to:
        result.cache_push = remote.push_cache(
            options.cache_to,
            [(k, layer) for k, layer in zip(content_keys, layers, strict=False) if k],
            options=options.registry,
            progress=progress,
            cache_dir=options.cache_dir,
        )
    return result


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


def _content_layers(
    spec: Spec,
    plan: Plan,
    progress: Progress,
    options: BuildOptions,
    ws: Workspace,
    cache: LayerCache | None,
    shared: Any,
    blob_dir: Path,
    compression: str,
    keep_tar: bool,
    fixed: OwnerPolicy,
    total: int,
    archive: ImageArchive | None,
    first_position: int,
) -> tuple[list[Layer], list[Any], list[str | None]]:
    """The planned content layers, in parallel: from the local cache, the shared cache or built (into the
    output archive when the layer is next in line there)."""
    want_content_key = shared is not None or bool(options.cache_to)
    # Without a cache, a layer streamed into the archive needs no file of its own (--cache-to pushes
    # blob files).
    files_needed = cache is not None or bool(options.cache_to)

    def finished(index: int, layer: Layer) -> Layer:
        if archive is not None:
            archive.done(first_position + index - 1, layer)
        return layer

    def content_fingerprint(key: str | None, planned: PlannedLayer) -> str:
        from nsbuild.build import remote

        return remote.remembered_content_fingerprint(
            cache.root if cache else None, key, planned.sources, mtime=spec.mtime, owner=fixed
        )

    def make(index: int, planned: PlannedLayer) -> tuple[Layer, bool | str, str | None]:
        t0 = time.monotonic()
        key = None
        content_key = None
        if cache is not None:
            key = fingerprint(planned.sources, mtime=spec.mtime, owner=fixed)
            hit = cache.lookup(key, compression=compression, need_tar=keep_tar, comment=planned.comment)
            if hit is not None:
                if options.cache_to:
                    content_key = content_fingerprint(key, planned)
                progress.layer_done(index, total, planned.comment, hit.tar.size, time.monotonic() - t0, True)
                return finished(index, hit), True, content_key
        if want_content_key:
            content_key = content_fingerprint(key, planned)
        if shared is not None and content_key is not None:
            got = shared.lookup(
                content_key,
                compression=compression,
                need_tar=keep_tar,
                store_root=cache.store_root if cache else ws.path("pull"),
                comment=planned.comment,
                mtime=spec.mtime,
                owner=fixed,
            )
            if got is not None:
                if cache is not None and key is not None:
                    got = cache.store(key, got, compression)
                progress.info(
                    f"[{index}/{total}] {planned.comment}: {human(got.tar.size)} "
                    f"(from cache {shared.ref}, {time.monotonic() - t0:.2f}s)"
                )
                return finished(index, got), "remote", content_key
        label = f"[{index}/{total}]"
        stops = []
        slot = archive.claim(first_position + index - 1) if archive is not None else None
        files = files_needed or slot is None
        layer = build_layer(
            planned.sources,
            blob_dir,
            mtime=spec.mtime,
            owner=fixed,
            compression=compression,
            keep_tar=keep_tar and files,
            keep_blob=files,
            comment=planned.comment,
            cancel=cancel,
            watch=lambda w: stops.append(progress.watch(label, lambda: w.size)),
            blob_out=slot.out if slot is not None else None,
        )
        for stop in stops:
            stop()
        if cache is not None and key is not None:
            layer = cache.store(key, layer, compression)
        progress.layer_done(index, total, planned.comment, layer.tar.size, time.monotonic() - t0)
        return finished(index, layer), False, content_key

    # Layers are independent: the C parts (reading, hashing, compressing) run in parallel threads.
    jobs = options.jobs or len(os.sched_getaffinity(0))
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(plan.layers) or 1)))
    try:
        done = list(pool.map(lambda ip: make(*ip), enumerate(plan.layers, 1)))
    except BaseException:
        # Ctrl-C or a failed layer: the other layers stop at their next entry, not when they are done.
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [d[0] for d in done], [d[1] for d in done], [d[2] for d in done]


def _recompress(layer: Layer, compression: str, ws: Workspace, *, exact: bool = False) -> Layer:
    """Base layers keep their bytes when they already have the wanted form: compressed, or for a
    docker-archive (`exact`: frames of the archive's own compression) in exactly that compression."""
    if exact:
        if layer.media_type == MEDIA_BY_COMPRESSOR[compression]:
            return layer
    elif compression == "none" or layer.media_type.endswith(("+gzip", "+zstd")):
        return layer
    from nsbuild.layer.layer import layer_from_tar

    assert layer.tar.path is not None
    tar = layer.tar.path
    if tar.parent != ws.blobs:
        # layer_from_tar files the tar under ws.blobs by moving it: a tar of the shared cache is
        # copied first. One already in ws.blobs (a local fromImage) is where it would go: no copy.
        tar = ws.path("recompress") / tar.name
        shutil.copyfile(layer.tar.path, tar)
    return layer_from_tar(tar, ws.blobs, compression=compression, comment=layer.comment)


def _customisation_layer(
    spec: Spec,
    plan: Plan,
    ws: Workspace,
    progress: Progress,
    options: BuildOptions,
    fixed: OwnerPolicy,
    compression: str,
    keep_tar: bool,
    base_layers: list[Layer],
) -> tuple[Layer, Plan]:
    """The customisation layer, and the plan grown by the store paths its scripts' output refers to."""
    custom = ws.path("custom")
    os.chmod(custom, 0o755)
    link_store_contents(custom, plan.store_links, progress, spec.store_dir)
    if spec.include_nix_db:
        # Before extraCommands, as dockerTools' mkDbExtraCommand: a script may use the database, which
        # holds the closure of the contents and config (not what the scripts add, as in dockerTools).
        import json

        from nsbuild.plan.store import Store
        from nsbuild.rootfs.nixdb import write_nix_db

        progress.info(f"registering {len(plan.closure)} store paths in /nix/var/nix/db")
        roots = plan.store_links + Store(spec.store_dir).paths_in_text(json.dumps(spec.config))
        write_nix_db(custom, plan.closure, roots, spec.store_dir, spec.mtime)
    env = script_env(work=ws.root, spec_dir=spec.base_dir, mtime=spec.mtime)
    scripted = bool(spec.extra_commands.strip() or spec.fake_root_commands.strip())
    before = layer_hashes(spec, plan, custom) if scripted else set()
    if spec.extra_commands.strip():
        progress.info("running extraCommands")
        run_bash(spec.extra_commands, cwd=custom, env=env, what="extraCommands", log_dir=ws.root)
    if spec.fake_root_commands.strip():
        return _fake_root_layer(spec, plan, ws, progress, options, compression, base_layers, custom, env, before)
    found = script_references(spec, plan, custom, before) if scripted else []
    plan = _grown_plan(spec, plan, found, len(base_layers), progress, "extraCommands")
    sources = plan.custom_sources + [Source(custom, "/")]
    layer = build_layer(
        sources,
        ws.blobs,
        mtime=spec.mtime,
        owner=fixed,
        compression=compression,
        keep_tar=keep_tar,
        comment="customisation layer",
    )
    return layer, plan


def _grown_plan(spec: Spec, plan: Plan, found: list[Path], base_count: int, progress: Progress, what: str) -> Plan:
    """The plan again with the store paths `what` referred to among its roots (nothing new: the same)."""
    if not found:
        return plan
    progress.info(
        f"{what}' output refers to {len(found)} store path(s) not in the contents' closure: "
        + ", ".join(p.name for p in found[:4])
        + (" …" if len(found) > 4 else "")
    )
    grown = make_plan(spec, base_count, extra_roots=found, store=plan.store)
    if what == "fakeRootCommands" and not grown.layers and grown.custom_sources:
        # The layer is written already; with no store layer there is nowhere left to put them.
        raise SpecError(
            "maxLayers",
            f"fakeRootCommands' output refers to {found[0]}, which needs a store "
            f"layer: raise maxLayers to at least {spec.max_layers + 1}",
        )
    return grown


def _fake_root_layer(
    spec: Spec,
    plan: Plan,
    ws: Workspace,
    progress: Progress,
    options: BuildOptions,
    compression: str,
    base_layers: list[Layer],
    custom: Path,
    env: dict[str, str],
    before: set[str],
) -> tuple[Layer, Plan]:
    try:
        from nsbuild.rootfs.customize import build_customisation_layer
    except ImportError:
        raise BuildError("fakeRootCommands: not supported by this build of nsbuild yet") from None
    from nsbuild.layer.layer import layer_from_tar

    progress.info("running fakeRootCommands")
    out_tar = ws.root / "customisation.tar"
    lower = [s for layer in plan.layers for s in layer.sources]
    build_customisation_layer(
        custom_root=custom,
        lower=lower,
        upper_sources=plan.custom_sources,
        env=env,
        base_layer_tars=[layer.tar.path for layer in base_layers if layer.tar.path is not None],
        script=spec.fake_root_commands,
        enable_fakechroot=spec.enable_fakechroot,
        root_owner=Owner(spec.uid, spec.gid, spec.uname, spec.gname),
        mtime=spec.mtime,
        isolation=options.isolation,
        network=options.network,
        workdir=ws.path("sandbox"),
        out_tar=out_tar,
        log=progress,
        store_dir=spec.store_dir,
    )
    # The tar's bytes hold every name, link target and file of the layer: scanned as they are.
    found = script_references(spec, plan, out_tar, before)
    plan = _grown_plan(spec, plan, found, len(base_layers), progress, "fakeRootCommands")
    return layer_from_tar(out_tar, ws.blobs, compression=compression, comment="customisation layer"), plan


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
        from nsbuild.build import remote

        options = options or BuildOptions()
        text = "docker://" + output.location
        target = remote.registry_reference(text, "-o")
        if not remote.has_explicit_tag(text):
            target = target.with_tag(image.tag)  # no tag given: the spec's tag (or content hash)
        pushed = remote.push(
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
