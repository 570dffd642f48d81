"""Store paths: closures by reference scanning, as Nix does, and grouping into layers (DESIGN.md §3)."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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

    @property
    def hash_part(self) -> str:
        return self.path.name[:32]


class Store:
    """A directory of `<hash>-<name>` entries (a Nix store, or anything shaped like one)."""

    def __init__(self, store_dir: str) -> None:
        self.dir = Path(store_dir)
        self._entries: dict[str, str] | None = None
        self._scanned: dict[str, StorePath] = {}

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
        known = self.entries
        own = entry.name[:32]
        refs: set[str] = set()
        size = 0

        def look(data: bytes) -> None:
            for run in HASH_RUN_RE.findall(data):
                for i in range(len(run) - 31):
                    h = run[i : i + 32].decode()
                    if h in known and h != own:
                        refs.add(h)

        for path, st in _walk(entry):
            size += st.st_size
            look(os.fsencode(path.name))
            if stat.S_ISLNK(st.st_mode):
                look(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    tail = b""
                    while chunk := f.read(SCAN_CHUNK):
                        look(tail + chunk)
                        tail = chunk[-31:]
        return StorePath(entry, size, refs)

    def closure(self, roots: Iterable[Path]) -> dict[str, StorePath]:
        """Every store path reachable from `roots` by references, keyed by entry name."""
        out: dict[str, StorePath] = {}
        todo = [r for r in roots]
        while todo:
            entry = todo.pop()
            if entry.name in out:
                continue
            sp = self.scan(entry)
            out[entry.name] = sp
            todo.extend(self.dir / self.entries[h] for h in sorted(sp.references))
        return out

    def paths_in_text(self, text: str) -> list[Path]:
        """Store paths named in a text (an Entrypoint, an Env value, ...)."""
        prefix = re.escape(str(self.dir).rstrip("/") + "/")
        found = []
        for m in re.finditer(prefix + r"([0-9a-df-np-sv-z]{32})-", text):
            name = self.entries.get(m.group(1))
            if name is not None:
                found.append(self.dir / name)
        return found


def _walk(top: Path) -> Iterable[tuple[Path, os.stat_result]]:
    st = os.lstat(top)
    yield top, st
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(top)):
            yield from _walk(top / name)


def group_layers(paths: dict[str, StorePath], budget: int) -> list[list[str]]:
    """Split a closure into at most `budget` layers, ordered stable-first.

    The largest paths seed layers of their own; a path reached from exactly one seed joins it; paths
    shared by several seeds get a layer per set of seeds; the rest share one layer.  Seeds are added
    largest-first while the layer count stays within the budget.
    """
    if not paths or budget <= 0:
        return []
    by_hash = {sp.hash_part: name for name, sp in paths.items()}
    order = sorted(paths, key=lambda n: (-paths[n].size, n))

    def reach(seed: str) -> set[str]:
        seen, todo = set(), [seed]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            todo.extend(by_hash[h] for h in paths[n].references if h in by_hash)
        return seen

    reaches: dict[str, set[str]] = {}
    best: list[list[str]] = [sorted(paths)]
    seeds: list[str] = []
    for candidate in order:
        if len(seeds) >= budget:
            break
        reaches[candidate] = reach(candidate)
        layers = _assign(paths, seeds + [candidate], reaches)
        if len(layers) > budget:
            break
        seeds.append(candidate)
        best = layers
    return best


def _assign(paths: dict[str, StorePath], seeds: list[str], reaches: dict[str, set[str]]) -> list[list[str]]:
    owners: dict[str, tuple[str, ...]] = {}
    for name in paths:
        owners[name] = tuple(s for s in seeds if name in reaches[s]) if name not in seeds else (name,)
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, key in owners.items():
        groups.setdefault(key, []).append(name)
    shared = sorted(
        (k for k in groups if len(k) > 1),
        key=lambda k: (-len(k), -sum(paths[n].size for n in groups[k]), sorted(groups[k])),
    )
    single = [(s,) for s in seeds if (s,) in groups]
    layers = [sorted(groups[k]) for k in shared] + [sorted(groups[k]) for k in single]
    if () in groups:
        layers.append(sorted(groups[()]))
    return layers
