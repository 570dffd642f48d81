"""Store paths → store layers, the way nixpkgs' default layering (auto-layer, PR #355189) splits them.

The rule, in nsbuild's words (DESIGN.md §3):

- Every path starts out in one common layer.  Paths are then taken one by one, largest NAR size first
  (equal sizes: the later path name first, since Nix hands the graph over sorted by path), and each
  becomes the *seed* of a layer of its own.
- A path's layer is named by the set of seeds it "belongs to".  When a new seed S is taken, every path
  below S (everything S depends on, transitively) is re-owned: the seeds that sit above S drop out of
  its set (they depend on S, so S's layer lies between them and it), and S joins the set unless a seed
  that is itself below S already holds the path (that lower seed's layer keeps it).  A path owned by
  one seed thus travels with it; a path owned by several seeds gets a layer per such set.
- After each seed the number of distinct sets is counted; the first seed that pushes it past the
  budget is undone and the search stops.  Hidden nodes (dockerTools' base JSON and customisation-layer
  derivations, which are in Nix's graph but not in any store layer) take part and count.
- Layers are ordered by the total size of their closure (all they depend on, themselves included), so
  a layer comes after the layers it depends on; a layer left with hidden nodes only is dropped.  Inside
  a layer paths are ordered by name, then hash, as dockerTools lists them.

Where nixpkgs leaves an order to Python's hash seed (layers of equal closure size), nsbuild breaks the
tie by the layers' sorted path names, so the output stays reproducible.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Node:
    """One store path of the reference graph."""

    size: int  # NAR size, as Nix's narSize
    refs: frozenset[str] = field(default_factory=frozenset)  # names of the paths it refers to


def split_layers(graph: Mapping[str, Node], limit: int, hidden: Iterable[str] = ()) -> list[list[str]]:
    """The graph's paths in at most `limit` layers, lowest first, each a list of names (hidden ones left
    out; they count while the seeds are chosen).  The rule is the module docstring's."""
    if not graph or limit <= 0:
        return []
    # A self-reference says nothing about layering; a reference outside the graph cannot be placed.
    graph = {n: Node(v.size, frozenset(r for r in v.refs if r in graph and r != n)) for n, v in graph.items()}
    users: dict[str, set[str]] = {n: set() for n in graph}
    for name, node in graph.items():
        for ref in node.refs:
            users[ref].add(name)
    owners: dict[str, frozenset[str]] = dict.fromkeys(graph, frozenset())
    for seed in sorted(graph, key=lambda n: (graph[n].size, n), reverse=True):
        below = _reach(seed, lambda n: graph[n].refs)
        above = _reach(seed, lambda n: users[n])
        trial = dict(owners)
        trial[seed] = frozenset((seed,))
        for path in below:
            kept = owners[path] - above  # those seeds reach it through this one now
            trial[path] = kept if kept & below else kept | {seed}  # a lower seed's path stays its own
        if len(set(trial.values())) > limit:
            break  # nixpkgs stops at the first seed that does not fit; later, smaller ones are not tried
        owners = trial
    return _ordered(graph, owners, set(hidden))


def _reach(start: str, step: Callable[[str], Iterable[str]]) -> set[str]:
    """Everything reachable from `start` through `step` (name → next names), `start` excluded."""
    seen = _reach_from(step(start), step)
    seen.discard(start)
    return seen


