"""Orchestration: spec → plan → layers → image → sink (DESIGN.md §1)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.build import buildimage
from nsbuild.build.context import BuildOptions, BuildResult, Workspace
from nsbuild.build.steps import finished_image, layer_compression, open_archive, read_base, recompress, write_output
from nsbuild.cache.cache import LayerCache, close_caches, fingerprint, open_cache
from nsbuild.core.progress import Progress, human
from nsbuild.core.refs import ImageRef
from nsbuild.errors import SpecError
from nsbuild.image.image import make_config
from nsbuild.layer.layer import Layer, LayerRequest, build_layer, layer_from_tar
from nsbuild.plan.plan import Plan, PlannedLayer, layer_hashes, make_plan, script_references
from nsbuild.plan.store import Store
from nsbuild.rootfs.customize import CustomisationJob, build_customisation_layer
from nsbuild.rootfs.hosttree import warn_contents_links
from nsbuild.rootfs.nixdb import write_nix_db
from nsbuild.sandbox.scripts import run_bash, script_env
from nsbuild.sinks.archive import ImageArchive
from nsbuild.sinks.sinks import (
    check_destination,
)
from nsbuild.sources.baseimage import BaseImage
from nsbuild.spec.spec import Spec
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.tarwriter import Source

if TYPE_CHECKING:
    pass

EXTENSIONS = {"none": ".tar", "gz": ".tar.gz", "zstd": ".tar.zst"}


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


def _build(spec: Spec, output: ImageRef, progress: Progress, options: BuildOptions, ws: Workspace) -> BuildResult:
    if spec.kind == "image":
        return buildimage.build(spec, output, progress, options, ws)
    # The registry glue (and its HTTP stack) only when a registry is involved: a rebuild is quick.
    push_sink: Any = None
    registry_cache: Any = None
    if output.format == "registry" or options.cache_to or options.cache_from:
        from nsbuild.cache import shared as registry_cache
        from nsbuild.sinks import push as push_sink
    docker = output.format == "docker-archive"
    compression = layer_compression(output, spec)
    keep_tar = compression == "none"
    base: BaseImage | None = None
    cache = open_cache(options.cache_dir) if options.cache_dir else None
    if output.format == "registry":
        push_sink.preflight("docker://" + output.location, "-o", options.registry)
    if options.cache_to:
        push_sink.preflight(options.cache_to, "--cache-to", options.registry)
    base, annotations, base_info = read_base(
        spec, ws, options, progress, need_tar=keep_tar or docker or bool(spec.fake_root_commands.strip())
    )
    if base is not None:
        base.layers = [recompress(layer, compression, ws, exact=docker) for layer in base.layers]
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
            registry_cache.opened_cache(options.cache_from, options.registry, progress)
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
        result.cache_push = registry_cache.push_cache(
            options.cache_to,
            [(k, layer) for k, layer in zip(content_keys, layers, strict=False) if k],
            options=options.registry,
            progress=progress,
            cache_dir=options.cache_dir,
        )
    return result


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
        from nsbuild.cache import shared as registry_cache

        return registry_cache.remembered_content_fingerprint(
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
        request = LayerRequest(
            planned.sources,
            mtime=spec.mtime,
            owner=fixed,
            compression=compression,
            keep_tar=keep_tar and files,
            keep_blob=files,
            comment=planned.comment,
        )
        layer = build_layer(
            request,
            blob_dir,
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
    request = LayerRequest(
        sources,
        mtime=spec.mtime,
        owner=fixed,
        compression=compression,
        keep_tar=keep_tar,
        comment="customisation layer",
    )
    return build_layer(request, ws.blobs), plan


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
    progress.info("running fakeRootCommands")
    out_tar = ws.root / "customisation.tar"
    lower = [s for layer in plan.layers for s in layer.sources]
    build_customisation_layer(
        CustomisationJob(
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
    )
    # The tar's bytes hold every name, link target and file of the layer: scanned as they are.
    found = script_references(spec, plan, out_tar, before)
    plan = _grown_plan(spec, plan, found, len(base_layers), progress, "fakeRootCommands")
    return layer_from_tar(out_tar, ws.blobs, compression=compression, comment="customisation layer"), plan
