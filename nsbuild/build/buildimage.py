"""`nsbuild image`: dockerTools' buildImage — one new layer on the base image, runAsRoot without KVM.

The new layer's own tree (`custom`) is made in the workspace: copyToRoot copied into it (merged with the
base image's directories and symlinks, see _Merger), the closure of any store paths in it, the Nix
database when asked. Without runAsRoot, extraCommands runs in it as the calling user and every entry
is owned by uid/gid. With runAsRoot, the sandbox of nsbuild.rootfs.customize (the one fakeRootCommands uses)
unpacks the base layers, puts `custom` on top, runs the script as namespace root chrooted into the
result, then extraCommands on the layer's own files, and writes the difference to the base.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from nsbuild.build import attest
from nsbuild.build.context import BuildContext, BuildResult
from nsbuild.build.steps import (
    new_image,
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
from nsbuild.core.progress import Progress
from nsbuild.errors import BuildError, SpecError
from nsbuild.layer.layer import Layer, LayerRequest, build_layer
from nsbuild.plan.closure import closure as store_closure
from nsbuild.plan.closure import output_hashes, referenced_paths
from nsbuild.plan.store import Store, StorePath
from nsbuild.rootfs.customize import CustomisationJob, build_customisation_layer
from nsbuild.rootfs.hosttree import OUTSIDE, STORE, HostTree, warning
from nsbuild.rootfs.nixdb import write_nix_db
from nsbuild.sandbox.tree import HostileLayer, ImageModel, place, remove
from nsbuild.spec.spec import ContentEntry, Spec
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.perms import compiled
from nsbuild.tar.tarinput import TarInput, load_tar_layer
from nsbuild.tar.tarwriter import Source

LAYER_COMMENT = "buildImage layer"


def build(ctx: BuildContext) -> BuildResult:
    spec, progress, options = ctx.spec, ctx.progress, ctx.options
    preflight_output(ctx)
    if options.cache_to or options.cache_from:
        progress.warn(
            "--cache-to/--cache-from: buildImage's single layer depends on its base and scripts "
            "and is always built; nothing is shared"
        )
    base, annotations, base_info = read_base(ctx, need_tar=True)
    base_layers = base.layers if base else []
    tars = _unique_tars(base_layers)
    model = _scan_base(tars, refuse_devices=spec.run_as_root is not None)
    t0 = time.monotonic()
    tar_layers = _tar_layers(ctx, model, tars)
    layer, closure = _new_layer(ctx, model, tars)
    seconds = time.monotonic() - t0
    progress.layer_done(len(tar_layers) + 1, len(tar_layers) + 1, LAYER_COMMENT, layer.tar.size, seconds)
    base_layers = recompressed(ctx, base_layers)
    image = new_image(ctx, base, base_layers, [*tar_layers, layer], annotations)
    docs = attest.documents(ctx, image, attest.Known(base, annotations, len(base_layers), closure))
    written = write_output(ctx, image, referrers=attest.referrers(ctx, docs))
    sbom = attest.finish(ctx, docs, written)
    return BuildResult(
        image,
        written.output,
        ctx.output.format,
        push=written.push,
        base=base_info,
        written=written.written,
        loaded=written.loaded,
        layer_sources=(
            *(("base", 0.0) for _ in base_layers),
            *(("built", 0.0) for _ in tar_layers),
            ("built", seconds),
        ),
        sbom=sbom,
    )


def _owner(spec: Spec) -> Owner:
    # buildImage has no uname/gname: names only for id 0 (as for layered's defaults), else none.
    return Owner(spec.uid, spec.gid, spec.uname if spec.uid == 0 else "", spec.gname if spec.gid == 0 else "")


def _tar_layers(ctx: BuildContext, model: ImageModel, tars: list[Path]) -> list[Layer]:
    """copyToRoot's `{"tar": …}` entries, each its own layer below the buildImage layer (extracting a
    tar to merge it into the layer's tree would lose its owners and devices as an unprivileged user).
    Each is applied to `model` (the later trees merge against its directories and symlinks) and goes
    to `tars`, the layers runAsRoot's sandbox unpacks below the new layer."""
    out: list[Layer] = []
    owner = OwnerPolicy.fixed_owner(_owner(ctx.spec), compiled(ctx.spec.perms))
    for entry in (e for e in ctx.spec.copy_to_root if e.tar):
        source = TarInput(entry.path, entry.target or "/", entry.keep_mtime, entry.field)
        tar = load_tar_layer(source, ctx.ws.path("tar"))
        comment = f"{entry.field.removesuffix('.tar')}: tar {entry.written} → {source.target}"
        try:
            request = LayerRequest(
                [],
                mtime=ctx.spec.mtime,
                owner=owner,
                compression=ctx.compression,
                keep_tar=True,
                comment=comment,
                tar=tar,
            )
            layer = build_layer(request, ctx.ws.blobs)
        finally:
            tar.plain.unlink(missing_ok=True)
        assert layer.tar.path is not None
        try:
            model.check_layer(layer.tar.path, entry.field)
        except HostileLayer as exc:
            text = str(exc).removeprefix(f"{entry.field}: ")
            if "is a device node" in text:
                # as for base images: the runAsRoot sandbox takes no device nodes from its lower layers
                text = text.split(";")[0] + "; runAsRoot takes none from a tar (mmdebstrap: --skip=output/dev)"
            raise BuildError(f"{entry.field}: {text}") from None
        ctx.progress.layer_done(len(out) + 1, len(out) + 1, comment, layer.tar.size, 0.0)
        tars.append(layer.tar.path)
        out.append(layer)
    return out


