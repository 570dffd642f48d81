"""What a chrooted script (runAsRoot, enableFakechroot) sees of the host: the store and the host's tools.

dockerTools' scripts see the Nix store (runAsRoot's VM mounts it; fakechroot leaves it visible) and
run with the builder's bash and tools on PATH. Here, read-only mounts inside the image's tree stand in
for that, and none of them reaches the layer. Every view of a host directory is an overlayfs without
an upper directory: read-only for good (namespace root cannot remount it writable):

  storeDir         at its own path: the host's store; where the image has store paths of its own (in
                   its layers), the image's store over the host's, so its own entries win.
  /.nsbuild-host   a read-only tmpfs holding the host's /usr, /bin, /sbin, /lib* (the host's symlinks,
                   as on a merged-/usr system, are kept): the host's shell runs
                   the script when the image has none, and its tools come after the image's own on
                   PATH.
  the host's ELF interpreter (e.g. /lib64/ld-linux-x86-64.so.2), where the image has none at that
                   path: a read-only bind, so the host's tools can start; they find their libraries
                   through LD_LIBRARY_PATH (set only in that case).

The mount points that did not exist in the image are created before the layer's reference state is
taken (in the overlay's lower tree, or before the copy engine's snapshot), so they are never part of
the layer; what a script writes through them fails (read-only).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nsbuild.sandbox import mounts

HOST_DIR = ".nsbuild-host"
HOST_PARTS = ("usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32")
HOST_PATH = ":".join(f"/{HOST_DIR}/{d}" for d in ("usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"))
_KEPT_FLAGS = 2 | 4 | 8 | 1024 | 2048 | 4096  # ST_NOSUID NODEV NOEXEC NOATIME NODIRATIME RELATIME (= MS_*)


@dataclass
class View:
    """What prepare() found and created: the plan for mount()."""

    store: str | None = None  # storeDir, absolute
    store_in_image: bool = False  # the image has that directory already (its own store paths)
    loader: str | None = None  # the host shell's ELF interpreter, absolute
    bind_loader: bool = False  # the image has none at that path: the host's is bound there
    created: list[str] = field(default_factory=list)  # mount points made in the image's tree


def _plain_path(root: Path, rel: str) -> bool:
    """Whether every existing component of root/rel is a real directory (no symlink on the way):
    a mount point is only made where the path means the same inside the chroot as here."""
    cur = root
    for part in [p for p in rel.split("/") if p][:-1]:
        cur = cur / part
        if os.path.islink(cur) or (os.path.lexists(cur) and not cur.is_dir()):
            return False
    last = root / rel
    return not os.path.islink(last)


def _make(root: Path, rel: str, created: list[str], is_file: bool = False) -> None:
    parts = [p for p in rel.split("/") if p]
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        p = root / sub
        if os.path.lexists(p):
            continue
        if is_file and i == len(parts):
            p.touch(mode=0o755)
        else:
            p.mkdir(mode=0o755)
        created.append(sub)


def host_shell() -> str | None:
    found = shutil.which("bash", path="/usr/bin:/bin")
    return os.path.realpath(found) if found else None


def prepare(root: Path, store_dir: str | None) -> View:
    """Make the mount points the host view needs in `root` (the tree whose state is the layer's
    reference: the overlay's lower tree or the copy engine's tree before its snapshot)."""
    view = View()
    _make(root, HOST_DIR, view.created)
    if store_dir and _plain_path(root, store_dir.lstrip("/")) and os.path.isdir(store_dir):
        view.store = store_dir
        target = root / store_dir.lstrip("/")
        view.store_in_image = target.is_dir() and any(target.iterdir())
        _make(root, store_dir.lstrip("/"), view.created)
    shell = host_shell()
    view.loader = elf_interp(Path(shell)) if shell else None
    rel = view.loader.lstrip("/") if view.loader else ""
    # (An image whose path to it holds a symlink, e.g. /lib64 -> usr/lib64, gets no loader bound.)
    if rel and not os.path.lexists(root / rel) and _plain_path(root, rel):
        _make(root, rel, view.created, is_file=True)
        view.bind_loader = True
    return view


def _escape(path: str) -> str:
    """A path as an overlayfs lowerdir entry: ':' separates entries and ',' options."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _ro_overlay(lowers: list[str], target: Path, empty: Path) -> None:
    """`lowers` (first on top) as one read-only file system at target. An overlay without an upper
    directory cannot be remounted writable, not even by namespace root (a read-only bind could be:
    the script must never write the host's files, the caller's own store included). The empty
    directory is a second layer where there is one lower only (the kernel wants two then)."""
    layers = [*lowers, str(empty)] if len(lowers) == 1 else lowers
    data = "lowerdir=" + ":".join(_escape(os.path.abspath(p)) for p in layers)
    mounts.mount("overlay", target, "overlay", mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV, data)


def _bind_ro(source: str, target: Path) -> None:
    """A read-only bind (the loader file, whose source lies in a read-only overlay already)."""
    mounts.mount(source, target, None, mounts.MS_BIND)
    # The flags the kernel keeps locked must be repeated, else the read-only remount is refused.
    kept = os.statvfs(target).f_flag & _KEPT_FLAGS
    mounts.mount(None, target, None, mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY | kept)


