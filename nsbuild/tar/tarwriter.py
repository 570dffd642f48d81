"""Deterministic layer tar writer.

One pass over the source trees: entries are emitted in a stable order (per-directory byte order,
parents first), with fixed mtime, explicit numeric ids and names, PAX records only where ustar cannot
hold a value, and no atime/ctime.  File data is streamed through the caller's writer, which hashes it.

Several sources may land in one layer (a merged root tree, store paths under /nix/store): they are
overlaid as a virtual tree, later sources winning for non-directories, directories merged.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from nsbuild.errors import BuildError
from nsbuild.tar.owners import Owner, OwnerPolicy

# Bump whenever this writer's output for the same inputs changes (the cache keys and content
# fingerprints hash it in: a new writer never meets layers of an old one).
FORMAT_VERSION = "nsbuild-layer-v2"

BLOCK = 512
COPY_CHUNK = 1 << 20
# Values past these need a PAX record (ustar's octal fields are fixed-width).
MAX_OCTAL_7 = 0o7777777
MAX_OCTAL_11 = 0o77777777777
SKIPPED_XATTRS = (b"security.selinux",)
OVERLAY_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque")
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

__all__ = ["Owner", "OwnerPolicy", "Source", "TarStats", "Writer", "write_tar", "write_entries", "iter_entries"]


class Writer(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...


@dataclass(frozen=True)
class Source:
    """A host path placed at absolute `target` inside the image."""

    host: Path
    target: str


@dataclass
class TarStats:
    entries: int = 0


@dataclass(slots=True)
class Entry:
    """One tar member, before ownership policy is applied."""

    name: bytes  # relative, no leading slash; directories without trailing slash here
    kind: str  # "file" "dir" "symlink" "hardlink" "char" "block" "fifo"
    mode: int
    uid: int
    gid: int
    size: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    host: bytes | None = None  # file data comes from here
    offset: int = 0  # where in `host` the data starts (a member of a tar, nsbuild.tar.tarinput)
    owner: Owner | None = None  # kept as it is (a tar's entry), not resolved by the layer's policy
    mtime: int | None = None  # kept as it is (a tar's entry with keepMtime), not the layer's


TYPEFLAGS = {"file": b"0", "hardlink": b"1", "symlink": b"2", "char": b"3", "block": b"4", "dir": b"5", "fifo": b"6"}


class _Node:
    """A place in the virtual tree: host paths merged here and sources mounted below."""

    __slots__ = ("hosts", "children")

    def __init__(self) -> None:
        self.hosts: list[bytes] = []
        self.children: dict[bytes, _Node] = {}


def _build_trie(sources: list[Source]) -> _Node:
    root = _Node()
    for src in sources:
        parts = [os.fsencode(p) for p in src.target.strip("/").split("/") if p]
        node = root
        for part in parts:
            if part in (b".", b".."):
                raise BuildError(f"target {src.target!r}: '.' and '..' are not allowed")
            node = node.children.setdefault(part, _Node())
        node.hosts.append(os.fsencode(src.host))
    return root


def _read_xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[bytes, bytes] = {}
    for name in names:
        key = name.encode("utf-8", "surrogateescape")
        if key in SKIPPED_XATTRS:
            continue
        try:
            out[key] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue
            raise
    return out


def iter_entries(sources: list[Source], *, overlay_whiteouts: bool = False) -> Iterator[Entry]:
    """Yield the layer's entries in their final order (parents first, names byte-sorted per directory).

    An explicit stack, not recursive generators: each entry is yielded once, not through one generator
    frame per directory level (a third of the writer's time on a deep tree).
    """
    trie = _build_trie(sources)
    seen: dict[tuple[int, int], bytes] = {}
    overlay = overlay_whiteouts
    for host in trie.hosts:
        if not os.path.isdir(host) or os.path.islink(host):
            raise BuildError(f"{os.fsdecode(host)}: only a directory can be placed at /")
    stack = [_listing(trie, b"", trie.hosts)]
    while stack:
        try:
            rel, child, hosts = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        won = _stat_winner(hosts) if hosts else None
        if won is None:
            # A synthetic parent of a mounted source (e.g. nix/ and nix/store/).
            yield Entry(name=rel, kind="dir", mode=0o755, uid=0, gid=0)
            stack.append(_listing(child or _EMPTY, rel, []))
            continue
        host, st = won
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            # Directories merge across sources; non-directories shadowed by a directory are dropped.
            dir_list = hosts if len(hosts) == 1 else [h for h in hosts if os.path.isdir(h) and not os.path.islink(h)]
            xattrs = _read_xattrs(host)
            opaque = False
            if overlay:
                opaque = any(xattrs.get(k) == b"y" for k in OPAQUE_XATTRS)
                xattrs = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_XATTR_PREFIXES)}
            yield Entry(name=rel, kind="dir", mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid, xattrs=xattrs)
            if opaque:
                yield Entry(name=rel + b"/" + OPAQUE_MARKER, kind="file", mode=0o644, uid=0, gid=0)
            stack.append(_listing(child or _EMPTY, rel, dir_list))
            continue
        if child is not None and child.children:
            raise BuildError(
                f"{os.fsdecode(host)}: is not a directory, but sources are placed below /{os.fsdecode(rel)}"
            )
        yield _leaf_entry(rel, host, st, seen, overlay)


_EMPTY = _Node()


def _listing(node: _Node, prefix: bytes, dir_hosts: list[bytes]) -> Iterator[tuple[bytes, _Node | None, list[bytes]]]:
    """(relative name, trie node, host paths) for each name below a virtual directory, sorted."""
    listing: dict[bytes, list[bytes]] = {}
    for host in dir_hosts:
        try:
            with os.scandir(host) as it:
                for de in it:
                    listing.setdefault(de.name, []).append(de.path)
        except NotADirectoryError:
            continue
    for name in node.children:
        listing.setdefault(name, [])
    children = node.children
    sep = prefix + b"/" if prefix else b""
    return iter(
        [
            (
                sep + name,
                children.get(name),
                listing[name] + children[name].hosts if name in children else listing[name],
            )
            for name in sorted(listing)
        ]
    )


def _stat_winner(hosts: list[bytes]) -> tuple[bytes, os.stat_result] | None:
    """The last host path that exists wins (later sources override earlier ones)."""
    for host in reversed(hosts):
        try:
            return host, os.lstat(host)
        except FileNotFoundError:
            continue
    return None


def _leaf_entry(
    rel: bytes, host: bytes, st: os.stat_result, seen: dict[tuple[int, int], bytes], overlay: bool
) -> Entry:
    mode = st.st_mode
    perm = stat.S_IMODE(mode)
    if overlay and stat.S_ISCHR(mode) and st.st_rdev == 0:
        head, _, base = rel.rpartition(b"/")
        name = (head + b"/" if head else b"") + WHITEOUT_PREFIX + base
        return Entry(name=name, kind="file", mode=0o644, uid=0, gid=0)
    xattrs = {} if stat.S_ISLNK(mode) else _read_xattrs(host)
    if overlay:
        xattrs = {k: v for k, v in xattrs.items() if not k.startswith(OVERLAY_XATTR_PREFIXES)}
    uid, gid = st.st_uid, st.st_gid
    if stat.S_ISREG(mode):
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = seen.get(key)
            if first is not None:
                return Entry(rel, "hardlink", perm, uid, gid, linkname=first)
            seen[key] = rel
        return Entry(rel, "file", perm, uid, gid, size=st.st_size, xattrs=xattrs, host=host)
    if stat.S_ISLNK(mode):
        return Entry(rel, "symlink", perm, uid, gid, linkname=os.readlink(host), xattrs=xattrs)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return Entry(
            rel,
            "char" if stat.S_ISCHR(mode) else "block",
            perm,
            uid,
            gid,
            devmajor=os.major(st.st_rdev),
            devminor=os.minor(st.st_rdev),
            xattrs=xattrs,
        )
    if stat.S_ISFIFO(mode):
        return Entry(rel, "fifo", perm, uid, gid, xattrs=xattrs)
    raise BuildError(f"{os.fsdecode(host)}: sockets and other special files cannot be stored in a layer")


# --- header encoding -------------------------------------------------------------------------------


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length = len(str(length).encode()) + len(body)
    return str(length).encode() + body


def _split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    if len(name) <= 100:
        return b"", name
    # ustar's prefix field holds a leading part of the path, cut at a slash.
    cut = name.rfind(b"/", 0, 156)
    while cut > 0:
        if len(name) - cut - 1 <= 100:
            return name[:cut], name[cut + 1 :]
        cut = name.rfind(b"/", 0, cut)
    return None


class UstarFields(NamedTuple):
    """The fields of one ustar header block, each already within its width (encode_header moves what
    does not fit into PAX records).  A tuple: one is built for every header encode_header writes, so it
    must cost no more than an argument list."""

    name: bytes
    mode: int
    size: int
    mtime: int
    typeflag: bytes
    uid: int = 0
    gid: int = 0
    linkname: bytes = b""
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    prefix: bytes = b""


def _ustar_header(f: UstarFields) -> bytes:
    raw = b"".join(
        (
            f.name.ljust(100, b"\0"),
            # One format for the run of octal fields, the checksum field spaces while the block is summed.
            b"%07o\0%07o\0%07o\0%011o\0%011o\0        " % (f.mode, f.uid, f.gid, f.size, f.mtime),
            f.typeflag,
            f.linkname.ljust(100, b"\0"),
            b"ustar\x0000",
            f.uname.ljust(32, b"\0"),
            f.gname.ljust(32, b"\0"),
            b"%07o\0%07o\0" % (f.devmajor, f.devminor),
            f.prefix.ljust(155, b"\0"),
            b"\0" * 12,
        )
    )
    return raw[:148] + b"%06o\0 " % sum(raw) + raw[156:]


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _needs_pax_text(value: bytes, limit: int) -> bool:
    return len(value) > limit or not value.isascii()


_TEMPLATES: dict[tuple[Owner, int], tuple[bytes, int] | None] = {}


def _template(owner: Owner, mtime: int) -> tuple[bytes, int] | None:
    """A ustar header with this owner and mtime filled in (name, mode, size and type left NUL, the
    checksum field spaces) and the sum of its bytes; None when they need PAX records.  The common entry
    then only fills in its own fields: the per-entry cost of a layer of many small files."""
    key = (owner, mtime)
    if key not in _TEMPLATES:
        uname, gname = owner.uname.encode(), owner.gname.encode()
        fits = (
            owner.uid <= MAX_OCTAL_7
            and owner.gid <= MAX_OCTAL_7
            and not _needs_pax_text(uname, 32)
            and not _needs_pax_text(gname, 32)
        )
        template = None
        if fits:
            fields = UstarFields(b"", 0, 0, mtime, b"0", owner.uid, owner.gid, uname=uname, gname=gname)
            header = bytearray(_ustar_header(fields))
            header[100:108] = b"\0" * 8
            header[124:136] = b"\0" * 12
            header[156:157] = b"\0"
            header[148:156] = b" " * 8  # the checksum is summed with its own field as spaces
            template = (bytes(header), sum(header))
        _TEMPLATES[key] = template
    return _TEMPLATES[key]


def _fast_header(entry: Entry, template: tuple[bytes, int]) -> bytes | None:
    """encode_header's bytes for an entry that needs no PAX record, else None."""
    if entry.xattrs or entry.size > MAX_OCTAL_11:
        return None
    name = entry.name + b"/" if entry.kind == "dir" else entry.name
    link = entry.linkname
    if not name.isascii() or len(link) > 100 or not link.isascii():
        return None
    prefix = b""
    if len(name) > 100:
        split = _split_ustar_name(name)
        if split is None:
            return None
        prefix, name = split
    h = bytearray(template[0])
    mode = b"%07o\0" % entry.mode
    size = b"%011o\0" % (entry.size if entry.kind == "file" else 0)
    flag = TYPEFLAGS[entry.kind]
    h[0 : len(name)] = name
    h[100:108] = mode
    h[124:136] = size
    h[156:157] = flag
    chk = template[1] + sum(name) + sum(mode) + sum(size) + flag[0]
    if link:
        h[157 : 157 + len(link)] = link
        chk += sum(link)
    if entry.devmajor or entry.devminor:
        devs = b"%07o\0%07o\0" % (entry.devmajor, entry.devminor)
        chk += sum(devs) - sum(h[329:345])
        h[329:345] = devs
    if prefix:
        h[345 : 345 + len(prefix)] = prefix
        chk += sum(prefix)
    h[148:156] = b"%06o\0 " % chk
    return bytes(h)


def encode_header(entry: Entry, owner: Owner, mtime: int, *, pax_size: bool = False) -> bytes:
    """The header block(s) for an entry; PAX records only where ustar cannot hold a value (and for the
    size whatever it is with `pax_size`: a header of one length for any size).  write_tar takes the
    same bytes from _fast_header where they need no PAX record."""
    name = entry.name + b"/" if entry.kind == "dir" else entry.name
    # The record order is part of the output bytes: path, linkpath, uid, gid, size, uname, gname, xattrs.
    pax: list[bytes] = []
    (prefix, short), binary_name = _pax_name(name, pax)
    ustar_link, binary_link = _pax_link(entry.linkname, pax)
    size = entry.size if entry.kind == "file" else 0
    uid, gid, uname, gname = _pax_owner(owner, size, pax_size, pax)
    for key in sorted(entry.xattrs):
        pax.append(_pax_record(b"SCHILY.xattr." + key, entry.xattrs[key]))
    out = b""
    if pax:
        if binary_name or binary_link:
            pax.insert(0, _pax_record(b"hdrcharset", b"BINARY"))
        body = b"".join(pax)
        out = _ustar_header(UstarFields(b"././@PaxHeader", 0o644, len(body), mtime, b"x"))
        out += body + b"\0" * (-len(body) % BLOCK)
    # Positional, in UstarFields' order: keywords would cost a tenth of this function's time.
    fields = UstarFields(
        short,
        entry.mode,
        size if size <= MAX_OCTAL_11 else 0,
        mtime,
        TYPEFLAGS[entry.kind],
        uid,
        gid,
        ustar_link,
        uname,
        gname,
        entry.devmajor,
        entry.devminor,
        prefix,
    )
    return out + _ustar_header(fields)


def _pax_name(name: bytes, pax: list[bytes]) -> tuple[tuple[bytes, bytes], bool]:
    """The ustar (prefix, name) of `name`, appending a path record when it does not fit; True when
    that record is not UTF-8.

    PAX values are UTF-8 by definition.  A name that is not valid UTF-8 goes raw into the ustar fields
    when it fits there (every reader takes those bytes as they are), and otherwise into a PAX record
    marked `hdrcharset=BINARY`."""
    utf8 = name.isascii() or _is_utf8(name)
    split = _split_ustar_name(name) if name.isascii() or not utf8 else None
    if split is not None:
        return split, False
    pax.append(_pax_record(b"path", name))
    return (b"", name[:100] if name.isascii() else b""), not utf8


def _pax_link(link: bytes, pax: list[bytes]) -> tuple[bytes, bool]:
    """The ustar link name, appending a linkpath record when it does not fit; True when that record
    is not UTF-8."""
    if not link or (len(link) <= 100 and (link.isascii() or not _is_utf8(link))):
        return link, False
    pax.append(_pax_record(b"linkpath", link))
    return (link[:100] if link.isascii() else b""), not _is_utf8(link)


def _pax_owner(owner: Owner, size: int, pax_size: bool, pax: list[bytes]) -> tuple[int, int, bytes, bytes]:
    """The ustar uid, gid, uname and gname, appending uid, gid, size, uname and gname records where
    ustar cannot hold the value (the size also with `pax_size`)."""
    uid, gid = owner.uid, owner.gid
    uname, gname = owner.uname.encode(), owner.gname.encode()
    if uid > MAX_OCTAL_7:
        pax.append(_pax_record(b"uid", str(uid).encode()))
        uid = 0
    if gid > MAX_OCTAL_7:
        pax.append(_pax_record(b"gid", str(gid).encode()))
        gid = 0
    if size > MAX_OCTAL_11 or pax_size:
        pax.append(_pax_record(b"size", str(size).encode()))
    if _needs_pax_text(uname, 32):
        pax.append(_pax_record(b"uname", uname))
    if _needs_pax_text(gname, 32):
        pax.append(_pax_record(b"gname", gname))
    return uid, gid, uname[:32] if uname.isascii() else b"", gname[:32] if gname.isascii() else b""


# --- writing ---------------------------------------------------------------------------------------


def _copy_file(host: bytes, size: int, out: Writer, cancel: threading.Event | None, offset: int = 0) -> None:
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BuildError(f"{os.fsdecode(host)}: cannot read: {exc.strerror}") from exc
    try:
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        remaining = size
        while remaining:
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt
            # A fresh bytes object per chunk: the writer thread takes it as it is, no copy.
            data = os.read(fd, min(remaining, COPY_CHUNK))
            if not data:
                raise BuildError(f"{os.fsdecode(host)}: file shrank while it was being archived")
            out.write(data)
            remaining -= len(data)
    finally:
        os.close(fd)
    pad = -size % BLOCK
    if pad:
        out.write(b"\0" * pad)


Device = tuple[str, int, int]  # ("char" | "block", major, minor)


def _with_devices(entries: Iterator[Entry], devices: dict[bytes, Device]) -> Iterator[Entry]:
    """Empty placeholder files recorded as devices (a user namespace cannot mknod) become devices."""
    for entry in entries:
        dev = devices.get(entry.name)
        if dev is not None and entry.kind == "file" and entry.size == 0:
            kind, major, minor = dev
            entry = Entry(
                name=entry.name,
                kind=kind,
                mode=entry.mode,
                uid=entry.uid,
                gid=entry.gid,
                devmajor=int(major),
                devminor=int(minor),
            )
        yield entry


def write_tar(
    sources: list[Source],
    out: Writer,
    *,
    mtime: int,
    owner: OwnerPolicy,
    overlay_whiteouts: bool = False,
    devices: dict[bytes, Device] | None = None,
    cancel: threading.Event | None = None,
) -> TarStats:
    """Write one layer tar for `sources` to `out`; return the entry count (the caller's writer hashes
    and counts the bytes).

    `devices` maps layer-relative names of empty placeholder files to the device each stands for.
    """
    entries = iter_entries(sources, overlay_whiteouts=overlay_whiteouts)
    if devices:
        entries = _with_devices(entries, devices)
    return write_entries(entries, out, mtime=mtime, owner=owner, cancel=cancel)


def write_entries(
    entries: Iterator[Entry], out: Writer, *, mtime: int, owner: OwnerPolicy, cancel: threading.Event | None = None
) -> TarStats:
    """Write the entries, already in their final order, as one layer tar to `out` (write_tar's trees,
    or the members of an existing tar, nsbuild.tar.tarinput)."""
    if not 0 <= mtime <= MAX_OCTAL_11:
        raise BuildError(f"mtime {mtime} is outside the range a tar header can hold")
    stats = TarStats()
    pending = bytearray()
    last_owner: Owner | None = None
    template: tuple[bytes, int] | None = None
    ruled = owner.perms is not None
    for entry in entries:
        if cancel is not None and cancel.is_set():
            raise KeyboardInterrupt  # another layer failed or the build was interrupted
        # The spec's perms rules (nsbuild.tar.perms) here, on every entry whatever its origin.
        given = entry.owner
        resolved = owner.owner_of(entry, given) if ruled else given or owner.resolve(entry.uid, entry.gid)
        if resolved is not last_owner:
            last_owner, template = resolved, _template(resolved, mtime)
        if entry.mtime is None:
            header = (template is not None and _fast_header(entry, template)) or encode_header(entry, resolved, mtime)
        else:
            # No template per kept mtime: a tar of many mtimes would fill the template table.
            header = encode_header(entry, resolved, entry.mtime)
        stats.entries += 1
        if entry.kind == "file" and entry.size:
            # Small files are batched with their headers: one write per ~1 MiB, not two per file.
            if entry.size <= 64 * 1024:
                data = _read_small(entry.host or b"", entry.size, entry.offset)
                pending += header
                pending += data
                pending += b"\0" * (-entry.size % BLOCK)
                if len(pending) >= COPY_CHUNK:
                    out.write(pending)
                    pending = bytearray()
            else:
                pending += header
                out.write(pending)
                pending = bytearray()
                _copy_file(entry.host or b"", entry.size, out, cancel, entry.offset)
        else:
            pending += header
    pending += b"\0" * (2 * BLOCK)
    out.write(pending)
    return stats


def _read_small(host: bytes, size: int, offset: int = 0) -> bytes:
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BuildError(f"{os.fsdecode(host)}: cannot read: {exc.strerror}") from exc
    try:
        data = os.pread(fd, size, offset)
        while len(data) < size:
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                raise BuildError(f"{os.fsdecode(host)}: file shrank while it was being archived")
            data += more
        return data
    finally:
        os.close(fd)
