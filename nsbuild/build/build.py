"""Orchestration: spec → plan → layers → image → sink (DESIGN.md §1)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.build import attest
from nsbuild.build.context import BuildContext, BuildOptions, BuildResult, Workspace
from nsbuild.build.steps import (
    compression_warning,
    layer_compression,
    new_image,
    open_archive,
    own_tree,
    preflight_output,
    read_base,
    recompressed,
    run_extra_commands,
    script_layer,
    scripts_env,
    tree_layer,
    write_output,
)
from nsbuild.cache.cache import LayerCache, close_caches, fingerprint, open_cache, tar_fingerprint
from nsbuild.core.progress import Progress, human
from nsbuild.core.refs import ImageRef
from nsbuild.errors import SpecError
from nsbuild.layer.layer import Layer, LayerRequest, build_layer
from nsbuild.plan.plan import Plan, PlannedLayer, layer_hashes, make_plan, script_references, tree_size
from nsbuild.plan.store import Store
from nsbuild.rootfs.hosttree import warn_contents_links
from nsbuild.rootfs.nixdb import write_nix_db
from nsbuild.sinks.archive import ImageArchive
from nsbuild.sinks.sinks import ArchiveOutput, check_destination
from nsbuild.spec.spec import ContentEntry, Spec
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.perms import compiled
from nsbuild.tar.tarinput import TarInput, TarLayer, load_tar_layer
from nsbuild.tar.tarwriter import Source

if TYPE_CHECKING:
    from nsbuild.registry import PushResult


def default_output(spec: Spec) -> ImageRef:
    """./NAME.tar: a plain docker-archive (its layers in the spec's compressor), which every loader reads;
    a gzip-compressed archive is one that Debian 12's podman, skopeo, buildah and ctr cannot."""
    return ImageRef("docker-archive", spec.name.rsplit("/", 1)[-1] + ".tar")


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
        ctx = BuildContext(spec, output, options, progress, ws, compression=layer_compression(output, spec))
        if warning := compression_warning(output, spec):
            progress.warn(warning)
        attest.check(ctx)
        if spec.kind == "image":
            # buildImage's pipeline (and the runAsRoot sandbox it imports) only for a buildImage spec
            from nsbuild.build.buildimage import build as build_image

            return build_image(ctx)
        return _build(ctx)
    finally:
        close_caches()  # the build's pins and staging area in the layer cache
        ws.close()


@dataclass(frozen=True)
class _Layered:
    """What the steps of one layered build share besides its BuildContext."""

    ctx: BuildContext
    cache: LayerCache | None
    owner: OwnerPolicy  # of every entry of the new layers
    base_layers: list[Layer]  # fromImage's, in the output's compression
    # `{"tar": …}` layers made before the customisation layer (fakeRootCommands unpacks them below
    # its sandbox), by contents field; _ContentLayers takes them from here
    tar_layers: dict[str, tuple[Layer, bool]] = field(default_factory=dict)  # (layer, from the cache)


def _build(ctx: BuildContext) -> BuildResult:
    spec, options, progress = ctx.spec, ctx.options, ctx.progress
    cache = open_cache(options.cache_dir) if options.cache_dir else None
    preflight_output(ctx)
    if options.cache_to:
        # The registry glue (and its HTTP stack) only when a registry is involved: a rebuild is quick.
        from nsbuild.sinks import push as push_sink

        push_sink.preflight(options.cache_to, "--cache-to", options.registry)
    base, annotations, base_info = read_base(
        ctx, need_tar=ctx.keep_tar or ctx.docker or bool(spec.fake_root_commands.strip())
    )
    base_layers = recompressed(ctx, base.layers) if base is not None else []
    plan = _checked_plan(ctx, len(base_layers))
    fixed = OwnerPolicy.fixed_owner(Owner(spec.uid, spec.gid, spec.uname, spec.gname), compiled(spec.perms))
    job = _Layered(ctx, cache, fixed, base_layers)
    # The customisation layer first, as dockerTools: the store paths its scripts' output refers to
    # are part of the closure the store layers are made of.
    t0 = time.monotonic()
    custom_layer, plan = _customisation_layer(job, plan)
    total = len(plan.layers) + 1
    custom_seconds = time.monotonic() - t0
    progress.layer_done(total, total, "customisation layer", custom_layer.tar.size, custom_seconds)
    archive = open_archive(ctx, cache, positions=len(base_layers) + total)
    try:
        layers, cached, content_keys, seconds = _content_layers(job, plan, archive)
        if not cached or not all(cached):
            warn_contents_links(spec, progress)  # links leading out of a root tree are kept, never followed
        image = new_image(ctx, base, base_layers, [*layers, custom_layer], annotations)
        docs = attest.documents(ctx, image, attest.Known(base, annotations, len(base_layers), plan.closure))
        written = write_output(ctx, image, archive, attest.referrers(ctx, docs))
    finally:
        if archive is not None:
            archive.file.discard()  # a no-op once the archive is in place
    sbom = attest.finish(ctx, docs, written)
    cache_push = _push_cache(job, options.cache_to, content_keys, layers) if options.cache_to else None
    return BuildResult(
        image,
        written.output,
        ctx.output.format,
        push=written.push,
        base=base_info,
        cache_push=cache_push,
        remote_hits=sum(1 for c in cached if c == "remote"),
        written=written.written,
        loaded=written.loaded,
        layer_sources=(
            *(("base", 0.0) for _ in base_layers),
            *((_SOURCE[c], t) for c, t in zip(cached, seconds, strict=True)),
            ("built", custom_seconds),
        ),
        store_paths=tuple(sp.path for sp in plan.closure.values()),
        sbom=sbom,
    )


_SOURCE: dict[bool | str, str] = {True: "cache", "remote": "cache-from", False: "built"}


def _checked_plan(ctx: BuildContext, base_count: int) -> Plan:
    spec = ctx.spec
    plan = make_plan(spec, base_count)
    if spec.include_nix_db and not plan.closure:
        raise SpecError(
            "includeNixDB",
            "the image has no store paths to register (no contents inside "
            f"{spec.store_dir}, or includeStorePaths is false)",
        )
    return plan


def _push_cache(job: _Layered, cache_to: str, content_keys: list[str | None], layers: list[Layer]) -> PushResult:
    """--cache-to: the content layers that have a content key (the customisation layer has none)."""
    from nsbuild.cache import shared as registry_cache

    options = job.ctx.options
    return registry_cache.push_cache(
        cache_to,
        [(k, layer) for k, layer in zip(content_keys, layers, strict=False) if k],
        options=options.registry,
        progress=job.ctx.progress,
        cache_dir=options.cache_dir,
    )


def _content_layers(
    job: _Layered, plan: Plan, archive: ArchiveOutput | None
) -> tuple[list[Layer], list[bool | str], list[str | None], list[float]]:
    """The planned content layers (_ContentLayers), after the base layers went to the output archive."""
    options = job.ctx.options
    if archive is not None:
        for position, layer in enumerate(job.base_layers):
            archive.archive.done(position, layer)
    # New blobs go to the build's staging area in the cache; cache.store publishes them.
    blob_dir = job.cache.store_root / "blobs" / "sha256" if job.cache else job.ctx.ws.blobs
    shared_cache: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if options.cache_from:
        from nsbuild.cache import shared as registry_cache

        shared_cache = registry_cache.opened_cache(options.cache_from, options.registry, job.ctx.progress)
    with shared_cache as shared:
        return _ContentLayers(job, plan, shared, archive.archive if archive else None, blob_dir).made()


@dataclass(frozen=True)
class _ContentLayers:
    """The planned content layers, in parallel: from the local cache, the shared cache (`shared`,
    --cache-from) or built (into the output archive when the layer is next in line there)."""

    job: _Layered
    plan: Plan
    shared: Any
    archive: ImageArchive | None
    blob_dir: Path
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def total(self) -> int:
        return len(self.plan.layers) + 1

    def made(self) -> tuple[list[Layer], list[bool | str], list[str | None], list[float]]:
        """The layers in order; per layer whether it came from a cache (see _make), its content key
        and the seconds it took."""
        # Layers are independent: the C parts (reading, hashing, compressing) run in parallel threads.
        jobs = self.job.ctx.options.jobs or len(os.sched_getaffinity(0))
        pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(self.plan.layers) or 1)))
        try:
            done = list(pool.map(self._timed, enumerate(self.plan.layers, 1)))
        except BaseException:
            # Ctrl-C or a failed layer: the other layers stop at their next entry, not when they are done.
            self.cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [d[0][0] for d in done], [d[0][1] for d in done], [d[0][2] for d in done], [d[1] for d in done]

    def _timed(self, item: tuple[int, PlannedLayer]) -> tuple[tuple[Layer, bool | str, str | None], float]:
        t0 = time.monotonic()
        made = self._make(*item)
        return made, time.monotonic() - t0

    def _make(self, index: int, planned: PlannedLayer) -> tuple[Layer, bool | str, str | None]:
        """Layer `index` (1-based), whether it came from a cache (True: local, "remote": shared), and
        its content key when a shared cache needs one."""
        if planned.tar is not None:
            made, from_cache = self._tar(index, planned)
            return made, from_cache, None
        t0 = time.monotonic()
        ctx, cache = self.job.ctx, self.job.cache
        key = None
        content_key = None
        if cache is not None:
            key = fingerprint(planned.sources, mtime=ctx.spec.mtime, owner=self._owner(planned))
            hit = cache.lookup(key, compression=ctx.compression, need_tar=ctx.keep_tar, comment=planned.comment)
            if hit is not None:
                if ctx.options.cache_to:
                    content_key = self._content_fingerprint(key, planned)
                ctx.progress.layer_done(index, self.total, planned.comment, hit.tar.size, time.monotonic() - t0, True)
                return self._finished(index, hit), True, content_key
        if self.shared is not None or ctx.options.cache_to:
            content_key = self._content_fingerprint(key, planned)
        if self.shared is not None and content_key is not None:
            got = self._from_shared(index, planned, key, content_key, t0)
            if got is not None:
                return self._finished(index, got), "remote", content_key
        layer = self._built(index, planned, key)
        ctx.progress.layer_done(index, self.total, planned.comment, layer.tar.size, time.monotonic() - t0)
        return self._finished(index, layer), False, content_key

    def _owner(self, planned: PlannedLayer) -> OwnerPolicy:
        """The ownership policy of one content layer: without the perms rules that cannot touch it, so
        that a rule changed elsewhere leaves its cache keys (and the layer) as they were.  A tar's
        members are not on disk to narrow by: its layer keeps every rule (so does its cache key)."""
        if planned.tar is not None:
            return self.job.owner
        return self.job.owner.narrowed((s.host, s.target) for s in planned.sources)

    def _finished(self, index: int, layer: Layer) -> Layer:
        if self.archive is not None:
            self.archive.done(len(self.job.base_layers) + index - 1, layer)
        return layer

    def _content_fingerprint(self, key: str | None, planned: PlannedLayer) -> str:
        from nsbuild.cache import shared as registry_cache

        cache, spec = self.job.cache, self.job.ctx.spec
        return registry_cache.remembered_content_fingerprint(
            cache.root if cache else None, key, planned.sources, mtime=spec.mtime, owner=self._owner(planned)
        )

    def _from_shared(
        self, index: int, planned: PlannedLayer, key: str | None, content_key: str, t0: float
    ) -> Layer | None:
        ctx, cache = self.job.ctx, self.job.cache
        got = self.shared.lookup(
            content_key,
            compression=ctx.compression,
            need_tar=ctx.keep_tar,
            store_root=cache.store_root if cache else ctx.ws.path("pull"),
            comment=planned.comment,
            mtime=ctx.spec.mtime,
            owner=self._owner(planned),
        )
        if got is None:
            return None
        if cache is not None and key is not None:
            got = cache.store(key, got, ctx.compression)
        ctx.progress.info(
            f"[{index}/{self.total}] {planned.comment}: {human(got.tar.size)} "
            f"(from cache {self.shared.ref}, {time.monotonic() - t0:.2f}s)"
        )
        return got

    def _tar(self, index: int, planned: PlannedLayer) -> tuple[Layer, bool]:
        """A `{"tar": …}` entry's layer: from the local cache by the tar's bytes, else read from the
        tar (its plain copy in the workspace removed once the layer is written). The shared cache
        does not carry these: their content fingerprint is the tar's own digest, not a tree's."""
        t0 = time.monotonic()
        ctx, cache, entry = self.job.ctx, self.job.cache, planned.tar
        assert entry is not None
        made = self.job.tar_layers.get(entry.field)
        if made is not None:
            ctx.progress.layer_done(index, self.total, planned.comment, made[0].tar.size, 0.0, made[1])
            return self._finished(index, made[0]), made[1]
        target = entry.target or "/"
        key = None
        if cache is not None:
            key = _tar_key(self.job, entry)
            hit = cache.lookup(key, compression=ctx.compression, need_tar=ctx.keep_tar, comment=planned.comment)
            if hit is not None:
                ctx.progress.layer_done(index, self.total, planned.comment, hit.tar.size, time.monotonic() - t0, True)
                return self._finished(index, hit), True
        source = TarInput(entry.path, target, entry.keep_mtime, entry.field)
        tar = load_tar_layer(source, ctx.ws.path("tar"), self.cancel)
        try:
            layer = self._built(index, planned, key, tar)
        finally:
            tar.plain.unlink(missing_ok=True)
        ctx.progress.layer_done(index, self.total, planned.comment, layer.tar.size, time.monotonic() - t0)
        return self._finished(index, layer), False

    def _built(self, index: int, planned: PlannedLayer, key: str | None, tar: TarLayer | None = None) -> Layer:
        ctx, cache = self.job.ctx, self.job.cache
        label = f"[{index}/{self.total}]"
        stops: list[Callable[[], None]] = []
        slot = self.archive.claim(len(self.job.base_layers) + index - 1) if self.archive is not None else None
        # Without a cache, a layer streamed into the archive needs no file of its own (--cache-to pushes
        # blob files).
        # An SBOM reads every layer back from its blob.
        files = cache is not None or bool(ctx.options.cache_to) or slot is None or attest.wanted(ctx)
        request = LayerRequest(
            planned.sources,
            mtime=ctx.spec.mtime,
            owner=self._owner(planned),
            compression=ctx.compression,
            keep_tar=ctx.keep_tar and files,
            keep_blob=files,
            comment=planned.comment,
            tar=tar,
        )
        # A bar needs the layer's size: store layers know it (NAR sizes), trees are walked for it, and
        # only when a terminal shows the bar.
        total = planned.size or (sum(tree_size(s.host) for s in planned.sources) if ctx.progress.live_lines else 0)
        layer = build_layer(
            request,
            self.blob_dir,
            cancel=self.cancel,
            watch=lambda w: stops.append(ctx.progress.watch(label, lambda: w.size, total)),
            blob_out=slot.out if slot is not None else None,
        )
        for stop in stops:
            stop()
        if cache is not None and key is not None:
            layer = cache.store(key, layer, ctx.compression)
        return layer


