"""includeNixDB: register the image's store paths in a Nix local-store database (DESIGN.md §2).

What `nix-store --load-db` leaves under a store root is reproduced without Nix: the SQLite
database of schema version 10 (Nix 2.x), the `schema` file, `big-lock`, the state directories a
local store creates on first open, and the gcroots dockerTools adds (`gcroots/docker/<name>`).
Every path gets its NAR hash and size, computed here by serialising the path as a NAR (Nix's
archive format) into a hash without ever holding the archive.

Bit-identical output for identical inputs: rows go in sorted order, the page size and journal
mode are fixed, the file is VACUUMed, modes are set explicitly (no umask), no clock is read.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from nsbuild.errors import BuildError
from nsbuild.plan.store import StorePath

NIX_SCHEMA_VERSION = 10  # Nix >= 2.0; a store with a lower number is migrated by Nix, a higher one refused
STATE_DIR = "nix/var/nix"  # Nix's default NIX_STATE_DIR, relative to the image root
READ_CHUNK = 1 << 20

# The local-store schema Nix 2.x creates for a new database (src/libstore/schema.sql). Kept as
# Nix writes it so that `sqlite3 .schema` matches a database made by nix-store itself.
SCHEMA_SQL = """\
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);

create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);

create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);

-- Paths can refer to themselves, causing a tuple (N, N) in the Refs
-- table.  This causes a deletion of the corresponding row in
-- ValidPaths to cause a foreign key constraint violation (due to `on
-- delete restrict' on the `reference' column).  Therefore, explicitly
-- get rid of self-references.
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;

create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);

create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"""


# --- NAR serialisation -------------------------------------------------------------------------


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass
class NarInfo:
    sha256: str  # base16
    size: int
    self_reference: bool  # the path's own hash part occurs in its NAR (Nix records a self-reference)

    @property
    def nix_hash(self) -> str:
        """The form Nix keeps in ValidPaths.hash."""
        return "sha256:" + self.sha256


class _HashSink:
    """sha256 + size of the bytes written, and whether `needle` occurs in them (across writes)."""

    def __init__(self, needle: bytes | None) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.needle = needle
        self.found = False
        self._tail = b""

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        if self.needle and not self.found:
            window = self._tail + data
            if self.needle in window:
                self.found = True
            self._tail = window[-(len(self.needle) - 1) :]


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 8)


def _str(data: bytes) -> bytes:
    """A NAR string: little-endian u64 length, the bytes, zero padding to a multiple of 8."""
    return struct.pack("<Q", len(data)) + data + _pad(len(data))


_OPEN, _CLOSE = _str(b"("), _str(b")")
_MAGIC = _str(b"nix-archive-1")


def _dump(path: bytes, sink: _Sink) -> None:
    st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        sink.write(_OPEN + _str(b"type") + _str(b"regular"))
        if mode & stat.S_IXUSR:  # Nix's one bit of mode: executable by the owner
            sink.write(_str(b"executable") + _str(b""))
        sink.write(_str(b"contents") + struct.pack("<Q", st.st_size))
        left = st.st_size
        with open(path, "rb") as f:
            while left > 0:
                chunk = f.read(min(READ_CHUNK, left))
                if not chunk:
                    break
                sink.write(chunk)
                left -= len(chunk)
            if left or f.read(1):
                # The length is already in the archive: a file that changes now gives a wrong hash.
                raise BuildError(f"{os.fsdecode(path)}: changed size while its NAR hash was computed")
        sink.write(_pad(st.st_size) + _CLOSE)
    elif stat.S_ISLNK(mode):
        sink.write(_OPEN + _str(b"type") + _str(b"symlink") + _str(b"target") + _str(os.readlink(path)) + _CLOSE)
    elif stat.S_ISDIR(mode):
        sink.write(_OPEN + _str(b"type") + _str(b"directory"))
        for name in sorted(os.listdir(path)):  # bytes order, as Nix's std::map<std::string>
            sink.write(_str(b"entry") + _OPEN + _str(b"name") + _str(name) + _str(b"node"))
            _dump(path + b"/" + name, sink)
            sink.write(_CLOSE)
        sink.write(_CLOSE)
    else:
        raise BuildError(
            f"{os.fsdecode(path)}: a store path may hold only regular files, directories and "
            f"symlinks (Nix cannot archive this {_kind(mode)})"
        )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "file type"


def write_nar(path: Path, out: BinaryIO) -> None:
    """Serialise `path` as a NAR (what `nix-store --dump` prints)."""
    out.write(_MAGIC)
    _dump(os.fsencode(path), out)


def nar_info(path: Path, self_hash: str | None = None) -> NarInfo:
    """NAR hash and size of `path`, streaming; also whether `self_hash` occurs anywhere in the NAR
    (file contents, names, symlink targets), which is how Nix finds a path's reference to itself."""
    sink = _HashSink(self_hash.encode() if self_hash else None)
    sink.write(_MAGIC)
    try:
        _dump(os.fsencode(path), sink)
    except OSError as e:
        raise BuildError(f"includeNixDB: cannot read {e.filename or path}: {e.strerror}") from None
    return NarInfo(sink.hash.hexdigest(), sink.size, sink.found)


# --- database ----------------------------------------------------------------------------------


@dataclass
class Registration:
    path: str  # as seen inside the image: <store_dir>/<hash>-<name>
    nar: NarInfo
    references: list[str]  # image paths, sorted, possibly including `path` itself


