"""contents → an ordered layer plan within maxLayers (DESIGN.md §3)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.errors import SpecError
from nsbuild.plan.autolayer import ImageGraph, base_json_text, image_store_layers, nar_size
from nsbuild.plan.closure import closure as store_closure
from nsbuild.plan.closure import output_hashes, referenced_paths
from nsbuild.plan.store import Store, StorePath
from nsbuild.spec.spec import ContentEntry, Spec
from nsbuild.tar.tarwriter import Source


@dataclass(frozen=True)
class PlannedLayer:
    sources: list[Source]
    comment: str
    size: int = 0
    tar: ContentEntry | None = None  # a `{"tar": …}` entry: this layer is that tar's members, alone


@dataclass(frozen=True)
class Plan:
    layers: list[PlannedLayer]  # new layers below the customisation layer, in order
    custom_sources: list[Source] = field(default_factory=list)  # folded into the customisation layer
    store_links: list[Path] = field(default_factory=list)  # store contents linked into /
    closure: dict[str, StorePath] = field(default_factory=dict)  # every store path in the image
    store: Store | None = None  # where the closure was found (its scans are kept)


def tree_size(path: Path) -> int:
    total = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    total += st.st_size
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, dirnames, filenames in os.walk(path):
            for n in filenames + dirnames:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


def make_plan(spec: Spec, base_layer_count: int, extra_roots: Sequence[Path] = (), store: Store | None = None) -> Plan:
    """`extra_roots`: store paths the scripts' output refers to (script_references), which are in the image
    as references of its customisation layer; `store` a Store to reuse (its scans are kept)."""
    budget = spec.max_layers - base_layer_count - 1
    if budget < 0:
        raise SpecError(
            "maxLayers",
            f"{spec.max_layers} is too few: the base image already has "
            f"{base_layer_count} layers and the customisation layer needs one "
            f"more (at least {base_layer_count + 1})",
        )
    store = store or Store(spec.store_dir)
    roots: list[Path] = list(extra_roots)
    links: list[Path] = []
    tree_layers = _root_trees(spec, store, roots, links)
    config_roots = store.paths_in_text(json.dumps(spec.config))
    roots.extend(config_roots)
    closure = store_closure(store, roots) if roots else {}
    if not spec.include_store_paths:
        closure = {}

    if any(t.tar is not None for t in tree_layers):
        _check_tar_budget(spec, tree_layers, budget, bool(closure))
    if budget == 0:
        # Nothing may get a layer of its own: everything joins the customisation layer, nothing is lost.
        folded = _store_sources(closure, sorted(closure)) + [s for t in tree_layers for s in t.sources]
        return Plan(layers=[], custom_sources=folded, store_links=links, closure=closure, store=store)
    store_budget = max(budget - len(tree_layers), 1 if closure else 0)
    tree_budget = budget - store_budget
    if closure and tree_budget <= 0 and tree_layers:
        store_budget, tree_budget = budget, 0
    layers: list[PlannedLayer] = []
    for names in _store_groups(spec, closure, links, config_roots, store_budget, list(extra_roots)):
        size = sum(closure[n].size for n in names)
        comment = "store paths: " + ", ".join(n[33:] for n in names[:8]) + (" …" if len(names) > 8 else "")
        layers.append(PlannedLayer(_store_sources(closure, names), comment, size))
    if tree_layers and tree_budget <= 0:
        # No layer left for the trees: they join the last store layer.
        last = layers[-1]
        layers[-1] = PlannedLayer(
            [*last.sources, *(s for t in tree_layers for s in t.sources)],
            last.comment + " + " + ", ".join(t.comment.split(":")[0] for t in tree_layers),
            last.size,
        )
    else:
        layers.extend(_merge_smallest(tree_layers, tree_budget))
    return Plan(layers=layers, store_links=links, closure=closure, store=store)


def _store_groups(
    spec: Spec,
    closure: dict[str, StorePath],
    content_roots: list[Path],
    config_roots: list[Path],
    budget: int,
    script_roots: list[Path],
) -> list[list[str]]:
    """The closure split as nixpkgs' auto-layer splits it (nsbuild.plan.autolayer), sized by NAR size."""
    if not closure or budget <= 0:
        return []
    by_hash = {sp.hash_part: name for name, sp in closure.items()}
    paths = {
        name: (nar_size(sp.path), [by_hash[h] for h in sp.references if h in by_hash]) for name, sp in closure.items()
    }
    image = ImageGraph(
        store_dir=spec.store_dir,
        name=spec.name,
        paths=paths,
        content_roots=[p.name for p in content_roots if p.name in closure],
        config_roots=[p.name for p in config_roots if p.name in closure],
        script_roots=[p.name for p in script_roots if p.name in closure],
        base_json=base_json_text(spec.config, spec.architecture),
    )
    return image_store_layers(image, budget)


def _store_sources(closure: dict[str, StorePath], names: list[str]) -> list[Source]:
    return [Source(closure[n].path, str(closure[n].path)) for n in names]


