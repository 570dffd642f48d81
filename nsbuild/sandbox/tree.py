"""Trees inside the sandbox: base layers unpacked, earlier layers assembled, and copy-and-diff.

Everything here runs inside the sandbox (as namespace root, or under fakeroot), so chown/mknod either
work for real or are recorded by fakeroot. Paths are walked without following symlinks: a layer or a
script must not make us write outside the tree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsbuild.tar.tarscan import Member, TarFormatError, scan_file

WH = ".wh."
OPQ = ".wh..wh..opq"
OPAQUE_XATTR = "user.overlay.opaque"


def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def _safe_dir(root: Path, parts: list[str], create: bool = True) -> Path | None:
    """root/parts as a real directory (created 0755 when missing); None when a symlink or file is in the way."""
    cur = root
    for part in parts:
        if part == "..":
            return None
        nxt = cur / part
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(nxt, 0o755)
            cur = nxt
            continue
        if not stat.S_ISDIR(st.st_mode):
            return None
        cur = nxt
    return cur


def remove(path: Path) -> None:
    """Remove a file or a whole tree, making read-only directories writable first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return

    def onerror(func: Any, p: str, exc: Any) -> None:
        # chmod follows symlinks: never touch one (it may point out of the tree).
        for q in (os.path.dirname(p), p):
            if not os.path.islink(q):
                with contextlib.suppress(OSError):
                    os.chmod(q, 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    if not os.path.islink(path):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            with contextlib.suppress(OSError):
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
    shutil.rmtree(path, onerror=onerror)


def _chown(path: Path, uid: int, gid: int) -> None:
    try:
        os.lchown(path, uid, gid)
    except OSError as exc:
        # An id outside the map: the entry keeps namespace root. It is only what the script sees.
        if exc.errno not in (errno.EINVAL, errno.EPERM):
            raise


def _set_xattrs(path: Path, xattrs: dict[str, bytes]) -> None:
    for key, value in xattrs.items():
        with contextlib.suppress(OSError):
            os.setxattr(path, key, value, follow_symlinks=False)


class HostileLayer(Exception):
    """A base layer entry that could write outside the image's tree (or is not a sound tar)."""


@dataclass(slots=True)  # one per entry of the base image: a million entries must stay small
class _Node:
    kind: str  # "dir", "link", "file" (anything else that is not a directory)
    link: str = ""
    layer: str = ""
    children: dict[str, _Node] | None = None
    mode: int = 0


class ImageModel:
    """The image's tree as the tar headers of its layers describe it, applied in order (whiteouts and
    opaque directories too), without writing anything. It refuses what a hostile layer could use to
    write outside the tree: `..`, absolute names, writing through a symlink (also one an earlier layer
    planted), hard links to outside or missing files, device nodes (when asked), declared sizes beyond
    the layer's end, truncated archives."""

    def __init__(self, *, refuse_devices: bool = False) -> None:
        self.root = _Node("dir", children={})
        self.refuse_devices = refuse_devices

    def lookup(self, parts: list[str]) -> _Node | None:
        node = self.root
        for p in parts:
            if node.kind != "dir" or node.children is None or p not in node.children:
                return None
            node = node.children[p]
        return node

    def resolve(
        self, parts: list[str], extra: Callable[[list[str]], tuple[str, str] | None] | None = None
    ) -> list[str] | None:
        """parts with symlinks resolved inside the image (as a chroot sees them); None when it does not
        end at a directory (dangling, a file, a loop). `extra` overrides the model for a prefix (the new
        layer's own entries): it returns (kind, link) or None."""
        todo = list(parts)
        cur: list[str] = []
        for _ in range(256):
            if not todo:
                kind = self._kind(cur, extra)
                return cur if kind is not None and kind[0] == "dir" else None
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                cur = cur[:-1]
                continue
            kind = self._kind([*cur, part], extra)
            if kind is None:
                return None
            if kind[0] == "link":
                if kind[1].startswith("/"):
                    cur = []
                todo = [x for x in kind[1].split("/") if x] + todo
                continue
            cur.append(part)
        return None

    def _kind(
        self, parts: list[str], extra: Callable[[list[str]], tuple[str, str] | None] | None
    ) -> tuple[str, str] | None:
        if not parts:
            return ("dir", "")
        if extra is not None:
            got = extra(parts)
            if got is not None:
                return got
        node = self.lookup(parts)
        return None if node is None else (node.kind, node.link)

    def _parent(self, parts: list[str], what: str, create: bool) -> _Node | None:
        node = self.root
        for i, p in enumerate(parts):
            assert node.children is not None
            child = node.children.get(p)
            if child is None:
                if not create:
                    return None
                child = node.children[p] = _Node("dir", children={})
            if child.kind == "link":
                where = "/" + "/".join(parts[: i + 1])
                raise HostileLayer(
                    f"{what}: writes through the symlink {where} -> {child.link}"
                    + (f" (planted by {child.layer})" if child.layer else "")
                )
            if child.kind != "dir":
                if not create:
                    return None
                raise HostileLayer(f"{what}: /{'/'.join(parts[: i + 1])} is not a directory")
            node = child
        return node

    def check_layer(self, tar_path: Path, label: str) -> list[Member]:
        """Validate one layer against the tree so far and apply it; returns its members."""
        # nsbuild.tar.tarscan, not tarfile: strict headers (a negative size must not loop), and for what it
        # accepts it reads the same entries as tarfile, which unpack_layer uses.
        try:
            members = list(scan_file(tar_path))
        except TarFormatError as exc:
            raise HostileLayer(f"{label}: not a sound tar archive: {exc}") from None
        except OSError as exc:
            raise HostileLayer(f"{label}: cannot read: {exc.strerror or exc}") from None
        for m in members:
            self._check_name(m, label)
        for m in members:
            parts = _parts(m.name)
            base = parts[-1] if parts else ""
            if base == OPQ:
                d = self._parent(parts[:-1], f"{label}: {m.name!r}", create=False)
                if d is not None and d.children is not None:
                    d.children.clear()
            elif base.startswith(WH):
                d = self._parent(parts[:-1], f"{label}: {m.name!r}", create=False)
                if d is not None and d.children is not None:
                    d.children.pop(base[len(WH) :], None)
        for m in members:
            parts = _parts(m.name)
            if not parts or parts[-1].startswith(WH):
                continue
            what = f"{label}: {m.name!r}"
            parent = self._parent(parts[:-1], what, create=True)
            assert parent is not None and parent.children is not None
            if m.islnk():
                target = _parts(m.linkname)
                tparent = self._parent(target[:-1], f"{what} (hard link to {m.linkname!r})", create=False)
                tnode = tparent.children.get(target[-1]) if tparent and tparent.children and target else None
                if tnode is None or tnode.kind == "dir":
                    raise HostileLayer(f"{what}: hard link to {m.linkname!r}, which is not a file in the image")
                parent.children[parts[-1]] = _Node(tnode.kind, tnode.link, label)
                continue
            old = parent.children.get(parts[-1])
            if m.isdir():
                if old is None or old.kind != "dir":
                    old = parent.children[parts[-1]] = _Node("dir", layer=label, children={})
                old.mode = m.mode & 0o7777
            elif m.issym():
                parent.children[parts[-1]] = _Node("link", m.linkname, label)
            else:
                parent.children[parts[-1]] = _Node("file", layer=label)
        return members

    def _check_name(self, m: Member, label: str) -> None:
        base = m.name.rstrip("/").rpartition("/")[2]
        if base.startswith(WH) and base != OPQ and base[len(WH) :] in ("", ".", ".."):
            # Whiting out "..", "." or "" would delete the parent of the tree, or the directory itself.
            raise HostileLayer(f"{label}: {m.name!r} is a whiteout of {base[len(WH) :]!r}, not of a name")
        bad_xattr = [
            k for k in m.pax or {} if k.startswith(("SCHILY.xattr.trusted.overlay.", "SCHILY.xattr.user.overlay."))
        ]
        if bad_xattr:
            # overlayfs reads these from the lower layers: a base layer must not steer the script's mount.
            raise HostileLayer(f"{label}: {m.name!r} carries the overlayfs attribute {bad_xattr[0][13:]!r}")
        raw = os.fsencode(m.name)
        if len(raw) > 4095 or len(os.fsencode(m.linkname)) > 4095 or max(map(len, raw.split(b"/"))) > 255:
            raise HostileLayer(f"{label}: {m.name[:80]!r}...: a name or link target longer than the kernel takes")
        if m.name.startswith("/"):
            raise HostileLayer(f"{label}: {m.name!r} is an absolute name")
        if ".." in m.name.split("/"):
            raise HostileLayer(f"{label}: {m.name!r} contains '..'")
        if m.islnk() and (m.linkname.startswith("/") or ".." in m.linkname.split("/") or not _parts(m.linkname)):
            raise HostileLayer(f"{label}: {m.name!r} is a hard link to {m.linkname!r}, outside the layer's tree")
        if self.refuse_devices and (m.ischr() or m.isblk()):
            raise HostileLayer(
                f"{label}: {m.name!r} is a device node ({m.devmajor}:{m.devminor}); "
                "base images used with runAsRoot may not hold any"
            )
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.ischr() or m.isblk() or m.isfifo()):
            raise HostileLayer(f"{label}: {m.name!r} has an unsupported tar entry type {m.type!r}")


