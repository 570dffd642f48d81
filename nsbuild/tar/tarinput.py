"""An existing tar (a `{"tar": …}` contents or copyToRoot entry) as the entries of one nsbuild layer.

The tar is never extracted: extracting it as an unprivileged user would lose its owners, devices and
capabilities.  Its members are read with the strict header reader of nsbuild.tar.tarscan (from a
plain copy in the build's workspace, decompressed once when the tar is gzip, zstd or xz), checked
with the rules nsbuild applies to base layers, and turned into writer entries: sorted as the writer
sorts trees, missing parents added, hard links pointing at the first name in that order, owners,
modes, xattrs and devices as the tar has them.  The writer then copies each file's data from its
offset in the plain copy.

Name rules (so that what was checked is what a runtime unpacks): leading `./` and `.` components
are dropped (`./usr/bin` is `usr/bin`, the `./` entry is the root); absolute names and `..` are
refused, and so are whiteouts (`.wh.*`); a member below a symlink member or below a non-directory is
refused; a name given twice
keeps the later member (as an extraction would), unless one is a directory and the other is not,
which is refused; a hard link must name a regular file that an earlier member made.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nsbuild.core.tarfiles import READ_ERRORS, open_plain
from nsbuild.errors import BuildError
from nsbuild.tar.owners import Owner
from nsbuild.tar.tarscan import Member, TarFormatError, iter_members
from nsbuild.tar.tarwriter import MAX_OCTAL_11, Entry

# Bump when the entries made from the same tar change (the layer cache keys hash it in).
TAR_INPUT_VERSION = "nsbuild-tar-input-v1"
CHUNK = 1 << 20
SKIPPED_XATTRS = ("security.selinux",)  # as for host trees: the build host's labels are not content
REFUSED_XATTRS = ("trusted.overlay.", "user.overlay.")  # they would steer the overlayfs of a runtime
KINDS = {b"1": "hardlink", b"2": "symlink", b"3": "char", b"4": "block", b"5": "dir", b"6": "fifo"}


class HostileTar(BuildError):
    """The tar is malformed, or holds a member that could write outside the image's tree."""


@dataclass(frozen=True)
class TarInput:
    """One tar entry of the spec: the file, where its root lands, and whether its mtimes stay."""

    path: Path
    target: str  # absolute, "/" by default
    keep_mtime: bool
    label: str  # the spec field, e.g. "contents[2]", for messages


@dataclass(frozen=True)
class TarLayer:
    """A tar's members as writer entries (sorted, checked); their data lives in `plain`."""

    plain: Path
    entries: list[Entry]


def plain_copy(src: Path, dest: Path, label: str, cancel: threading.Event | None = None) -> None:
    """The tar decompressed (or copied) to `dest`; nothing left at `dest` when it fails."""
    try:
        with open_plain(src) as f, open(dest, "wb") as out:
            while chunk := f.read(CHUNK):
                if cancel is not None and cancel.is_set():
                    raise KeyboardInterrupt
                out.write(chunk)
    except BaseException as exc:
        dest.unlink(missing_ok=True)
        if isinstance(exc, READ_ERRORS):
            raise HostileTar(f"{label}: {src}: cannot decompress ({exc})") from None
        raise


def load_tar_layer(tar: TarInput, workdir: Path, cancel: threading.Event | None = None) -> TarLayer:
    """Decompress `tar` once into `workdir` and read its members (HostileTar on anything wrong, the
    copy removed again)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plain = workdir / f".tar-{uuid.uuid4().hex}.tar"
    plain_copy(tar.path, plain, tar.label, cancel)
    try:
        with open(plain, "rb") as f:
            members = _Members(tar, os.fsencode(plain))
            for member in iter_members(f, os.fstat(f.fileno()).st_size):
                members.add(member)
        return TarLayer(plain, members.entries())
    except TarFormatError as exc:
        plain.unlink(missing_ok=True)
        raise HostileTar(f"{tar.label}: {tar.path}: not a sound tar archive: {exc}") from None
    except BaseException:
        plain.unlink(missing_ok=True)
        raise


@dataclass(slots=True)
class _Data:
    """A regular file's inode: what every hard link to it shares."""

    offset: int
    size: int
    mode: int
    owner: Owner
    mtime: int
    xattrs: dict[bytes, bytes]


@dataclass(slots=True)
class _Item:
    kind: str  # a writer kind; hard links are "file" items sharing a _Data
    entry: Entry | None  # for everything but files
    data: _Data | None = None