def _root_trees(spec: Spec, store: Store, roots: list[Path], links: list[Path]) -> list[PlannedLayer]:
    """A layer per contents entry that is not a store path (those go to `roots` and `links`)."""
    layers: list[PlannedLayer] = []
    for entry in spec.contents:
        if entry.tar:
            layers.append(tar_layer(entry))
            continue
        store_entry = store.entry_of(entry.path) if entry.target is None else None
        if store_entry is not None:
            roots.append(store_entry)
            links.append(store_entry)
            continue
        host = Path(os.path.realpath(entry.path))
        target = entry.target or "/"
        if not host.is_dir() and target.endswith("/"):
            target += entry.path.name
        elif not host.is_dir() and target == "/":
            target = "/" + entry.path.name
        comment = f"{entry.field.removesuffix('.path')}: {entry.written} → {target}"
        layers.append(PlannedLayer([Source(host, target)], comment))
    return layers


def tar_layer(entry: ContentEntry) -> PlannedLayer:
    """The layer of a `{"tar": …}` entry: never merged with another (its members are not a host tree)."""
    comment = f"{entry.field.removesuffix('.tar')}: tar {entry.written} → {entry.target or '/'}"
    return PlannedLayer([], comment, entry.path.stat().st_size, tar=entry)


def _check_tar_budget(spec: Spec, trees: list[PlannedLayer], budget: int, store: bool) -> None:
    """A tar entry needs a layer of its own, and with fakeRootCommands it must come before the trees."""
    tree = next((t for t in trees if t.tar is None), None)
    late = next((t.tar for t in trees[trees.index(tree) :] if t.tar is not None), None) if tree else None
    if spec.fake_root_commands.strip() and late is not None:
        # fakeRootCommands' sandbox unpacks the tars below every host tree: the image must agree.
        raise SpecError(
            late.field,
            "with fakeRootCommands, tar entries must come before the directory and file entries of "
            "contents (the script sees the tars below the trees)",
        )
    tars = sum(1 for t in trees if t.tar is not None)
    # each tar, one layer per run of other trees between them (merged across a tar they would land
    # below it), one for the store paths
    runs = sum(1 for i, t in enumerate(trees) if t.tar is None and (i == 0 or trees[i - 1].tar is not None))
    needed = tars + runs + (1 if store else 0)
    if needed > budget:
        raise SpecError(
            "maxLayers",
            f"{spec.max_layers} is too few: {tars} tar entr{'y' if tars == 1 else 'ies'} need a layer each; "
            f"raise maxLayers to at least {spec.max_layers + needed - budget}",
        )


def _merge_smallest(layers: list[PlannedLayer], budget: int) -> list[PlannedLayer]:
    """Merge neighbours, the smallest pair first, until the layers fit the budget.

    Only neighbours: a file given by several contents entries must come from the last of them whatever
    the budget, and merging two layers across a third would put the later entry below that one.  A
    tar's layer is never merged (_check_tar_budget made room for it).
    """
    items = list(layers)
    if len(items) > budget:
        # sizes only matter when something must be merged
        items = [
            la if la.tar else dataclasses.replace(la, size=sum(tree_size(s.host) for s in la.sources)) for la in items
        ]
    while len(items) > max(budget, 1):
        pairs = [k for k in range(len(items) - 1) if items[k].tar is None and items[k + 1].tar is None]
        if not pairs:
            break
        i = min(pairs, key=lambda k: (items[k].size + items[k + 1].size, k))
        a, b = items[i], items[i + 1]
        items[i : i + 2] = [PlannedLayer(a.sources + b.sources, f"{a.comment} + {b.comment}", a.size + b.size)]
    return items


def script_references(spec: Spec, plan: Plan, output: Path, before: set[str]) -> list[Path]:
    """Store paths the scripts' output (the customisation layer's tree, or its tar) refers to that are
    not in the image yet (nor in the layer before the scripts ran, `before`: layer_hashes then): Nix
    finds them among the customisation layer's references, so dockerTools puts them and their closure
    in the store layers. Nothing when includeStorePaths is false."""
    if not spec.include_store_paths:
        return []
    return referenced_paths(plan.store or Store(spec.store_dir), output, plan.closure, before)


def layer_hashes(spec: Spec, plan: Plan, tree: Path) -> set[str]:
    """What the customisation layer refers to before the scripts run (see script_references): its tree,
    and with fakeRootCommands the root trees it may copy up or has folded in (a link of theirs into the
    store is theirs, never followed: a chown by the script does not make it a reference)."""
    if not spec.include_store_paths:
        return set()
    store = plan.store or Store(spec.store_dir)
    found = output_hashes(store, tree, plan.closure)
    if spec.fake_root_commands.strip():
        in_store = {sp.path for sp in plan.closure.values()}
        for src in plan.custom_sources + [s for layer in plan.layers for s in layer.sources]:
            if src.host not in in_store:
                found |= store.hashes_in(src.host)
    return found