def _customisation_layer(job: _Layered, plan: Plan) -> tuple[Layer, Plan]:
    """The customisation layer, and the plan grown by the store paths its scripts' output refers to."""
    ctx = job.ctx
    spec, progress = ctx.spec, ctx.progress
    custom = own_tree(ctx)
    link_store_contents(custom, plan.store_links, progress, spec.store_dir)
    if spec.include_nix_db:
        # Before extraCommands, as dockerTools' mkDbExtraCommand: a script may use the database, which
        # holds the closure of the contents and config (not what the scripts add, as in dockerTools).
        progress.info(f"registering {len(plan.closure)} store paths in /nix/var/nix/db")
        roots = plan.store_links + Store(spec.store_dir).paths_in_text(json.dumps(spec.config))
        write_nix_db(custom, plan.closure, roots, spec.store_dir, spec.mtime)
    scripted = bool(spec.extra_commands.strip() or spec.fake_root_commands.strip())
    env = scripts_env(ctx) if scripted else {}
    before = layer_hashes(spec, plan, custom) if scripted else set()
    if spec.extra_commands.strip():
        run_extra_commands(ctx, custom, env)
    if spec.fake_root_commands.strip():
        return _fake_root_layer(job, plan, custom, env, before)
    found = script_references(spec, plan, custom, before) if scripted else []
    plan = _grown_plan(spec, plan, found, len(job.base_layers), progress, "extraCommands")
    return tree_layer(ctx, plan.custom_sources + [Source(custom, "/")], job.owner, "customisation layer"), plan


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