def _new_layer(ctx: BuildContext, model: ImageModel, tars: list[Path]) -> tuple[Layer, dict[str, StorePath]]:
    """The one new layer: copyToRoot and its store closure, then runAsRoot (in the sandbox over the
    base) or extraCommands (as the caller, in the layer's own tree); and the store closure it holds."""
    spec = ctx.spec
    custom = own_tree(ctx)
    merger = _Merger(custom, model, spec.keep_contents_dirlinks, ctx.progress, spec.store_dir)
    for entry in (e for e in spec.copy_to_root if not e.tar):
        try:
            merger.copy_entry(entry)
        except OSError as exc:
            raise BuildError(
                f"{entry.field}: cannot copy {exc.filename or entry.path}: {exc.strerror or exc}"
            ) from None
    merger.finish()
    store, closure = _add_store_closure(spec, custom, ctx.progress)
    env = scripts_env(ctx)
    owner = _owner(spec)
    scripted = spec.run_as_root is not None or bool(spec.extra_commands.strip())
    before = output_hashes(store, custom, closure) if scripted else set()
    if spec.run_as_root is not None:
        job = _RunAsRoot(ctx, custom, env, tars, owner, store, closure, before)
        return _run_as_root_layer(job), closure
    if spec.extra_commands.strip():
        run_extra_commands(ctx, custom, env)
        _add_script_references(spec, store, closure, custom, custom, ctx.progress, "extraCommands", before)
    policy = OwnerPolicy.fixed_owner(owner, compiled(spec.perms))
    return tree_layer(ctx, [Source(custom, "/")], policy, LAYER_COMMENT), closure


def _unique_tars(layers: list[Layer]) -> list[Path]:
    """Each base layer once, at its first place: a layer repeated in the manifest is applied once."""
    seen: set[str] = set()
    out = []
    for layer in layers:
        if layer.diff_id in seen or layer.tar.path is None:
            continue
        seen.add(layer.diff_id)
        out.append(layer.tar.path)
    return out


def _scan_base(tars: list[Path], *, refuse_devices: bool) -> ImageModel:
    model = ImageModel(refuse_devices=refuse_devices)
    for i, tar in enumerate(tars):
        try:
            model.check_layer(tar, f"fromImage layer {i}")
        except HostileLayer as exc:
            raise BuildError(f"refusing the base image: {exc}") from None
    return model


@dataclass(frozen=True)
class _RunAsRoot:
    """runAsRoot's inputs: the layer's own tree so far, the base's layer tars, and what the layer's
    store closure is (the store, the closure, what it referred to before the scripts)."""

    ctx: BuildContext
    custom: Path
    env: dict[str, str]
    tars: list[Path]
    owner: Owner
    store: Store
    closure: dict[str, StorePath]
    before: set[str]