def registrations(closure: dict[str, StorePath], store_dir: str, jobs: int | None = None) -> list[Registration]:
    """One registration per closure entry, sorted by path, NAR hashes computed in parallel
    (hashlib and reads release the GIL)."""
    store_dir = store_dir.rstrip("/") or "/"
    names = sorted(closure)
    by_hash = {closure[n].hash_part: n for n in names}
    for name in names:
        missing = sorted(h for h in closure[name].references if h not in by_hash)
        if missing:
            raise BuildError(f"includeNixDB: {name} refers to {missing[0]}, which is not in the image's closure")

    def one(name: str) -> Registration:
        sp = closure[name]
        # A self-reference Nix recorded is taken as it is; without a database the NAR tells.
        info = nar_info(sp.path, sp.hash_part if sp.self_reference is None else None)
        refs = {f"{store_dir}/{by_hash[h]}" for h in sp.references}
        if info.self_reference or sp.self_reference:
            refs.add(f"{store_dir}/{name}")
        return Registration(f"{store_dir}/{name}", info, sorted(refs))

    workers = max(1, min(jobs or len(os.sched_getaffinity(0)), len(names) or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, names))


def write_db_file(db_path: Path, regs: Iterable[Registration], registration_time: int) -> None:
    """A fresh db.sqlite at `db_path` (replaced if present), bit-identical for identical input."""
    regs = sorted(regs, key=lambda r: r.path)
    tmp = db_path.with_name(db_path.name + ".tmp")
    for p in (tmp, Path(str(tmp) + "-journal")):
        p.unlink(missing_ok=True)
    con = sqlite3.connect(tmp, isolation_level=None)
    try:
        # Before any table exists, so they take effect; DELETE journal leaves no -wal/-shm beside
        # the file (Nix switches to WAL itself when it first opens the store).
        con.execute("pragma page_size = 4096")
        con.execute("pragma journal_mode = delete")
        con.execute("pragma auto_vacuum = none")
        con.execute("pragma encoding = 'UTF-8'")
        con.execute("begin")
        _exec_script(con, SCHEMA_SQL)
        ids: dict[str, int] = {}
        for i, r in enumerate(regs, 1):
            con.execute(
                "insert into ValidPaths (id, path, hash, registrationTime, deriver, narSize, ultimate, "
                "sigs, ca) values (?, ?, ?, ?, null, ?, null, null, null)",
                (i, r.path, r.nar.nix_hash, registration_time, r.nar.size or None),
            )
            ids[r.path] = i
        refs = sorted((ids[r.path], ids[ref]) for r in regs for ref in r.references)
        con.executemany("insert into Refs (referrer, reference) values (?, ?)", refs)
        con.execute("commit")
        con.execute("vacuum")
        check = con.execute("pragma integrity_check").fetchone()[0]
        if check != "ok":
            raise BuildError(f"includeNixDB: the database written is damaged: {check}")
    finally:
        con.close()
    os.chmod(tmp, 0o644)
    os.replace(tmp, db_path)


def _exec_script(con: sqlite3.Connection, script: str) -> None:
    # executescript() would commit the open transaction first; statements one by one keep it.
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            con.execute(buf)
            buf = ""


# --- the state directory -----------------------------------------------------------------------


def _safe_dir(root: Path, rel: str) -> Path:
    """root/rel as a real directory (mode 0755), refusing symlinks that would lead outside root."""
    cur = root
    for part in Path(rel).parts:
        cur = cur / part
        if cur.is_symlink():
            raise BuildError(
                f"includeNixDB: /{cur.relative_to(root)} is a symlink in the image tree; "
                f"cannot write the Nix database there"
            )
        if not cur.exists():
            cur.mkdir()
            os.chmod(cur, 0o755)
        elif not cur.is_dir():
            raise BuildError(f"includeNixDB: /{cur.relative_to(root)} exists and is not a directory")
    return cur


def _write_file(path: Path, data: bytes, mode: int) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    with open(path, "xb") as f:
        f.write(data)
    os.chmod(path, mode)


def _symlink(target: str, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link)


def write_nix_db(
    root: Path, closure: dict[str, StorePath], roots: list[Path], store_dir: str, registration_time: int
) -> None:
    """Register every path of `closure` (with its references) in `root`/nix/var/nix/db/db.sqlite as
    `nix-store --load-db` would, and make each of `roots` a gcroot as dockerTools does.

    `closure` holds the store paths at their host location; `store_dir` is where they are in the
    image (the names registered); `registration_time` is the spec's mtime.
    """
    if not closure:
        raise BuildError("includeNixDB: no store paths to register")
    store_dir = os.path.normpath(store_dir)
    root_names = sorted({r.name for r in roots})
    for name in root_names:
        if name not in closure:
            raise BuildError(f"includeNixDB: gcroot {name} is not one of the registered store paths")
    regs = registrations(closure, store_dir)  # checks the closure before anything is written
    state = STATE_DIR
    db_dir = _safe_dir(root, f"{state}/db")
    for rel in ("profiles/per-user", "gcroots/per-user", "gcroots/docker", "temproots"):
        _safe_dir(root, f"{state}/{rel}")
    write_db_file(db_dir / "db.sqlite", regs, registration_time)
    # Without `schema` Nix would take the store for a new one; with it, for version 10, as written.
    _write_file(db_dir / "schema", str(NIX_SCHEMA_VERSION).encode(), 0o644)
    _write_file(db_dir / "big-lock", b"", 0o600)
    # Not written: db/reserved, 8 MiB of filler Nix keeps to free on a full disk; it recreates the
    # file whenever it opens the store writable, so shipping it would only grow the layer.
    # Nix points gcroots/profiles at its profiles directory when it creates gcroots; dockerTools'
    # images get the build directory there, this is the path inside the image.
    _symlink(f"/{state}/profiles", root / state / "gcroots" / "profiles")
    gcroots = root / state / "gcroots" / "docker"
    for name in root_names:
        _symlink(f"{store_dir}/{name}", gcroots / name)
