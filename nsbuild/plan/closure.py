"""The closure of store paths, as Nix computes it (DESIGN.md §3).

Where the store has a Nix database (`<storeDir>/../var/nix/db/db.sqlite`: `/nix/var/nix/db` for
`/nix/store`, the same layout a `local?root=…` or `local?store=…&state=…` store uses), references
come from it: they are what Nix found when it built or added the path, and `nix-store -qR` is the
oracle. A path's hash merely appearing in a file adds nothing there. Without a database, references
are found by scanning (nsbuild.plan.store.Store.scan), which never follows a `.drv` file.

The database is only read: opened read-only, and as an immutable file only when no write-ahead log
is pending (a store whose directory we may not write), checked afterwards not to have changed.
"""

from __future__ import annotations

import os
import sqlite3
import tarfile
from collections.abc import Iterable
from pathlib import Path

from nsbuild.errors import BuildError
from nsbuild.plan.store import Store, StorePath

DB_BESIDE_STORE = Path("var/nix/db/db.sqlite")  # relative to the store directory's parent


def nix_db_for(store_dir: Path) -> Path | None:
    """The Nix database of a store directory, or None when the store has none."""
    db = Path(os.path.normpath(store_dir)).parent / DB_BESIDE_STORE
    return db if db.is_file() else None


class NixDB:
    """Read-only view of a Nix local-store database: which paths are valid, and their references."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._wal = Path(str(db) + "-wal")
        self._stamp: tuple[int, int] | None = None
        self.con = self._open()
        self.prefix = self._store_prefix()

    def _open(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(f"{self.db.as_uri()}?mode=ro", uri=True)
            con.execute("select count(*) from ValidPaths limit 1").fetchone()
            con.execute("begin")  # one snapshot for every query of this closure
            return con
        except sqlite3.DatabaseError as first:
            if _has_log(self._wal):
                # Committed transactions may still be in the log: reading the file alone would miss them.
                raise BuildError(f"cannot read the Nix database {self.db}: {first}") from None
        # A WAL database in a directory we cannot write (the -shm file cannot be made): with no log
        # pending, the file alone is the whole database. Checked unchanged when we are done.
        self._stamp = _stamp(self.db)
        try:
            con = sqlite3.connect(f"{self.db.as_uri()}?mode=ro&immutable=1", uri=True)
            con.execute("select count(*) from ValidPaths limit 1").fetchone()
            return con
        except sqlite3.DatabaseError as e:
            raise BuildError(f"cannot read the Nix database {self.db}: {e}") from None

    def _store_prefix(self) -> str | None:
        """The store directory the database names its paths under (a chroot store says /nix/store for
        what lies in <root>/nix/store); None for an empty database."""
        row = self._query("select path from ValidPaths limit 1", ())
        return os.path.dirname(row[0][0]) if row else None

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        try:
            return self.con.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise BuildError(f"cannot read the Nix database {self.db}: {e}") from None

    def references(self, name: str) -> list[str] | None:
        """Entry names `name` refers to (itself included when Nix recorded it), or None: not valid."""
        if self.prefix is None:
            return None
        rows = self._query("select id from ValidPaths where path = ?", (f"{self.prefix}/{name}",))
        if not rows:
            return None
        refs = self._query(
            "select v.path from Refs r join ValidPaths v on v.id = r.reference where r.referrer = ?", (rows[0][0],)
        )
        return sorted(os.path.basename(r[0]) for r in refs)

    def close(self) -> None:
        self.con.close()
        if self._stamp is not None and (_has_log(self._wal) or _stamp(self.db) != self._stamp):
            raise BuildError(
                f"the Nix database {self.db} changed while it was read (a Nix build or "
                "garbage collection running?); build again"
            )


def _has_log(wal: Path) -> bool:
    try:
        return wal.stat().st_size > 0
    except FileNotFoundError:
        return False


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def closure(store: Store, roots: Iterable[Path]) -> dict[str, StorePath]:
    """Every store path reachable from `roots`, keyed by entry name: from the store's Nix database when
    it has one, else by scanning."""
    db_path = nix_db_for(store.dir)
    if db_path is None:
        return _scanned_closure(store, roots)
    db = NixDB(db_path)
    try:
        return _db_closure(store, db, roots)
    finally:
        db.close()


def _scanned_closure(store: Store, roots: Iterable[Path]) -> dict[str, StorePath]:
    out: dict[str, StorePath] = {}
    todo = list(roots)
    while todo:
        entry = todo.pop()
        if entry.name in out:
            continue
        sp = store.scan(entry)
        out[entry.name] = sp
        todo.extend(store.dir / store.entries[h] for h in sorted(sp.references))
    return out


def _db_closure(store: Store, db: NixDB, roots: Iterable[Path]) -> dict[str, StorePath]:
    out: dict[str, StorePath] = {}
    todo = list(roots)
    while todo:
        entry = todo.pop()
        if entry.name in out:
            continue
        refs = db.references(entry.name)
        if refs is None:
            raise BuildError(
                f"{entry}: not a valid path in the Nix database {db.db} (Nix would not use it; "
                f"`nix-store --verify-path {db.prefix or store.dir}/{entry.name}`)"
            )
        missing = [r for r in refs if not os.path.lexists(store.dir / r)]
        if missing:
            raise BuildError(
                f"{entry}: refers to {store.dir / missing[0]}, which the Nix database "
                f"{db.db} registers but is missing from the store"
            )
        others = {r[:32] for r in refs if r != entry.name}
        out[entry.name] = StorePath(entry, store.size_of(entry), others, self_reference=entry.name in refs)
        todo.extend(store.dir / r for r in sorted(refs) if r != entry.name)
    return out


def output_hashes(store: Store, output: Path, inside: Iterable[str] = ()) -> set[str]:
    """Hash parts of store entries occurring in the customisation layer (names, link targets, file
    contents), its tree or its tar (the sandbox's output), as Nix finds the references of a build's
    output. The store paths `inside` (already in the image, perhaps copied into it) are left out: their
    references are known, and from the database they may differ from what a scan of their bytes finds."""
    if output.is_file():
        return _tar_hashes(store, output, set(inside))
    image_store = output / str(store.dir).lstrip("/")
    return store.hashes_in(output, frozenset(image_store / name for name in inside))


def referenced_paths(store: Store, output: Path, inside: Iterable[str], before: set[str]) -> list[Path]:
    """The store paths the scripts' output refers to and the layer did not before they ran (`before`:
    output_hashes of it then), none of `inside`."""
    inside = set(inside)
    found = output_hashes(store, output, inside) - before
    return [store.dir / store.entries[h] for h in sorted(found) if store.entries[h] not in inside]


def _tar_hashes(store: Store, tar: Path, skip: set[str]) -> set[str]:
    prefix = str(store.dir).strip("/") + "/"
    finder = store.finder()
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                name = m.name.removeprefix("./").lstrip("/")
                if name.startswith(prefix) and name[len(prefix) :].split("/", 1)[0] in skip:
                    continue
                finder.look(os.fsencode(m.name))
                if m.issym() or m.islnk():
                    finder.look(os.fsencode(m.linkname))
                elif m.isreg():
                    f = tf.extractfile(m)
                    if f is not None:
                        finder.read(f)
    except (OSError, tarfile.TarError) as e:
        raise BuildError(f"cannot read the customisation layer {tar}: {e}") from None
    return finder.found