def _run_as_root_layer(job: _RunAsRoot) -> Layer:
    """runAsRoot (then extraCommands) in the sandbox. When their output refers to store paths not in
    the layer yet, those join `custom` with their closure and the scripts run again over it: the
    layer is written whole by the sandbox, and in dockerTools' VM the script sees the store anyway."""
    ctx = job.ctx
    spec, ws, progress, options = ctx.spec, ctx.ws, ctx.progress, ctx.options
    out_tar = ws.root / "buildimage-layer.tar"
    for _ in range(3):  # a script whose every run names new store paths is not followed for ever
        progress.info("running runAsRoot")
        build_customisation_layer(
            CustomisationJob(
                custom_root=job.custom,
                lower=[],
                base_layer_tars=job.tars,
                script=spec.run_as_root or "",
                enable_fakechroot=True,
                root_owner=job.owner,
                perms=spec.perms,
                mtime=spec.mtime,
                isolation=options.isolation,
                network=options.network,
                workdir=ws.path("sandbox"),
                out_tar=out_tar,
                log=progress,
                env=job.env,
                scratch_mib=spec.disk_size,
                memory_mib=spec.build_vm_memory_size,
                what="runAsRoot",
                store_dir=spec.store_dir,
                after_script=spec.extra_commands,
                after_env=job.env,
            )
        )
        found = _add_script_references(
            spec, job.store, job.closure, out_tar, job.custom, progress, "runAsRoot", job.before
        )
        if not found:
            break
    else:
        raise BuildError(
            "runAsRoot: its output names new store paths every time it runs; cannot settle which belong in the layer"
        )
    return script_layer(ctx, out_tar, LAYER_COMMENT)


def _add_store_closure(spec: Spec, custom: Path, progress: Progress) -> tuple[Store, dict[str, StorePath]]:
    """As dockerTools: store paths among copyToRoot (and named in config) bring their closure into the
    layer at their store location; includeNixDB registers it. Returns the store and that closure."""
    store = Store(spec.store_dir)
    roots = []
    for entry in spec.copy_to_root:
        e = None if entry.tar else store.entry_of(entry.path)
        if e is not None:
            roots.append(e)
    roots += store.paths_in_text(json.dumps(spec.config))
    if not roots:
        if spec.include_nix_db:
            raise SpecError(
                "includeNixDB",
                f"the image has no store paths to register (no copyToRoot entry "
                f"inside {spec.store_dir}); there is no Nix store in the image",
            )
        return store, {}
    closure = store_closure(store, roots)
    progress.info(f"adding the closure of copyToRoot: {len(closure)} store paths")
    _place_store_paths(spec, custom, closure)
    if spec.include_nix_db:
        write_nix_db(custom, closure, roots, spec.store_dir, spec.mtime)
    return store, closure


def _place_store_paths(spec: Spec, custom: Path, paths: dict[str, StorePath]) -> None:
    for name, sp in sorted(paths.items()):
        place(sp.path, f"{spec.store_dir.rstrip('/')}/{name}", custom, link=False)


def _add_script_references(
    spec: Spec,
    store: Store,
    closure: dict[str, StorePath],
    output: Path,
    custom: Path,
    progress: Progress,
    what: str,
    before: set[str],
) -> bool:
    """The store paths the scripts' output (`custom` itself, or the sandbox's tar) refers to and the
    layer did not before (`before`), with their closure, placed in `custom` and added to `closure` (the
    Nix database keeps copyToRoot's, as dockerTools'). True when there were any."""
    found = referenced_paths(store, output, closure, before)
    if not found:
        return False
    more = {n: sp for n, sp in store_closure(store, found).items() if n not in closure}
    progress.info(
        f"{what}' output refers to {len(found)} store path(s) not in copyToRoot's closure: adding "
        f"{len(more)} store paths"
    )
    _place_store_paths(spec, custom, more)
    closure.update(more)
    return True


