"""contents → an ordered layer plan within maxLayers (DESIGN.md §3)."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.errors import SpecError
from nsbuild.spec import Spec
from nsbuild.store import Store, StorePath, group_layers
from nsbuild.tarwriter import Source


@dataclass
class PlannedLayer:
    sources: list[Source]
    comment: str
    size: int = 0


@dataclass
class Plan:
    layers: list[PlannedLayer]  # new layers below the customisation layer, in order
    custom_sources: list[Source] = field(default_factory=list)  # folded into the customisation layer
    store_links: list[Path] = field(default_factory=list)  # store contents linked into /
    closure: dict[str, StorePath] = field(default_factory=dict)  # every store path in the image


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


def make_plan(spec: Spec, base_layer_count: int) -> Plan:
    budget = spec.max_layers - base_layer_count - 1
    if budget < 0:
        raise SpecError(
            "maxLayers",
            f"{spec.max_layers} is too few: the base image already has "
            f"{base_layer_count} layers and the customisation layer needs one "
            f"more (at least {base_layer_count + 1})",
        )
    store = Store(spec.store_dir)
    roots: list[Path] = []
    trees: list[tuple[Source, str, str]] = []
    links: list[Path] = []
    for entry in spec.contents:
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
        trees.append((Source(host, target), entry.field.removesuffix(".path"), entry.written))
    roots.extend(store.paths_in_text(json.dumps(spec.config)))
    closure = store.closure(roots) if roots else {}
    if not spec.include_store_paths:
        closure = {}

    tree_layers = [PlannedLayer([src], f"{fld}: {written} → {src.target}") for src, fld, written in trees]
    plan = Plan(layers=[], store_links=links, closure=closure)
    if budget == 0:
        # Nothing may get a layer of its own: everything joins the customisation layer, nothing is lost.
        plan.custom_sources = _store_sources(closure, sorted(closure)) + [s for t in tree_layers for s in t.sources]
        return plan
    store_budget = max(budget - len(tree_layers), 1 if closure else 0)
    tree_budget = budget - store_budget
    if closure and tree_budget <= 0 and tree_layers:
        store_budget, tree_budget = budget, 0
    store_groups = group_layers(closure, store_budget)
    for names in store_groups:
        size = sum(closure[n].size for n in names)
        comment = "store paths: " + ", ".join(n[33:] for n in names[:8]) + (" …" if len(names) > 8 else "")
        plan.layers.append(PlannedLayer(_store_sources(closure, names), comment, size))
    if tree_layers and tree_budget <= 0:
        plan.layers[-1].sources.extend(s for t in tree_layers for s in t.sources)
        plan.layers[-1].comment += " + " + ", ".join(t.comment.split(":")[0] for t in tree_layers)
    else:
        plan.layers.extend(_merge_smallest(tree_layers, tree_budget))
    return plan


def _store_sources(closure: dict[str, StorePath], names: list[str]) -> list[Source]:
    return [Source(closure[n].path, str(closure[n].path)) for n in names]


def _merge_smallest(layers: list[PlannedLayer], budget: int) -> list[PlannedLayer]:
    """Merge neighbours, the smallest pair first, until the layers fit the budget.

    Only neighbours: a file given by several contents entries must come from the last of them whatever
    the budget, and merging two layers across a third would put the later entry below that one.
    """
    items = list(layers)
    if len(items) > budget:
        for layer in layers:  # sizes only matter when something must be merged
            layer.size = sum(tree_size(s.host) for s in layer.sources)
    while len(items) > max(budget, 1):
        i = min(range(len(items) - 1), key=lambda k: (items[k].size + items[k + 1].size, k))
        a, b = items[i], items[i + 1]
        items[i : i + 2] = [PlannedLayer(a.sources + b.sources, f"{a.comment} + {b.comment}", a.size + b.size)]
    return items
