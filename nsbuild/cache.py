"""Content-addressed layer cache: unchanged layers are not rebuilt (DESIGN.md §1 "cache").

Layout under the cache directory (default `$XDG_CACHE_HOME/nsbuild`):

    blobs/sha256/<hex>        layer tars and compressed blobs, read-only, named by digest
    layers/<fingerprint>.json what a layer's inputs produced: diff_id and the blobs per compression

A fingerprint covers everything that decides a layer's bytes: the writer's format version, each
source's host path and target, the stat data of every entry below it (type, mode, ids, size, inode,
mtime and ctime: any change to a file's content, metadata or xattrs moves its ctime), the ownership
policy and the layer mtime.  Walking the trees costs one lstat per entry, nothing is read.

A blob is trusted while its size, inode and mtime are what the cache recorded when it stored it (not
ctime: hard-linking a blob into an OCI layout moves its ctime); when they differ (someone wrote into
the cache), the blob is hashed again and, if wrong, dropped and its layer rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from nsbuild.layer import MEDIA_BY_COMPRESSOR, Blob, Layer, file_digest
from nsbuild.owners import OwnerPolicy
from nsbuild.tarwriter import Source

# Bump whenever the tar writer's output for the same inputs changes.
FORMAT_VERSION = "nsbuild-layer-v2"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nsbuild"


def fingerprint(sources: list[Source], *, mtime: int, owner: OwnerPolicy, overlay_whiteouts: bool = False) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, mtime, owner.to_json(), overlay_whiteouts], sort_keys=True).encode())
    for src in sources:
        h.update(b"\0source\0" + os.fsencode(src.host) + b"\0" + src.target.encode() + b"\0")
        _hash_tree(os.fsencode(src.host), h)
    return h.hexdigest()


def _stat_bytes(name: bytes, st: os.stat_result) -> bytes:
    return b"%s\0%o %d %d %d %d %d %d %d %d %d\n" % (
        name,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_ino,
        st.st_dev,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_nlink,
        st.st_rdev,
    )


def _hash_tree(top: bytes, h: hashlib._Hash) -> None:
    try:
        st = os.lstat(top)
    except FileNotFoundError:
        h.update(b"missing\n")
        return
    h.update(_stat_bytes(b".", st))
    if not os.path.isdir(top) or os.path.islink(top):
        return
    stack = [top]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        rel = d[len(top) :]
        for e in entries:
            est = e.stat(follow_symlinks=False)
            h.update(_stat_bytes(rel + b"/" + e.name, est))
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns]


class LayerCache:
    def __init__(self, root: Path, *, write: bool = True) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.entries = root / "layers"
        from nsbuild.errors import BuildError

        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.entries.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BuildError(f"cache directory {root}: {exc.strerror} (use --cache-dir or --no-cache)") from None
        # An existing cache someone else owns (or on a read-only mount) passes mkdir; find out now,
        # not with a traceback from the first layer written into it.
        if write and not all(os.access(d, os.W_OK | os.X_OK) for d in (self.blobs, self.entries)):
            raise BuildError(f"cache directory {root}: not writable (use --cache-dir or --no-cache)")

    # -- lookup -------------------------------------------------------------------------------------

    def lookup(self, key: str, *, compression: str, need_tar: bool, comment: str) -> Layer | None:
        path = self.entries / f"{key}.json"
        try:
            text = path.read_text()
            entry = json.loads(text)
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        tar = self._blob(entry.get("tar"))
        if tar is None and need_tar:
            return None
        forms = entry.get("compressed", {})
        if compression == "none":
            compressed = tar if tar is not None else None
            if compressed is None:
                diff = entry.get("diff_id")
                compressed = Blob(diff, entry.get("tar_size", 0), None)
        else:
            compressed = self._blob(forms.get(compression))
            if compressed is None:
                return None
        if tar is None:
            tar = Blob(entry["diff_id"], entry["tar_size"], None)
        # _blob refreshes stamps in place; comparing with the file (not a flag on self, which the
        # other layer threads' lookups would share) tells whether to write the entry back.
        if entry != json.loads(text):
            self._write_entry(path, entry)
        else:
            os.utime(path)  # last use, for `cache prune`
        return Layer(
            diff_id=entry["diff_id"],
            tar=tar,
            compressed=compressed,
            media_type=MEDIA_BY_COMPRESSOR[compression],
            comment=comment,
        )

    def _blob(self, rec: dict | None) -> Blob | None:
        """The recorded blob if it is still there and intact; refreshes `rec["stamp"]` after a re-check."""
        if not rec:
            return None
        digest, size = rec["digest"], rec["size"]
        path = self.blobs / digest.split(":", 1)[1]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if rec.get("stamp") != _stamp(st):
            # Changed since we stored it: trust only a fresh digest.
            if st.st_size != size or file_digest(path) != digest:
                path.unlink(missing_ok=True)
                return None
            rec["stamp"] = _stamp(st)
        return Blob(digest, size, path)

    # -- store --------------------------------------------------------------------------------------

    def store(self, key: str, layer: Layer, compression: str) -> None:
        path = self.entries / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            entry = {}
        entry.update({"diff_id": layer.diff_id, "tar_size": layer.tar.size, "created": int(time.time())})
        if layer.tar.path is not None:
            entry["tar"] = self._record(layer.tar)
        if compression != "none":
            entry.setdefault("compressed", {})[compression] = self._record(layer.compressed)
        self._write_entry(path, entry)

    def _write_entry(self, path: Path, entry: dict) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(entry, sort_keys=True))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk must not leave half entries in the cache
                tmp.unlink(missing_ok=True)
            raise

    def _record(self, blob: Blob) -> dict:
        assert blob.path is not None
        os.chmod(blob.path, 0o444)
        st = os.stat(blob.path)
        return {"digest": blob.digest, "size": blob.size, "stamp": _stamp(st)}

    # -- maintenance --------------------------------------------------------------------------------

    def usage(self) -> tuple[int, int, int]:
        """(layer entries, blobs, bytes)."""
        blobs = list(_files(self.blobs))
        return (len(list(self.entries.glob("*.json"))), len(blobs), sum(p.stat().st_size for p in blobs))

    def prune(self, older_than_s: float = 0.0) -> tuple[int, int]:
        """Drop entries unused for `older_than_s` seconds, then every blob no entry refers to."""
        now = time.time()
        removed = 0
        for p in self.entries.glob("*.json"):
            if now - p.stat().st_mtime >= older_than_s:
                p.unlink(missing_ok=True)
                removed += 1
        live: set[str] = set()
        for p in self.entries.glob("*.json"):
            try:
                entry = json.loads(p.read_text())
            except json.JSONDecodeError:
                continue
            if entry.get("tar"):
                live.add(entry["tar"]["digest"].split(":", 1)[1])
            for rec in entry.get("compressed", {}).values():
                live.add(rec["digest"].split(":", 1)[1])
        freed = 0
        for p in _files(self.blobs):
            if p.name not in live:
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
        return removed, freed

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _files(d: Path) -> Iterator[Path]:
    if d.is_dir():
        for p in d.iterdir():
            if p.is_file() and not p.name.startswith("."):
                yield p