class _Merger:
    """copyToRoot into the new layer's tree, never replacing a directory by a symlink or the other
    way round behind the user's back, and never reading the build host outside the given trees.

    The entry itself is followed when it is a symlink (the user named it: `./result`, a link to a
    rootfs). Below it every symlink is copied as a symlink (nsbuild.rootfs.hosttree), except one into storeDir
    that leads to a directory, which becomes that directory unless keepContentsDirlinks (buildEnv
    trees, as dockerTools). Links leading out of the tree get one warning per entry. Hard links within
    the trees stay hard links.
    A directory arriving where the base image (or an earlier entry) has a symlink is merged into the
    directory the symlink leads to inside the image (a warning says so); where it leads nowhere, the
    build fails. A file or symlink arriving where a directory is fails, except a symlink to a directory
    inside the tree or the store, whose content is then merged into the existing directory (warning).
    """

    def __init__(
        self, custom: Path, model: ImageModel, keep_dirlinks: bool, progress: Progress, store_dir: str = "/nix/store"
    ) -> None:
        self.custom = custom
        self.model = model
        self.keep = keep_dirlinks
        self.progress = progress
        self.store_dir = store_dir
        self.field = "copyToRoot"
        self.tree = HostTree("/", store_dir)
        self.warned: set[str] = set()
        self.modes: dict[Path, int] = {}
        # host inode -> (first copy in the layer, its inode): later names become hard links to it
        self.inodes: dict[tuple[int, int], tuple[Path, int]] = {}

    def _mode(self, path: Path, mode: int) -> None:
        """Directory modes are set at the end: a 0555 directory must not stop us filling it."""
        self.modes[path] = mode
        os.chmod(path, mode | 0o700)

    def finish(self) -> None:
        for path, mode in sorted(self.modes.items(), key=lambda pm: -len(pm[0].parts)):
            os.chmod(path, mode)

    # the image as the new layer will see it: this layer's tree first, then the base
    def _layer_kind(self, parts: list[str]) -> tuple[str, str] | None:
        if not parts:
            return ("dir", "")
        cur = self.custom
        for part in parts[:-1]:
            cur = cur / part
            # Never look through a link of the layer: it may lead out of it (`var/run -> /run`).
            if os.path.islink(cur) or not os.path.isdir(cur):
                return None
        cur = cur / parts[-1]
        try:
            st = os.lstat(cur)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISDIR(st.st_mode):
            return ("dir", "")
        if stat.S_ISLNK(st.st_mode):
            return ("link", os.readlink(cur))
        return ("file", "")

    def kind(self, parts: list[str]) -> tuple[str, str] | None:
        got = self._layer_kind(parts)
        if got is not None:
            return got
        node = self.model.lookup(parts)
        return None if node is None else (node.kind, node.link)

    def _where(self, parts: list[str]) -> str:
        return "/" + "/".join(parts)

    def dir_for(self, parts: list[str]) -> list[str]:
        """The directory `parts` names in the image, symlinks followed inside it; made in the layer."""
        cur: list[str] = []
        for part in parts:
            nxt = [*cur, part]
            k = self.kind(nxt)
            if k is not None and k[0] == "link":
                resolved = self.model.resolve(nxt, self._layer_kind)
                if resolved is None:
                    raise BuildError(
                        f"{self.field}: {self._where(nxt)} is a symlink to {k[1]!r} in the image, "
                        "which is not a directory in it: cannot merge a directory into it"
                    )
                where = self._where(nxt)
                if where not in self.warned:
                    self.warned.add(where)
                    self.progress.warn(
                        f"{self.field}: {where} is a symlink to {k[1]!r} in the image; "
                        f"merging the directory into {self._where(resolved)}"
                    )
                self._make_dirs(resolved)
                cur = resolved
                continue
            path = self.custom.joinpath(*nxt)
            if k is not None and k[0] == "file" and os.path.lexists(path):
                remove(path)  # a file of an earlier copyToRoot entry gives way to a directory
            if not os.path.isdir(path) or os.path.islink(path):
                node = self.model.lookup(nxt)
                os.mkdir(path)
                self._mode(path, node.mode if node is not None and node.kind == "dir" and node.mode else 0o755)
            cur = nxt
        return cur

    def _make_dirs(self, parts: list[str]) -> None:
        for i in range(1, len(parts) + 1):
            p = self.custom.joinpath(*parts[:i])
            if not os.path.lexists(p):
                node = self.model.lookup(parts[:i])
                os.mkdir(p)
                self._mode(p, node.mode if node is not None and node.mode else 0o755)

    def copy_entry(self, entry: ContentEntry) -> None:
        self.field = entry.field
        # The entry itself is followed: naming it is the user's explicit choice, whatever it links to.
        real = Path(os.path.realpath(entry.path))
        st = os.stat(real)
        is_dir = stat.S_ISDIR(st.st_mode)
        if entry.target is not None:
            parts = [p for p in entry.target.split("/") if p]
        else:
            parts = [] if is_dir else [Path(entry.path).name]
        self.tree = HostTree(str(real if is_dir else real.parent), self.store_dir)
        if is_dir:
            self._copy_dir(real, st, parts, set())
        else:
            self._copy(real, parts, set())
        line = warning(self.field, self.tree.escaped)
        if line:
            self.progress.warn(line)

    def _copy(self, src: Path, parts: list[str], stack: set[tuple[int, int]]) -> None:
        """Copy one host entry; `src` is a physical path (no symlink among its parents)."""
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            self._copy_link(src, parts, stack)
        elif stat.S_ISDIR(st.st_mode):
            self._copy_dir(src, st, parts, stack)
        elif stat.S_ISREG(st.st_mode):
            self._put(parts, lambda dest: self._copy_file(src, st, dest), "a file")
        elif stat.S_ISFIFO(st.st_mode):
            self._put(parts, lambda dest: os.mkfifo(dest, stat.S_IMODE(st.st_mode)), "a fifo")
        else:
            raise BuildError(f"{self.field}: {src} is a socket or device; it cannot be copied into an image")

    def _copy_link(self, src: Path, parts: list[str], stack: set[tuple[int, int]]) -> None:
        text = os.readlink(src)
        kind = self.tree.note(self._where(parts), str(src.parent), text)
        real = self.tree.directory_behind(src, kind)
        if real is not None and kind == STORE and not self.keep:
            self._copy_dir(real, os.stat(real), parts, stack)  # a buildEnv link: its content, as dockerTools
            return
        if real is not None and parts:
            dest = [*self.dir_for(parts[:-1]), parts[-1]]
            here = self.kind(dest)
            if here is not None and here[0] == "dir":
                self.progress.warn(
                    f"{self.field}: {self._where(dest)} is a directory in the image; "
                    f"merging the content of the symlink {src} -> {text} into "
                    "it instead of replacing it by a symlink"
                )
                self._copy_dir(real, os.stat(real), parts, stack)
                return
        hint = (
            "; it leads out of the tree and is never followed"
            if kind == OUTSIDE
            else " (set keepContentsDirlinks to false to copy the store directory's content)"
            if kind == STORE
            else ""
        )
        self._put(parts, lambda dest: os.symlink(text, dest), f"the symlink -> {text!r}", hint)

    def _copy_file(self, src: Path, st: os.stat_result, dest: Path) -> None:
        key = (st.st_dev, st.st_ino)
        first = self.inodes.get(key) if st.st_nlink > 1 else None
        if first is not None:
            try:
                still = os.lstat(first[0]).st_ino == first[1]  # not replaced by a later entry since
            except FileNotFoundError:
                still = False
            if still:
                os.link(first[0], dest, follow_symlinks=False)
                return
        shutil.copyfile(src, dest, follow_symlinks=False)
        os.chmod(dest, stat.S_IMODE(st.st_mode))
        if st.st_nlink > 1:
            self.inodes[key] = (dest, os.lstat(dest).st_ino)

    def _copy_dir(self, src: Path, st: os.stat_result, parts: list[str], stack: set[tuple[int, int]]) -> None:
        key = (st.st_dev, st.st_ino)
        if key in stack:
            raise BuildError(f"{self.field}: {src} leads back to a directory it is inside (symlink loop)")
        where = self.dir_for(parts)
        if where == parts and parts:
            self._mode(self.custom.joinpath(*where), stat.S_IMODE(st.st_mode))
        with os.scandir(src) as it:
            names = sorted(e.name for e in it)
        for name in names:
            self._copy(src / name, [*where, name], stack | {key})

    def _put(self, parts: list[str], make: object, what: str, hint: str = "") -> None:
        if not parts:
            raise BuildError(f"{self.field}: cannot replace / by {what}")
        parent = self.dir_for(parts[:-1])
        dest_parts = [*parent, parts[-1]]
        k = self.kind(dest_parts)
        if k is not None and k[0] == "dir":
            raise BuildError(
                f"{self.field}: {self._where(dest_parts)} is a directory in the image; it "
                f"cannot be replaced by {what}{hint}"
            )
        dest = self.custom.joinpath(*dest_parts)
        if os.path.lexists(dest):
            remove(dest)
        make(dest)  # type: ignore[operator]
