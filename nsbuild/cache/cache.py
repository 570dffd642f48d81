"""Content-addressed layer cache: unchanged layers are not rebuilt (DESIGN.md §1 "cache").

Layout under the cache directory (default `$XDG_CACHE_HOME/nsbuild`):

    blobs/sha256/<hex>        layer tars and compressed blobs, read-only, named by digest
    layers/<fingerprint>.json what a layer's inputs produced: diff_id and the blobs per compression
    sbom/<identity>.json      the SBOM's package scan of an image's layers (nsbuild.cache.scans)

A fingerprint covers everything that decides a layer's bytes: the writer's format version, each
source's host path and target, the stat data of every entry below it (type, mode, ids, size, inode,
mtime and ctime: any change to a file's content, metadata or xattrs moves its ctime), the ownership
policy and the layer mtime.  Walking the trees costs one lstat per entry, nothing is read.

A blob is trusted while its size, inode, mtime and ctime are what the cache recorded when it stored
it or last checked it; when they differ, the blob is hashed again and, if wrong, dropped and its layer
rebuilt.  Writing into a file moves its ctime, and nobody can set a ctime back, so an in-place edit is
seen even when the size and mtime are restored.  So is a link into an OCI layout (a link count change
moves the ctime): the next build hashes that blob once more, then records the new stamp.  What no
stamp sees (a bit flipped on the disk, an edit of the raw device) `nsbuild cache verify` finds, and
every blob is hashed again before a push.

Several processes may use one cache at once: see nsbuild.cache.cacheshare (pins, staging, sweeping).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from nsbuild.cache.cacheshare import Staging, cache_lock, live_pins, stray_temporaries, sweep, temporary_usage
from nsbuild.cache.scans import PackageScans
from nsbuild.core.compress import open_decompressed
from nsbuild.errors import BuildError
from nsbuild.layer.layer import MEDIA_BY_COMPRESSOR, Blob, Layer, file_digest
from nsbuild.tar.owners import OwnerPolicy
from nsbuild.tar.tarinput import TAR_INPUT_VERSION
from nsbuild.tar.tarwriter import FORMAT_VERSION, Source

try:
    from nsbuild.cache import _treestat  # type: ignore[attr-defined]
except ImportError:  # not built (no compiler at install): the Python walk, the same fingerprints
    _treestat = None
_ON = ("1", "yes", "true")  # NSBUILD_PURE_PYTHON: the pure-Python paths everywhere
_WALK_THREADS = min(4, len(os.sched_getaffinity(0)))


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


def tar_fingerprint(path: Path, *, target: str, keep_mtime: bool, mtime: int, owner: OwnerPolicy) -> str:
    """The key of a `{"tar": …}` entry's layer: the tar file's bytes and how they are normalised."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, TAR_INPUT_VERSION, mtime, owner.to_json(), target, keep_mtime]).encode())
    with open(path, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
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
    if _treestat is not None and not top.endswith(b"/") and os.environ.get("NSBUILD_PURE_PYTHON", "") not in _ON:
        # The same records, faster: in C, and directories read by several threads at once (a no-op
        # rebuild is mostly this walk).
        _treestat.walk(top, h.update, _WALK_THREADS)
        return
    _hash_tree_py(top, h)


def _hash_tree_py(top: bytes, h: hashlib._Hash) -> None:
    """Below the directory `top`: every entry's record (name and stat data), directories in the order of
    a stack of sorted names (nsbuild/cache/_treestat.c walks the same way)."""
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
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


class LayerCache:
    def __init__(self, root: Path, *, write: bool = True, staging: bool = False) -> None:
        """`staging`: this process builds with the cache (pins what it uses, sweeps dead builds' leftovers)."""
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.entries = root / "layers"
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.entries.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BuildError(f"cache directory {root}: {exc.strerror} (use --cache-dir or --no-cache)") from None
        # An existing cache someone else owns (or on a read-only mount) passes mkdir; find out now,
        # not with a traceback from the first layer written into it.
        if write and not all(os.access(d, os.W_OK | os.X_OK) for d in (self.root, self.blobs, self.entries)):
            raise BuildError(f"cache directory {root}: not writable (use --cache-dir or --no-cache)")
        self.staging: Staging | None = None
        self._pin_lock = threading.Lock()
        if staging:
            sweep(root, block=False)  # a prune or another build's sweep holds it: they do it
            self.staging = Staging(root)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
            self.staging = None

    @property
    def store_root(self) -> Path:
        """Where this build downloads or builds blobs before they are published (a private directory
        holding `blobs/sha256`: nothing half-written or unverified is ever in the shared store)."""
        assert self.staging is not None
        return self.staging.root

    def pin_present(self, digests: list[str], required: list[str]) -> list[str]:
        """Pin `digests` for this build, then the ones of `required` that are not in the cache.
        A blob that is present now stays until the build ends, whatever prune does."""
        with cache_lock(self.root, exclusive=False):
            self._pin(digests + required)
            return [d for d in required if not (self.blobs / d.split(":", 1)[1]).exists()]

    def _pin(self, digests: list[str]) -> None:
        if self.staging is not None:
            with self._pin_lock:
                self.staging.pin(digests)

    # -- lookup -------------------------------------------------------------------------------------

    def lookup(self, key: str, *, compression: str, need_tar: bool, comment: str) -> Layer | None:
        path = self.entries / f"{key}.json"
        try:
            text = path.read_text()
            entry = json.loads(text)
            forms = entry.get("compressed", {})
            recs = [r for r in (entry.get("tar"), forms.get(compression) if compression != "none" else None) if r]
            # Pin, then look: prune (exclusive lock) has deleted these already or leaves them alone.
            with cache_lock(self.root, exclusive=False):
                self._pin([r["digest"] for r in recs])
                stats = {id(r): _stat_or_none(self.blobs / r["digest"].split(":", 1)[1]) for r in recs}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        tar = self._blob(entry.get("tar"), stats)
        if tar is None and need_tar:
            return None
        if compression == "none":
            compressed = tar if tar is not None else None
            if compressed is None:
                diff = entry.get("diff_id")
                compressed = Blob(diff, entry.get("tar_size", 0), None)
        else:
            compressed = self._blob(forms.get(compression), stats)
            if compressed is None:
                return None
        if tar is None:
            tar = Blob(entry["diff_id"], entry["tar_size"], None)
        # _blob refreshes stamps in place; comparing with the file (not a flag on self, which the
        # other layer threads' lookups would share) tells whether to write the entry back.
        with contextlib.suppress(OSError):
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

    def _blob(self, rec: dict | None, stats: dict[int, os.stat_result | None]) -> Blob | None:
        """The recorded blob if it is still there and intact; refreshes `rec["stamp"]` after a re-check."""
        if not rec:
            return None
        digest, size = rec["digest"], rec["size"]
        path = self.blobs / digest.split(":", 1)[1]
        st = stats.get(id(rec))
        if st is None:
            return None
        if rec.get("stamp") != _stamp(st):
            # Changed since we stored or checked it: trust only a fresh digest.
            try:
                good = st.st_size == size and file_digest(path) == digest
                now = os.stat(path)
            except OSError:
                return None
            if not good or now.st_ino != st.st_ino:
                with contextlib.suppress(OSError):
                    if os.stat(path).st_ino == st.st_ino:
                        path.unlink()
                return None
            rec["stamp"] = _stamp(now)
        return Blob(digest, size, path)

    # -- store --------------------------------------------------------------------------------------

    def store(self, key: str, layer: Layer, compression: str) -> Layer:
        """Publish the layer's blobs into the cache and record them under `key`; the layer with its
        blobs' paths in the cache (pinned for this build)."""
        path = self.entries / f"{key}.json"
        with cache_lock(self.root, exclusive=False):
            self._pin([b.digest for b in (layer.tar, layer.compressed) if b.path is not None])
            tar = self._publish(layer.tar)
            compressed = tar if layer.compressed.digest == layer.tar.digest else self._publish(layer.compressed)
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            entry = {}
        if not isinstance(entry, dict):
            entry = {}
        entry.update({"diff_id": layer.diff_id, "tar_size": layer.tar.size, "created": int(time.time())})
        if tar.path is not None:
            entry["tar"] = self._record(tar)
        if compression != "none":
            entry.setdefault("compressed", {})[compression] = self._record(compressed)
        self._write_entry(path, entry)
        return dataclasses.replace(layer, tar=tar, compressed=compressed)

    def _publish(self, blob: Blob) -> Blob:
        """Move a blob of this build's staging area into the store (replacing a copy there: this one
        was just written and verified, the other may have been tampered with)."""
        if blob.path is None or blob.path.parent == self.blobs:
            return blob
        final = self.blobs / blob.digest.split(":", 1)[1]
        src = blob.path
        if self.staging is None or src.parent != self.staging.blobs:
            # Not ours to move (a workspace file): a copy, published the same way.
            tmp = (self.staging.root if self.staging else self.blobs) / f".{final.name}.{os.getpid()}.tmp"
            shutil.copyfile(src, tmp)
            src = tmp
        os.chmod(src, 0o444)
        os.replace(src, final)
        return Blob(blob.digest, blob.size, final)

    def _write_entry(self, path: Path, entry: dict) -> None:
        where = self.staging.root if self.staging is not None else path.parent
        tmp = where / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_text(json.dumps(entry, sort_keys=True))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk must not leave half entries in the cache
                tmp.unlink(missing_ok=True)
            raise

    def _record(self, blob: Blob) -> dict:
        assert blob.path is not None
        with contextlib.suppress(OSError):  # another build replaced it with its own (read-only) copy
            os.chmod(blob.path, 0o444)
        st = os.stat(blob.path)
        return {"digest": blob.digest, "size": blob.size, "stamp": _stamp(st)}

    # -- maintenance --------------------------------------------------------------------------------

    def usage(self) -> tuple[int, int, int, int, int]:
        """(layer entries, blobs, bytes, temporary files, their bytes)."""
        sizes = [_size(p) for p in _files(self.blobs)]
        temps, temp_bytes = temporary_usage(self.root)
        return len(list(self.entries.glob("*.json"))), len(sizes), sum(sizes), temps, temp_bytes

    def prune(self, older_than_s: float = 0.0) -> tuple[int, int]:
        """Drop entries unused for `older_than_s` seconds, then every blob no entry refers to and no
        running build has pinned; also what dead builds left behind."""
        with cache_lock(self.root, exclusive=True):
            pins, live_builds = live_pins(self.root, sweep=True)
            for p in stray_temporaries(self.root, no_live_builds=live_builds == 0):
                with contextlib.suppress(OSError):
                    p.unlink()
            return self._prune_locked(older_than_s, pins)

    def _prune_locked(self, older_than_s: float, live: set[str]) -> tuple[int, int]:
        now = time.time()
        removed = 0
        for p in self.entries.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    removed += 1
        PackageScans(self.root).prune(now, older_than_s)  # kept no blob alive: counted with neither
        for p in self.entries.glob("*.json"):
            live.update(_entry_blobs(p))
        freed = 0
        for p in _files(self.blobs):
            if p.name not in live:
                size = _size(p)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    freed += size
        return removed, freed

    def verify(self) -> tuple[int, int, list[str]]:
        """Hash every blob again and check every entry against its blobs; what is wrong is removed
        (rebuilt by the next build).  (blobs checked, their bytes, problems found)."""
        problems: list[str] = []
        checked = size = 0
        for p in _files(self.blobs):
            try:
                digest = file_digest(p)
            except FileNotFoundError:
                continue  # pruned meanwhile
            checked += 1
            size += _size(p)
            if digest != "sha256:" + p.name:
                problems.append(f"blob sha256:{p.name} has the digest {digest}: removed")
                with contextlib.suppress(OSError):
                    p.unlink()
        for p in sorted(self.entries.glob("*.json")):
            if (why := self._bad_entry(p)) is not None:
                problems.append(f"layer entry {p.stem[:16]}: {why}: removed")
                with contextlib.suppress(OSError):
                    p.unlink()
        return checked, size, problems

    def _bad_entry(self, path: Path) -> str | None:
        """Why an entry cannot be served (None: it is fine): unreadable, or a compressed blob that does
        not decompress to the layer's diff_id."""
        try:
            entry = json.loads(path.read_text())
            diff_id = entry["diff_id"]
            forms = list(entry.get("compressed", {}).values())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "not a valid entry"
        for rec in forms:
            blob = self.blobs / str(rec.get("digest", ":")).split(":", 1)[1]
            try:
                with open_decompressed(blob) as f:
                    h = hashlib.sha256()
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                    got = "sha256:" + h.hexdigest()
            except FileNotFoundError:
                continue  # a missing blob is a cache miss, not an error
            except (OSError, EOFError, ValueError) as exc:
                return f"blob {rec.get('digest')} does not decompress ({exc})"
            if got != diff_id:
                return f"blob {rec.get('digest')} holds {got}, not the layer {diff_id}"
        return None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_open: dict[Path, LayerCache] = {}
_open_lock = threading.Lock()


def open_cache(root: Path) -> LayerCache:
    """This build's handle on the cache at `root` (one per process and root: one staging area)."""
    key = root.absolute()
    with _open_lock:
        if key not in _open:
            _open[key] = LayerCache(root, staging=True)
        return _open[key]


def close_caches() -> None:
    """End the build's use of its caches: its pins go, its staging area is removed."""
    with _open_lock:
        for cache in _open.values():
            cache.close()
        _open.clear()


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _entry_blobs(path: Path) -> set[str]:
    """The blob names (hex) an entry refers to; none for an entry that vanished or is unreadable."""
    try:
        entry = json.loads(path.read_text())
        recs = [entry.get("tar"), *entry.get("compressed", {}).values()]
        return {str(r["digest"]).split(":", 1)[1] for r in recs if r}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return set()


def _files(d: Path) -> Iterator[Path]:
    if d.is_dir():
        for p in d.iterdir():
            if p.is_file() and not p.name.startswith("."):
                yield p