def _host_tree(merged: Path, empty: Path, done: list[Path]) -> None:
    top = merged / HOST_DIR
    mounts.mount("tmpfs", top, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "size=64k,mode=0755")
    done.append(top)
    for name in HOST_PARTS:
        host = Path("/") / name
        if host.is_symlink():
            target = os.readlink(host)
            # An absolute target would lead into the image's own tree: keep it inside the host view.
            os.symlink(f"/{HOST_DIR}{target}" if target.startswith("/") else target, top / name)
        elif host.is_dir():
            (top / name).mkdir()
            try:
                _ro_overlay([str(host)], top / name, empty)
            except OSError as exc:
                # Never a plain bind instead: namespace root could remount that writable.
                _log(f"warning: the host's /{name} is not visible to the script: {exc.strerror}")
                continue
            done.append(top / name)
    kept = os.statvfs(top).f_flag & _KEPT_FLAGS
    mounts.mount(None, top, None, mounts.MS_REMOUNT | mounts.MS_RDONLY | kept, "size=64k,mode=0755")


def _store(merged: Path, view: View, empty: Path) -> Path | None:
    assert view.store is not None
    target = merged / view.store.lstrip("/")
    if not (_plain_path(merged, view.store.lstrip("/")) and target.is_dir()):
        _log(f"warning: the store ({view.store}) is not visible to the script: the image has a symlink on its path")
        return None
    # The image's own store paths (in its layers) on top of the host's.
    lowers = [str(target), view.store] if view.store_in_image else [view.store]
    try:
        _ro_overlay(lowers, target, empty)
    except OSError as exc:
        _log(f"warning: the store ({view.store}) is not visible to the script: {exc.strerror}")
        return None
    return target


def mount(merged: Path, view: View, empty: Path) -> list[Path]:
    """The host view's mounts in `merged` (the tree the script's chroot is); `empty` is an empty
    directory outside it. Returns the mount points to undo (deepest last)."""
    done: list[Path] = []
    if not (_plain_path(merged, HOST_DIR) and (merged / HOST_DIR).is_dir()) or any((merged / HOST_DIR).iterdir()):
        # A base image's own /.nsbuild-host (a symlink, say) must never decide where host mounts go.
        raise RuntimeError(f"the image has its own /{HOST_DIR} (where nsbuild shows the host's tools); refusing it")
    _host_tree(merged, empty, done)
    if view.store:
        got = _store(merged, view, empty)
        if got is not None:
            done.append(got)
    if view.bind_loader and view.loader:
        rel = view.loader.lstrip("/")
        # The merged tree may differ from the one prepare() saw (a later layer's /lib64 -> usr/lib64):
        # a mount point reached through a symlink could lead anywhere, so the loader is left out there.
        if not (_plain_path(merged, rel) and os.path.isfile(merged / rel)):
            view.bind_loader = False
            return done
        # From inside the host view: the read-only overlay stands behind the bind.
        source = merged / inside_path(view.loader).lstrip("/")
        _bind_ro(str(source), merged / rel)
        done.append(merged / rel)
    return done


def library_path(view: View) -> list[str]:
    """The host's library directories as the chroot sees them (for the host shell and, where the
    image has no loader of its own, for every host tool)."""
    arch = getattr(sys.implementation, "_multiarch", "") or ""
    names = [f"lib/{arch}", f"usr/lib/{arch}"] if arch else []
    names += ["lib64", "usr/lib64", "lib", "usr/lib"]
    out: list[str] = []
    for n in names:
        if os.path.isdir(f"/{n}"):
            inside = inside_path(f"/{n}")
            if inside not in out:
                out.append(inside)
    return out


def inside_path(host: str) -> str:
    """Where a host path is in the host view. Its real path: the host's own absolute symlinks (e.g.
    /lib64/ld-linux-x86-64.so.2 -> /lib/...) would resolve inside the image."""
    return f"/{HOST_DIR}{os.path.realpath(host)}"


def shell_argv(view: View, extra_libs: list[str]) -> list[str] | None:
    """The host's bash, as the chroot sees it, started through the host's loader (whatever loader
    and C library the image has, or none)."""
    shell = host_shell()
    if not shell:
        return None
    if not view.loader:
        return [inside_path(shell), "-e", "-c"]  # a static bash
    libs = ":".join([*extra_libs, *library_path(view)])
    return [inside_path(view.loader), "--library-path", libs, inside_path(shell), "-e", "-c"]


def elf_interp(path: Path) -> str | None:
    """The PT_INTERP of an ELF executable (its loader's path), None for a static one."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return None
            is64 = head[4] == 2
            order: Literal["little", "big"] = "little" if head[5] == 1 else "big"

            def num(buf: bytes, lo: int, hi: int) -> int:
                return int.from_bytes(buf[lo:hi], order)

            phoff, entsize, count = (
                (num(head, 32, 40), num(head, 54, 56), num(head, 56, 58))
                if is64
                else (num(head, 28, 32), num(head, 42, 44), num(head, 44, 46))
            )
            f.seek(phoff)
            table = f.read(entsize * count)
            for i in range(count):
                e = table[i * entsize : (i + 1) * entsize]
                if num(e, 0, 4) != 3:  # PT_INTERP
                    continue
                off, size = (num(e, 8, 16), num(e, 32, 40)) if is64 else (num(e, 4, 8), num(e, 16, 20))
                f.seek(off)
                return f.read(size).rstrip(b"\0").decode()
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _log(msg: str) -> None:
    sys.stderr.write(f"nsbuild: {msg}\n")
    sys.stderr.flush()