def _reach_from(starts: Iterable[str], step: Callable[[str], Iterable[str]]) -> set[str]:
    """`starts` and everything reachable from them through `step`."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(step(n))
    return seen


def _ordered(graph: Mapping[str, Node], owners: Mapping[str, frozenset[str]], hidden: set[str]) -> list[list[str]]:
    groups: dict[frozenset[str], list[str]] = {}
    for name, key in owners.items():
        groups.setdefault(key, []).append(name)

    def closure_size(members: list[str]) -> int:
        everything = _reach_from(members, lambda n: graph[n].refs)
        return sum(graph[n].size for n in everything)

    layers = [sorted(members, key=path_key) for members in groups.values()]
    layers.sort(key=lambda members: (closure_size(members), [path_key(m) for m in members]))
    out = [[m for m in members if m not in hidden] for members in layers]
    return [members for members in out if members]


def path_key(path: str) -> tuple[str, str]:
    """dockerTools' order inside a layer: the full path split at its first '-' (the end of the hash,
    unless the store directory has a '-' of its own), the part after it compared first."""
    head, _, rest = path.partition("-")
    return rest, head


# --- NAR sizes ---------------------------------------------------------------------------------------------
# Nix compares paths by narSize: the length of their NAR serialisation.  Only the lengths of the strings
# and file contents enter it, so it is computed from lstat alone (nothing is read).


def _nar_str(n: int) -> int:
    """Bytes taken by a NAR string of n bytes: its u64 length, the bytes, zero padding to 8."""
    return 8 + n + (-n % 8)


_NAR_HEADER = _nar_str(len(b"nix-archive-1"))
_OPEN_CLOSE = 2 * _nar_str(1)
_TYPE = _nar_str(len(b"type"))


def nar_size_of_file(size: int, *, executable: bool = False) -> int:
    """NAR size of a node that is a regular file of `size` bytes (without the archive header)."""
    flag = _nar_str(len(b"executable")) + _nar_str(0) if executable else 0
    return _OPEN_CLOSE + _TYPE + _nar_str(len(b"regular")) + flag + _nar_str(len(b"contents")) + _nar_str(size)


def nar_size_of_link(target: bytes) -> int:
    return _OPEN_CLOSE + _TYPE + _nar_str(len(b"symlink")) + _nar_str(len(b"target")) + _nar_str(len(target))


def nar_size_of_dir(entries: Mapping[bytes, int]) -> int:
    """NAR size of a directory whose entries (name → NAR size of the entry's node) are given."""
    per_entry = _nar_str(len(b"entry")) + _OPEN_CLOSE + _nar_str(len(b"name")) + _nar_str(len(b"node"))
    return (
        _OPEN_CLOSE
        + _TYPE
        + _nar_str(len(b"directory"))
        + sum(per_entry + _nar_str(len(name)) + size for name, size in entries.items())
    )


def nar_size(path: str | os.PathLike[str]) -> int:
    """What Nix records as narSize for the store path at `path` (equal to len(`nix-store --dump`))."""
    return _NAR_HEADER + _node_size(os.fsencode(path))


def nar_size_of_tree(root: int) -> int:
    """NAR size of an archive whose top node takes `root` bytes."""
    return _NAR_HEADER + root


def _node_size(path: bytes) -> int:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return nar_size_of_link(os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return nar_size_of_dir({name: _node_size(path + b"/" + name) for name in os.listdir(path)})
    return nar_size_of_file(st.st_size, executable=bool(st.st_mode & stat.S_IXUSR))


# --- the graph dockerTools hands to auto-layer ----------------------------------------------------------
# streamLayeredImage asks for the reference graph of two derivations of its own, both left out of the store
# layers: the base JSON (the config, whose store paths it refers to) and the customisation layer (a
# symlinkJoin of the contents, i.e. links into every content path, kept as layer.tar + checksum).  They are
# nodes of the graph all the same: they count as a layer while seeds are chosen, and their sizes place
# them among the seeds.  nsbuild stands them in with the sizes those derivations would have.

BASE_JSON_HASH = "0" * 32  # their real hashes depend on the Nix expression; they only break size ties
CUSTOM_LAYER_HASH = "1" * 32
TAR_BLOCK, TAR_RECORD, TAR_NAME_FIELD = 512, 20 * 512, 100


def base_json_text(config: object, architecture: str) -> bytes:
    """What `builtins.toJSON { inherit config architecture; os = "linux"; }` writes: sorted keys, no
    spaces, UTF-8 kept."""
    doc = {"architecture": architecture, "config": config, "os": "linux"}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def customisation_layer_nar_size(content_roots: Iterable[str]) -> int:
    """NAR size of dockerTools' customisation-layer output before any script ran: a directory holding
    `checksum` (sha256 hex + newline) and `layer.tar`, GNU tar's archive of the symlinkJoin of the
    contents.  What extraCommands and friends add is not known before the store layers are chosen."""
    tar = customisation_tar_size(content_roots)
    return nar_size_of_tree(nar_size_of_dir({b"checksum": nar_size_of_file(65), b"layer.tar": nar_size_of_file(tar)}))


def customisation_tar_size(content_roots: Iterable[str]) -> int:
    """Size of `tar -cf layer.tar .` (GNU format, 20-block records) of the tree symlinkJoin makes: the
    contents' directories merged, each file a link to it, each link copied (the first content wins)."""
    tree: dict[str, str | None] = {}  # relative path → link target, None for a directory
    for root in content_roots:
        if os.path.isdir(root) and not os.path.islink(root):
            _merge_links(root, "", tree)
    total = _tar_entry("./", None)
    for rel, target in sorted(tree.items()):
        total += _tar_entry("./" + rel + ("/" if target is None else ""), target)
    total += 2 * TAR_BLOCK
    return total + (-total % TAR_RECORD)


def _merge_links(top: str, rel: str, tree: dict[str, str | None]) -> None:
    here = os.path.join(top, rel) if rel else top
    for name in sorted(os.listdir(here)):
        sub = f"{rel}/{name}" if rel else name
        full = os.path.join(here, name)
        if os.path.isdir(full) and not os.path.islink(full):
            if tree.setdefault(sub, None) is None:
                _merge_links(top, sub, tree)
        elif os.path.islink(full):
            tree.setdefault(sub, os.readlink(full))
        else:
            tree.setdefault(sub, full)


def _tar_entry(name: str, link: str | None) -> int:
    """A header, plus a GNU long-name (or long-link) entry for a name (or target) over 100 bytes."""
    size = TAR_BLOCK
    for text in (name, link):
        n = len(os.fsencode(text)) if text is not None else 0
        if n > TAR_NAME_FIELD:
            size += TAR_BLOCK + -(-(n + 1) // TAR_BLOCK) * TAR_BLOCK
    return size


@dataclass
class ImageGraph:
    """The store part of an image, as auto-layer sees it."""

    store_dir: str
    name: str  # the image's name (its last '/'-part names dockerTools' helper derivations)
    paths: Mapping[str, tuple[int, Iterable[str]]]  # entry name → (NAR size, entry names it refers to)
    content_roots: list[str]  # entry names of store contents (the customisation layer links them)
    config_roots: list[str]  # entry names of store paths named in config
    base_json: bytes  # base_json_text(...)
    # entry names the scripts' output refers to (nsbuild.plan.closure): references of the customisation layer
    script_roots: list[str] = field(default_factory=list)


def image_store_layers(image: ImageGraph, budget: int) -> list[list[str]]:
    """The store layers (lists of entry names, lowest first) dockerTools would make for `image` with
    `budget` layers left for the store (maxLayers - base layers - 1)."""
    prefix = image.store_dir.rstrip("/") + "/"
    base = image.name.rsplit("/", 1)[-1]
    base_json = f"{prefix}{BASE_JSON_HASH}-{base}-base.json"
    custom = f"{prefix}{CUSTOM_LAYER_HASH}-{base}-customisation-layer"
    graph = {prefix + n: Node(size, frozenset(prefix + r for r in refs)) for n, (size, refs) in image.paths.items()}
    graph[base_json] = Node(
        nar_size_of_tree(nar_size_of_file(len(image.base_json))), frozenset(prefix + r for r in image.config_roots)
    )
    graph[custom] = Node(
        customisation_layer_nar_size(prefix + r for r in image.content_roots),
        frozenset(prefix + r for r in [*image.content_roots, *image.script_roots]),
    )
    layers = split_layers(graph, budget, hidden={base_json, custom})
    return [[p[len(prefix) :] for p in layer] for layer in layers]