def unpack_layer(
    tar_path: Path, root: Path, devices: dict[str, list] | None = None, model: ImageModel | None = None, label: str = ""
) -> None:
    """Apply one image layer to root: whiteouts first, then the entries (as a container runtime does).

    With a model, the layer is validated against it first (HostileLayer on anything that could write
    outside root); on disk, a symlink or file in the way of a parent raises too, never written through.
    Where the kernel refuses device nodes (a user namespace), an empty placeholder file stands in and
    `devices` gets its relative name → [kind, major, minor], so the writer can restore it if the
    script copies it up.
    """
    label = label or str(tar_path)
    if model is not None:
        model.check_layer(tar_path, label)
    with tarfile.open(tar_path, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            parts = _parts(m.name)
            if not parts:
                continue
            if ".." in parts:
                raise HostileLayer(f"{label}: {m.name!r} contains '..'")
            base = parts[-1]
            if base == OPQ:
                d = _safe_dir(root, parts[:-1], create=False)
                if d is not None:
                    for child in os.listdir(d):
                        remove(d / child)
            elif base.startswith(WH):
                if base[len(WH) :] in ("", ".", ".."):
                    raise HostileLayer(f"{label}: {m.name!r} is a whiteout of {base[len(WH) :]!r}, not of a name")
                d = _safe_dir(root, parts[:-1], create=False)
                if d is not None:
                    remove(d / base[len(WH) :])
        for m in members:
            parts = _parts(m.name)
            if not parts or parts[-1].startswith(WH):
                continue
            parent = _safe_dir(root, parts[:-1])
            if parent is None:
                raise HostileLayer(f"{label}: {m.name!r}: a symlink or file is in the way of its directory")
            dest = parent / parts[-1]
            rel = "/".join(parts)
            if devices is not None:
                devices.pop(rel, None)
            if _extract(tf, m, dest, root) == "placeholder" and devices is not None:
                devices[rel] = ["char" if m.ischr() else "block", m.devmajor, m.devminor]


def _extract(tf: tarfile.TarFile, m: tarfile.TarInfo, dest: Path, root: Path) -> str | None:
    xattrs = {
        k[len("SCHILY.xattr.") :]: v.encode("utf-8", "surrogateescape")
        for k, v in m.pax_headers.items()
        if k.startswith("SCHILY.xattr.")
    }
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(dest)
    if existing is not None and not (m.isdir() and stat.S_ISDIR(existing.st_mode)):
        remove(dest)
    mode = m.mode & 0o7777
    if m.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(dest, 0o700)
    elif m.isreg():
        src = tf.extractfile(m)
        assert src is not None
        with src, open(dest, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    elif m.issym():
        os.symlink(m.linkname, dest)
    elif m.islnk():
        target = _parts(m.linkname)
        tdir = _safe_dir(root, target[:-1], create=False) if target else None
        if tdir is None:
            return None
        try:
            os.link(tdir / target[-1], dest, follow_symlinks=False)
        except OSError:
            return None
        return None  # a hard link shares the target's metadata
    elif m.ischr() or m.isblk() or m.isfifo():
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
        made = None
        try:
            os.mknod(dest, kind | 0o600, os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0)
        except PermissionError:
            # No device nodes in a user namespace: an empty file stands in for it.
            with open(dest, "xb"):
                made = "placeholder"
        _chown(dest, m.uid, m.gid)
        os.chmod(dest, mode)
        return made
    else:
        return None
    _chown(dest, m.uid, m.gid)
    if not m.issym():
        os.chmod(dest, mode)
        _set_xattrs(dest, xattrs)
    return None


# --- assembling earlier layers -------------------------------------------------------------------------


def _copy_meta(src_st: os.stat_result, dest: Path) -> None:
    os.chmod(dest, stat.S_IMODE(src_st.st_mode))


def place(host: Path, target: str, root: Path, *, link: bool) -> None:
    """Put a host tree/file/symlink at `target` under root; later calls win for non-directories.

    link=True hardlinks regular files namespace root owns (an overlayfs lower layer is never written
    to) and copies the rest, or where the kernel refuses (another file system, protected_hardlinks).
    Symlinks are recreated, never followed; files hard-linked to each other within the tree stay so.
    """
    parts = _parts(target)
    parent = _safe_dir(root, parts[:-1]) if parts else None
    dest = root if not parts else (parent / parts[-1] if parent is not None else None)
    if dest is None:
        return
    _place(host, dest, link, {})


Inodes = dict[tuple[int, int], tuple[Path, int]]  # host inode -> (its first copy, that copy's inode)


def _place(src: Path, dest: Path, link: bool, inodes: Inodes) -> None:
    st = os.lstat(src)
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(dest)
    if stat.S_ISDIR(st.st_mode):
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            remove(dest)
            existing = None
        if existing is None:
            os.mkdir(dest, 0o700)
        with os.scandir(src) as it:
            names = sorted(e.name for e in it)
        for name in names:
            _place(src / name, dest / name, link, inodes)
        _copy_meta(st, dest)
        return
    if existing is not None:
        remove(dest)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dest)
    elif stat.S_ISREG(st.st_mode):
        _place_file(src, st, dest, link, inodes)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dest, stat.S_IMODE(st.st_mode))
    # sockets and devices on the host are not part of an image