def _tar_key(job: _Layered, entry: ContentEntry) -> str:
    target, mtime = entry.target or "/", job.ctx.spec.mtime
    return tar_fingerprint(entry.path, target=target, keep_mtime=entry.keep_mtime, mtime=mtime, owner=job.owner)


def _tar_below_script(job: _Layered, planned: PlannedLayer) -> Layer:
    """A tar entry's layer, made before fakeRootCommands (its tar file kept: the sandbox unpacks it)."""
    ctx, cache, entry = job.ctx, job.cache, planned.tar
    assert entry is not None
    target = entry.target or "/"
    key = None
    if cache is not None:
        key = _tar_key(job, entry)
        hit = cache.lookup(key, compression=ctx.compression, need_tar=True, comment=planned.comment)
        if hit is not None:
            job.tar_layers[entry.field] = (hit, True)
            return hit
    tar = load_tar_layer(TarInput(entry.path, target, entry.keep_mtime, entry.field), ctx.ws.path("tar"))
    try:
        request = LayerRequest([], ctx.spec.mtime, job.owner, ctx.compression, True, planned.comment, tar=tar)
        layer = build_layer(request, cache.store_root / "blobs" / "sha256" if cache else ctx.ws.blobs)
    finally:
        tar.plain.unlink(missing_ok=True)
    if cache is not None and key is not None:
        layer = cache.store(key, layer, ctx.compression)
    job.tar_layers[entry.field] = (layer, False)
    return layer


