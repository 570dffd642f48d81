"""Store paths: closures (nsbuild.plan.closure: from the Nix database, else by reference scanning, as Nix does)
(DESIGN.md §3; layers: nsbuild.plan.autolayer)."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from nsbuild.errors import BuildError

HASH_CHARS = rb"0-9a-df-np-sv-z"  # Nix's base32 alphabet
STORE_ENTRY_RE = re.compile(r"^[0-9a-df-np-sv-z]{32}-.+$")
HASH_RUN_RE = re.compile(rb"[" + HASH_CHARS + rb"]{32,}")
SCAN_CHUNK = 1 << 20


@dataclass
class StorePath:
    path: Path  # <storeDir>/<hash>-<name>
    size: int = 0
    references: set[str] = field(default_factory=set)  # hash parts of other store paths
    # From the Nix database: whether Nix recorded a reference to itself. None: found by scanning the NAR.
    self_reference: bool | None = None

    @property
    def hash_part(self) -> str:
        return self.path.name[:32]


class Store:
    """A directory of `<hash>-<name>` entries (a Nix store, or anything shaped like one)."""

    def __init__(self, store_dir: str) -> None:
        self.dir = Path(store_dir)
        self._entries: dict[str, str] | None = None
        self._scanned: dict[str, StorePath] = {}
        self._outputs: set[str] | None = None  # hash parts of the entries that are not .drv files

    @property
    def entries(self) -> dict[str, str]:
        """hash part → entry name, for every entry in the store directory."""
        if self._entries is None:
            try:
                names = os.listdir(self.dir)
            except FileNotFoundError:
                names = []
            self._entries = {n[:32]: n for n in names if STORE_ENTRY_RE.match(n)}
        return self._entries

    def entry_of(self, path: Path) -> Path | None:
        """The store entry a path belongs to, following symlinks from outside the store (`./result`)."""
        p = Path(os.path.normpath(os.path.abspath(path)))
        for _ in range(40):
            try:
                rel = p.relative_to(self.dir)
            except ValueError:
                if not p.is_symlink():
                    return None
                p = Path(os.path.normpath(p.parent / os.readlink(p)))
                continue
            if not rel.parts or not STORE_ENTRY_RE.match(rel.parts[0]):
                return None
            return self.dir / rel.parts[0]
        raise BuildError(f"{path}: too many levels of symbolic links")

    def scan(self, entry: Path) -> StorePath:
        found = self._scanned.get(entry.name)
        if found is None:
            found = self._scanned[entry.name] = self._scan(entry)
        return found

    def _scan(self, entry: Path) -> StorePath:
        size = self.size_of(entry)
        return StorePath(entry, size, self.hashes_in(entry) - {entry.name[:32]})

    def size_of(self, entry: Path) -> int:
        return sum(st.st_size for _, st in _walk(entry))

    def hashes_in(self, top: Path, skip: frozenset[Path] = frozenset()) -> set[str]:
        """Hash parts of this store's entries occurring in a tree or file: names, symlink targets,
        file contents. `.drv` files are never among them: an output naming one (a build log, a
        nix-support file) does not need the recipe at run time, and Nix never counts it either."""
        finder = self.finder()
        for path, st in _walk(top, skip):
            finder.look(os.fsencode(path.name))
            if stat.S_ISLNK(st.st_mode):
                finder.look(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    finder.read(f)
        return finder.found

    def finder(self) -> HashFinder:
        if self._outputs is None:
            self._outputs = {h for h, n in self.entries.items() if not n.endswith(".drv")}
        return HashFinder(self._outputs)

    def paths_in_text(self, text: str) -> list[Path]:
        """Store paths named in a text (an Entrypoint, an Env value, ...)."""
        prefix = re.escape(str(self.dir).rstrip("/") + "/")
        found = []
        for m in re.finditer(prefix + r"([0-9a-df-np-sv-z]{32})-", text):
            name = self.entries.get(m.group(1))
            if name is not None:
                found.append(self.dir / name)
        return found


class HashFinder:
    """Collects the hash parts among `known` that occur in the bytes it is shown."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.found: set[str] = set()

    def look(self, data: bytes) -> None:
        for run in HASH_RUN_RE.findall(data):
            for i in range(len(run) - 31):
                h = run[i : i + 32].decode()
                if h in self.known:
                    self.found.add(h)

    def read(self, f: IO[bytes]) -> None:
        """A whole stream, in chunks overlapping by 31 bytes so that no hash is cut in two."""
        tail = b""
        while chunk := f.read(SCAN_CHUNK):
            self.look(tail + chunk)
            tail = chunk[-31:]


def _walk(top: Path, skip: frozenset[Path] = frozenset()) -> Iterable[tuple[Path, os.stat_result]]:
    st = os.lstat(top)
    yield top, st
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(top)):
            if top / name not in skip:
                yield from _walk(top / name, skip)