class _Members:
    """The tar's tree as its members build it, in archive order, checked member by member."""

    def __init__(self, tar: TarInput, host: bytes) -> None:
        self.tar = tar
        self.host = host
        self.items: dict[bytes, _Item] = {}
        self.owners: dict[tuple[int, int, str, str], Owner] = {}

    def _fail(self, member: Member, why: str) -> HostileTar:
        return HostileTar(f"{self.tar.label}: {self.tar.path}: member {member.name[:200]!r} {why}")

    def _clean(self, member: Member, name: str, what: str) -> bytes:
        raw = os.fsencode(name)
        if raw.startswith(b"/"):
            raise self._fail(member, f"has an absolute {what} {name[:200]!r}")
        parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
        if b".." in parts:
            raise self._fail(member, f"has '..' in its {what} {name[:200]!r}")
        if len(raw) > 4095 or any(len(p) > 255 for p in parts):
            raise self._fail(member, f"has a {what} longer than the kernel takes")
        return b"/".join(parts)

    def add(self, member: Member) -> None:
        name = self._clean(member, member.name, "name")
        if name.rpartition(b"/")[2].startswith(b".wh."):
            # A whiteout would delete files of the layers below: a tar entry adds files, nothing else.
            raise self._fail(member, "is an overlay whiteout (.wh.*); a tar entry adds files, it deletes none")
        self._check_parents(member, name)
        item = self._hard_link(member, name) if member.islnk() else self._item(member, name)
        old = self.items.get(name)
        if old is not None and (old.kind == "dir") != (item.kind == "dir"):
            raise self._fail(member, "is in the tar twice, once as a directory and once not")
        self.items[name] = item

    def _check_parents(self, member: Member, name: bytes) -> None:
        parts = name.split(b"/") if name else []
        for i in range(1, len(parts)):
            got = self.items.get(b"/".join(parts[:i]))
            if got is None or got.kind == "dir":
                continue
            where = "/" + os.fsdecode(b"/".join(parts[:i]))
            if got.kind == "symlink" and got.entry is not None:
                raise self._fail(member, f"writes through the symlink {where} -> {os.fsdecode(got.entry.linkname)!r}")
            raise self._fail(member, f"is below {where}, which is not a directory")

    def _hard_link(self, member: Member, name: bytes) -> _Item:
        target = self._clean(member, member.linkname, "hard link target")
        got = self.items.get(target)
        if got is None or got.data is None:
            what = "nothing before it in the tar" if got is None else f"a {got.kind}, not a regular file"
            raise self._fail(member, f"is a hard link to {member.linkname[:200]!r}, which is {what}")
        return _Item("file", None, got.data)

    def _owner(self, member: Member) -> Owner:
        pax = member.pax or {}
        key = (member.uid, member.gid, pax.get("uname", member.uname), pax.get("gname", member.gname))
        owner = self.owners.get(key)
        if owner is None:
            owner = self.owners[key] = Owner(*key)
        return owner

    def _mtime(self, member: Member) -> int | None:
        if not self.tar.keep_mtime:
            return None
        text = (member.pax or {}).get("mtime")
        try:
            mtime = int(float(text)) if text is not None else member.mtime
        except ValueError:
            raise self._fail(member, f"has a PAX mtime {str(text)[:40]!r} that is not a number") from None
        if not 0 <= mtime <= MAX_OCTAL_11:
            raise self._fail(member, f"has an mtime ({mtime}) that a layer cannot hold (keepMtime)")
        return mtime

    def _xattrs(self, member: Member) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for key, value in (member.pax or {}).items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr.") :]
            if attr.startswith(REFUSED_XATTRS):
                raise self._fail(member, f"carries the overlayfs attribute {attr!r}")
            if attr and attr not in SKIPPED_XATTRS:
                out[attr.encode("utf-8", "surrogateescape")] = value.encode("utf-8", "surrogateescape")
        return out

    def _item(self, member: Member, name: bytes) -> _Item:
        owner, mode, mtime = self._owner(member), member.mode & 0o7777, self._mtime(member)
        xattrs = self._xattrs(member)
        if member.isreg():
            return _Item("file", None, _Data(member.data_offset, member.size, mode, owner, mtime or 0, xattrs))
        kind = KINDS[member.type]
        entry = Entry(name, kind, mode, owner.uid, owner.gid, xattrs=xattrs, owner=owner, mtime=mtime)
        if kind == "symlink":
            entry.linkname = os.fsencode(member.linkname)
        elif kind in ("char", "block"):
            entry.devmajor, entry.devminor = member.devmajor, member.devminor
        return _Item(kind, entry)

    def entries(self) -> list[Entry]:
        """The layer's entries under the target, in the writer's order (parents first, names
        byte-sorted per directory); the first name of each hard-link group carries the data."""
        prefix = [os.fsencode(p) for p in self.tar.target.split("/") if p]
        root = self.items.pop(b"", None)
        if root is not None and root.kind != "dir":
            raise HostileTar(f"{self.tar.label}: {self.tar.path}: the tar's root is not a directory")
        placed: dict[tuple[bytes, ...], _Item | None] = {}
        if prefix and root is not None:
            placed[tuple(prefix)] = root
        for name, item in self.items.items():
            placed[(*prefix, *name.split(b"/"))] = item
        for parts in list(placed):
            for i in range(1, len(parts)):
                placed.setdefault(parts[:i], None)  # a parent the tar omits: made as for trees
        return list(self._ordered(placed))

    def _ordered(self, placed: dict[tuple[bytes, ...], _Item | None]) -> Iterator[Entry]:
        first: dict[int, bytes] = {}
        for parts in sorted(placed):
            name, item = b"/".join(parts), placed[parts]
            if item is None:
                yield Entry(name=name, kind="dir", mode=0o755, uid=0, gid=0)
            elif item.data is None:
                assert item.entry is not None
                item.entry.name = name
                yield item.entry
            else:
                yield self._file(name, item.data, first)

    def _file(self, name: bytes, data: _Data, first: dict[int, bytes]) -> Entry:
        o, mtime = data.owner, data.mtime if self.tar.keep_mtime else None
        seen = first.get(id(data))
        if seen is not None:
            return Entry(name, "hardlink", data.mode, o.uid, o.gid, linkname=seen, owner=o, mtime=mtime)
        first[id(data)] = name
        entry = Entry(name, "file", data.mode, o.uid, o.gid, size=data.size, xattrs=data.xattrs, host=self.host)
        entry.offset, entry.owner, entry.mtime = data.offset, o, mtime
        return entry