def _fake_root_layer(
    job: _Layered, plan: Plan, custom: Path, env: dict[str, str], before: set[str]
) -> tuple[Layer, Plan]:
    ctx = job.ctx
    spec, ws, progress, options = ctx.spec, ctx.ws, ctx.progress, ctx.options
    # The namespace and fakeroot machinery is loaded only by a build that runs fakeRootCommands.
    from nsbuild.rootfs.customize import CustomisationJob, build_customisation_layer

    progress.info("running fakeRootCommands")
    out_tar = ws.root / "customisation.tar"
    lower = [s for layer in plan.layers for s in layer.sources]
    tars = [_tar_below_script(job, planned) for planned in plan.layers if planned.tar is not None]
    build_customisation_layer(
        CustomisationJob(
            custom_root=custom,
            lower=lower,
            upper_sources=plan.custom_sources,
            env=env,
            base_layer_tars=[layer.tar.path for layer in [*job.base_layers, *tars] if layer.tar.path is not None],
            script=spec.fake_root_commands,
            enable_fakechroot=spec.enable_fakechroot,
            root_owner=Owner(spec.uid, spec.gid, spec.uname, spec.gname),
            perms=spec.perms,
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
    plan = _grown_plan(spec, plan, found, len(job.base_layers), progress, "fakeRootCommands")
    return script_layer(ctx, out_tar, "customisation layer"), plan
