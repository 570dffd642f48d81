"""write_tar for the common source set, with its per-entry loop in C (nsbuild/tar/_fasttar.c).

A plain source set — every source a tree of its own at a target no other source shares or lies
below, no overlay whiteouts, no device placeholders, no other write_tar option — is written by the
extension: walk, lstat, read and header for each entry below each source directory, ~3x faster than
the Python loop on trees of many small files.  Everything else, and every entry the extension cannot
encode on its own (it calls back into the code below for those), takes tarwriter's pure-Python path.
Both give the same bytes through the same write() calls (a gzip layer's blocks follow them);
NSBUILD_PURE_PYTHON=1, or an extension that did not build, selects the pure path everywhere.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from nsbuild.errors import BuildError
from nsbuild.tar import tarwriter as tw
from nsbuild.tar.owners import OwnerPolicy

try:
    from nsbuild.tar import _fasttar  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler at install): the pure path
    _fasttar = None

# The error codes of _fasttar.c's callback.
E_OPEN, E_SHRANK, E_READ, E_OPENDIR = 1, 2, 3, 4

Header = Callable[[tw.Entry], bytes]


def compiled() -> bool:
    """True when the C loop is used (built, and not switched off with NSBUILD_PURE_PYTHON=1)."""
    return _fasttar is not None and os.environ.get("NSBUILD_PURE_PYTHON", "") not in ("1", "yes", "true")


def write_tar(
    sources: list[tw.Source],
    out: tw.Writer,
    *,
    mtime: int,
    owner: OwnerPolicy,
    overlay_whiteouts: bool = False,
    devices: dict[bytes, tw.Device] | None = None,
    cancel: threading.Event | None = None,
    **options: Any,
) -> tw.TarStats:
    """tarwriter.write_tar's bytes: through the C loop when the source set is plain, else by it."""
    trie = None
    # perms rules rewrite entries one by one (nsbuild.tar.perms): the Python loop applies them.
    plain = not overlay_whiteouts and not devices and owner.perms is None and not any(options.values())
    if compiled() and plain:
        trie = _plain_trie(sources)
    if trie is None or not 0 <= mtime <= tw.MAX_OCTAL_11:
        return tw.write_tar(
            sources, out, mtime=mtime, owner=owner, overlay_whiteouts=overlay_whiteouts, devices=devices,
            cancel=cancel, **options,
        )  # fmt: skip
    return _Plain(out, mtime, owner, cancel).run(trie)


def _plain_trie(sources: list[tw.Source]) -> tw._Node | None:
    """The sources' trie when each node with a host path has exactly one and nothing mounted below it."""
    trie = tw._build_trie(sources)
    if trie.hosts:
        return trie if len(trie.hosts) == 1 and not trie.children else None
    todo = [trie]
    while todo:
        for child in todo.pop().children.values():
            if child.hosts and (len(child.hosts) > 1 or child.children):
                return None
            todo.append(child)
    return trie


class _Plain:
    """One layer of a plain source set: the few entries of the trie here, the trees by _fasttar."""

    def __init__(self, out: tw.Writer, mtime: int, owner: OwnerPolicy, cancel: threading.Event | None) -> None:
        self.out = out
        self.mtime = mtime
        self.owner = owner
        self.cancel = cancel
        self.pending = bytearray()
        self.seen: dict[tuple[int, int], bytes] = {}  # hardlinks, across every source
        self.stats = tw.TarStats()

    def run(self, trie: tw._Node) -> tw.TarStats:
        if trie.hosts:
            host = trie.hosts[0]
            if not os.path.isdir(host) or os.path.islink(host):
                raise BuildError(f"{os.fsdecode(host)}: only a directory can be placed at /")
            self._tree(b"", host)
        else:
            self._children(trie, b"")
        self.pending += b"\0" * (2 * tw.BLOCK)
        self.out.write(self.pending)
        return self.stats

    def _children(self, node: tw._Node, prefix: bytes) -> None:
        for name in sorted(node.children):
            if self.cancel is not None and self.cancel.is_set():
                raise KeyboardInterrupt
            child = node.children[name]
            rel = prefix + b"/" + name if prefix else name
            if not child.hosts:
                self._python(tw.Entry(name=rel, kind="dir", mode=0o755, uid=0, gid=0))
                self._children(child, rel)
                continue
            header, size, descend = self.slow(rel, child.hosts[0])
            self._python_header(header, size, child.hosts[0])
            if descend:
                self._tree(rel, child.hosts[0])

    def _tree(self, rel: bytes, host: bytes) -> None:
        """Every entry below the directory `host`, by the C loop."""
        cancel = self.cancel.is_set if self.cancel is not None else None
        count, self.pending = _fasttar.write_tree(
            host, rel, self.out.write, self.template, self.slow, _raise, cancel, self.pending
        )
        self.stats.entries += count

    def template(self, uid: int, gid: int) -> tuple[bytes, int] | None:
        return tw._template(self.owner.resolve(uid, gid), self.mtime)

    def header(self, entry: tw.Entry) -> bytes:
        """write_tar's header for `entry`: the template's when it needs no PAX record."""
        resolved = self.owner.resolve(entry.uid, entry.gid)
        template = tw._template(resolved, self.mtime)
        return (template is not None and tw._fast_header(entry, template)) or tw.encode_header(
            entry, resolved, self.mtime
        )

    def slow(self, rel: bytes, host: bytes) -> tuple[bytes, int, bool]:
        """An entry as iter_entries makes it: (its header block(s), how many bytes of file data follow,
        whether it is a directory to descend into)."""
        won = tw._stat_winner([host])
        if won is None:  # gone since it was listed: a bare directory, as iter_entries makes it
            return self.header(tw.Entry(name=rel, kind="dir", mode=0o755, uid=0, gid=0)), 0, False
        host, st = won
        if stat.S_ISDIR(st.st_mode):
            entry = tw.Entry(rel, "dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs=tw._read_xattrs(host))
            return self.header(entry), 0, True
        entry = tw._leaf_entry(rel, host, st, self.seen, False)
        return self.header(entry), entry.size if entry.kind == "file" else 0, False

    def _python(self, entry: tw.Entry) -> None:
        self.stats.entries += 1
        self.pending += self.header(entry)

    def _python_header(self, header: bytes, size: int, host: bytes) -> None:
        """A top-level entry with its data, batched as write_tar batches it."""
        self.stats.entries += 1
        self.pending += header
        if not size:
            return
        if size <= 64 * 1024:
            self.pending += tw._read_small(host, size)
            self.pending += b"\0" * (-size % tw.BLOCK)
            if len(self.pending) >= tw.COPY_CHUNK:
                self.out.write(self.pending)
                self.pending = bytearray()
        else:
            self.out.write(self.pending)
            self.pending = bytearray()
            tw._copy_file(host, size, self.out, self.cancel)


def _raise(host: bytes, code: int, err: int) -> NoReturn:
    """The error the pure path raises where _fasttar.c failed."""
    name = os.fsdecode(host)
    if code == E_OPEN:
        raise BuildError(f"{name}: cannot read: {os.strerror(err)}")
    if code == E_SHRANK:
        raise BuildError(f"{name}: file shrank while it was being archived")
    if code == E_READ:
        raise OSError(err, os.strerror(err), host)
    if err in (errno.EMFILE, errno.ENFILE):  # one descriptor per directory level is held open
        raise BuildError(f"{name}: the tree is nested too deep for the open-files limit ({os.strerror(err)})")
    with os.scandir(host):  # the listing failed: raise what the pure path's scandir raises
        pass
    raise BuildError(f"{name}: changed while it was being archived")