def _place_file(src: Path, st: os.stat_result, dest: Path, link: bool, inodes: Inodes) -> None:
    key = (st.st_dev, st.st_ino)
    first = inodes.get(key) if st.st_nlink > 1 else None
    if first is not None:
        with contextlib.suppress(OSError):
            if os.lstat(first[0]).st_ino == first[1]:  # still the copy made for this inode
                os.link(first[0], dest, follow_symlinks=False)
                return
    # Hardlink only what namespace root owns: overlayfs cannot copy up a lower file whose owner
    # or group is not mapped (EOVERFLOW), and content layers are root's in the image anyway.
    linked = False
    if link and st.st_uid == 0 and st.st_gid == 0:
        try:
            os.link(src, dest, follow_symlinks=False)
            linked = True
        except OSError:
            pass
    if not linked:
        shutil.copyfile(src, dest, follow_symlinks=False)
        _copy_meta(st, dest)
    if st.st_nlink > 1:
        inodes[key] = (dest, os.lstat(dest).st_ino)


def copy_tree(src: Path, dest: Path) -> None:
    """Copy src's content into dest (which exists): data, modes, symlinks, hardlinks, xattrs, ids."""
    inodes: dict[tuple[int, int], Path] = {}

    def walk(s: Path, d: Path) -> None:
        with os.scandir(s) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            sp, dp = s / e.name, d / e.name
            st = os.lstat(sp)
            if stat.S_ISDIR(st.st_mode):
                if not dp.is_dir() or dp.is_symlink():
                    if os.path.lexists(dp):
                        remove(dp)
                    os.mkdir(dp, 0o700)
                walk(sp, dp)
            else:
                if os.path.lexists(dp):
                    remove(dp)
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in inodes:
                    os.link(inodes[key], dp, follow_symlinks=False)
                    continue
                inodes[key] = dp
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(sp), dp)
                elif stat.S_ISREG(st.st_mode):
                    shutil.copyfile(sp, dp, follow_symlinks=False)
                elif stat.S_ISFIFO(st.st_mode):
                    os.mkfifo(dp)
                elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                    try:
                        os.mknod(dp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
                    except PermissionError:
                        continue
                else:
                    continue
            _clone_meta(sp, dp, st)

    walk(src, dest)


def _clone_meta(sp: Path, dp: Path, st: os.stat_result) -> None:
    _chown(dp, st.st_uid, st.st_gid)
    if stat.S_ISLNK(st.st_mode):
        return
    os.chmod(dp, stat.S_IMODE(st.st_mode))
    _set_xattrs(dp, _xattrs(sp))


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        with contextlib.suppress(OSError):
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


# --- copy-and-diff -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    ino: tuple[int, int]  # inode number and, for directories, generation
    ftype: int
    mode: int
    uid: int
    gid: int
    rdev: int
    size: int
    mtime_ns: int
    ctime_ns: int
    link: str
    xattrs: tuple[tuple[str, bytes], ...]
    in_lower: bool  # present before the customisation layer (a deletion needs a whiteout)
    in_upper: bool  # part of the customisation layer already (from extraCommands / contents links)


FS_IOC_GETVERSION = 0x80087601


def _generation(path: Path) -> int:
    """The inode's generation: a directory removed and made again may get the same inode number (ext4
    reuses it at once), but not the same generation."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8)
        return int.from_bytes(buf[:4], sys.byteorder)
    except OSError:
        return 0
    finally:
        os.close(fd)


def _seen(path: Path, st: os.stat_result, in_lower: bool, in_upper: bool) -> Seen:
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
    xattrs = () if stat.S_ISLNK(st.st_mode) else tuple(sorted(_xattrs(path).items()))
    ident = (st.st_ino, _generation(path)) if stat.S_ISDIR(st.st_mode) else (st.st_ino, 0)
    return Seen(
        ident,
        stat.S_IFMT(st.st_mode),
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_rdev,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        link,
        xattrs,
        in_lower,
        in_upper,
    )


def _walk_rel(root: Path) -> list[str]:
    out: list[str] = []

    def walk(d: Path, rel: str) -> None:
        with os.scandir(d) as it:
            names = sorted(e.name for e in it)
        for n in names:
            r = f"{rel}/{n}" if rel else n
            out.append(r)
            p = d / n
            if p.is_dir() and not p.is_symlink():
                walk(p, r)

    walk(root, "")
    return out


def snapshot(merged: Path, lower_paths: set[str], upper_paths: set[str]) -> dict[str, Seen]:
    snap = {}
    for rel in _walk_rel(merged):
        p = merged / rel
        snap[rel] = _seen(p, os.lstat(p), rel in lower_paths, rel in upper_paths)
    return snap


def paths_of(root: Path) -> set[str]:
    return set(_walk_rel(root)) if root.is_dir() else set()


def diff_to_upper(merged: Path, snap: dict[str, Seen], upper: Path, skip: set[str]) -> None:
    """Write into `upper` what an overlayfs upper layer would hold after the script ran in `merged`.

    New or changed entries (type, ids, mode, size, times, link target, xattrs, or a new inode) are
    hardlinked (files: same inode, so fakeroot's records stay attached) or recreated (directories);
    parents come along with their current metadata, as overlayfs copies them up. A deleted lower path
    becomes a char 0/0 whiteout; a directory that replaced a lower path is marked opaque.
    """
    now = _walk_rel(merged)
    include, opaque = _changed(merged, snap, now, skip)
    whiteouts = _deleted(merged, snap, set(now), skip, opaque)
    for rel in list(include) + whiteouts:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            include.add("/".join(parts[:i]))
    _copy_up(merged, upper, include, opaque)
    for rel in whiteouts:
        os.mknod(upper / rel, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    # Directory modes last: a 0555 directory must not stop us filling it.
    for rel in sorted(
        (r for r in include if (upper / r).is_dir() and not (upper / r).is_symlink()), key=lambda r: -r.count("/")
    ):
        os.chmod(upper / rel, stat.S_IMODE(os.lstat(merged / rel).st_mode))


def _changed(merged: Path, snap: dict[str, Seen], now: list[str], skip: set[str]) -> tuple[set[str], set[str]]:
    """The paths of `now` that are new or changed since `snap`, and the directories among them that
    hide what was below them (opaque)."""
    include: set[str] = set()
    opaque: set[str] = set()
    for rel in now:
        if rel.split("/", 1)[0] in skip:
            continue
        p = merged / rel
        st = os.lstat(p)
        before = snap.get(rel)
        if before is None or before.in_upper:
            include.add(rel)
            if stat.S_ISDIR(st.st_mode) and before is None and _was_lower(rel, snap):
                opaque.add(rel)
            continue
        now_id = (st.st_ino, _generation(p)) if stat.S_ISDIR(st.st_mode) else (st.st_ino, 0)
        if before.ino != now_id:
            include.add(rel)
            if stat.S_ISDIR(st.st_mode) and before.in_lower:
                opaque.add(rel)
            continue
        if _seen(p, st, before.in_lower, before.in_upper) != before:
            include.add(rel)
    # Under an opaque directory everything present is new content of the layer.
    for rel in now:
        if any(rel.startswith(o + "/") for o in opaque):
            include.add(rel)
    return include, opaque


def _deleted(merged: Path, snap: dict[str, Seen], now: set[str], skip: set[str], opaque: set[str]) -> list[str]:
    """The lower paths gone from `merged` that need a whiteout of their own."""
    whiteouts: list[str] = []
    for rel, before in snap.items():
        if rel in now or not before.in_lower or rel.split("/", 1)[0] in skip:
            continue
        parent = rel.rpartition("/")[0]
        if parent and (
            parent not in now or parent in opaque or not (merged / parent).is_dir() or (merged / parent).is_symlink()
        ):
            continue  # the parent went (or was replaced) too: one whiteout/opaque there covers it
        whiteouts.append(rel)
    return whiteouts


def _copy_up(merged: Path, upper: Path, include: set[str], opaque: set[str]) -> None:
    """The included entries into upper, parents first: directories made anew (owner, xattrs, opaque
    mark; their modes come last), everything else hardlinked."""
    for rel in sorted(include, key=lambda r: (r.count("/"), r)):
        src, dst = merged / rel, upper / rel
        st = os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(dst, 0o700)
            _chown(dst, st.st_uid, st.st_gid)
            _set_xattrs(dst, _xattrs(src))
            if rel in opaque:
                os.setxattr(dst, OPAQUE_XATTR, b"y")
        else:
            os.link(src, dst, follow_symlinks=False)


def _was_lower(rel: str, snap: dict[str, Seen]) -> bool:
    before = snap.get(rel)
    return before is not None and before.in_lower
