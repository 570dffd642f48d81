"""Store layers chosen as nixpkgs' auto-layer chooses them (nsbuild.plan.autolayer, DESIGN.md §3).

The expected partitions below are derived by hand from the rule, step by step, in the comments:
seeds are taken largest NAR size first (ties: the later full path first); when seed S is taken, each
path below S drops the seeds above S from its owner set and gains S unless a seed below S already owns
it; the first seed that makes more distinct owner sets than the budget is undone and the search ends.
Layers come out by the size of their closure; hidden nodes (dockerTools' base JSON and customisation
layer) count while choosing and are left out of the output.

Names are "<hash>-<name>" with one-character hashes: the hash decides the order in which equal sizes
are taken, the name the order inside a layer.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from support.core import FakeStore, build, read_image, write_spec

from nsbuild.plan.autolayer import (
    Node,
    customisation_tar_size,
    nar_size,
    split_layers,
)


def g(**nodes: tuple[int, list[str]]) -> dict[str, Node]:
    """g(a=(size, [refs])) with names written a_1 for "1-a" (hash 1, name a)."""
    return {_n(k): Node(size, frozenset(_n(r) for r in refs)) for k, (size, refs) in nodes.items()}


def _n(key: str) -> str:
    name, _, h = key.partition("_")
    return f"{h}-{name}"


def short(layers: list[list[str]]) -> list[list[str]]:
    return [[p.split("-", 1)[1] for p in layer] for layer in layers]


# --- a chain: a(100) → b(10) → c(1) ----------------------------------------------------------------------
# seed a: b, c owned by {a}                → sets {a}                        1 set
# seed b: c drops a (a is above b), gains b → {a}: a; {b}: b, c              2 sets
# seed c:                                   → {a}, {b}, {c}                  3 sets
# closure sizes: {c} 1, {b} 11, {a} 111.
CHAIN = g(a_1=(100, ["b_2"]), b_2=(10, ["c_3"]), c_3=(1, []))


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1, [["a", "b", "c"]]),  # seed b would make 2 sets: undone, everything stays with a
        (2, [["b", "c"], ["a"]]),
        (3, [["c"], ["b"], ["a"]]),
        (10, [["c"], ["b"], ["a"]]),  # a budget beyond the number of paths changes nothing
    ],
)
def test_chain(limit: int, expected: list[list[str]]) -> None:
    assert short(split_layers(CHAIN, limit)) == expected


# --- a large path depending on another large path --------------------------------------------------------
# app(1000) → lib(900) → libc(10); tool(50) → libc; top(1) → app, tool.
# seed app:  lib, libc → {app}; tool, top stay in {}                         2 sets
# seed lib:  libc drops app (above lib), gains lib → {app}: app; {lib}: lib, libc; {}: tool, top   3 sets
# seed tool: libc keeps lib, gains tool → {lib, tool}: libc (a shared layer); {tool}: tool  5 sets
# seed libc: {libc}: libc — the shared set is gone                           5 sets
# seed top:  every path below top is already owned by a seed below top      5 sets
# closure sizes: libc 10, tool 60, lib 910, app 1910, {} or top 1961.
# So libc goes with lib, the lower seed (never to a layer shared with app), and a budget of 4 leaves a
# layer unused: seed tool needs 5 sets at once.
BIG_ON_BIG = g(
    app_1=(1000, ["lib_2"]),
    lib_2=(900, ["libc_3"]),
    libc_3=(10, []),
    tool_4=(50, ["libc_3"]),
    top_5=(1, ["app_1", "tool_4"]),
)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1, [["app", "lib", "libc", "tool", "top"]]),
        (2, [["app", "lib", "libc"], ["tool", "top"]]),  # closures 1910 < 1961
        (3, [["lib", "libc"], ["app"], ["tool", "top"]]),
        (4, [["lib", "libc"], ["app"], ["tool", "top"]]),  # seed tool needs 5: undone
        (5, [["libc"], ["tool"], ["lib"], ["app"], ["top"]]),
        (6, [["libc"], ["tool"], ["lib"], ["app"], ["top"]]),
    ],
)
def test_large_path_on_large_path(limit: int, expected: list[list[str]]) -> None:
    assert short(split_layers(BIG_ON_BIG, limit)) == expected


# --- a diamond: top(1) → l(50), r(40); l, r → base(30) --------------------------------------------------
# seed l:    base → {l}                                  {l}: l, base; {}: r, top        2 sets
# seed r:    base keeps l, gains r → {l, r}              {l}, {r}, {l, r}: base, {}: top  4 sets
# seed base: {base}: base                                {l}, {r}, {base}, {}            4 sets
# seed top:  {top}                                       4 sets
# closure sizes: base 30, r 70, l 80, top 121.
DIAMOND = g(top_1=(1, ["l_2", "r_3"]), l_2=(50, ["base_4"]), r_3=(40, ["base_4"]), base_4=(30, []))


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1, [["base", "l", "r", "top"]]),
        (2, [["base", "l"], ["r", "top"]]),  # closures 80 < 121
        (3, [["base", "l"], ["r", "top"]]),  # seed r needs 4 sets: undone
        (4, [["base"], ["r"], ["l"], ["top"]]),
        (7, [["base"], ["r"], ["l"], ["top"]]),
    ],
)
def test_diamond(limit: int, expected: list[list[str]]) -> None:
    assert short(split_layers(DIAMOND, limit)) == expected


# --- wide fan-out: root(1) → x1(50), x2(40), x3(30), x4(20), x5(10) -------------------------------------
# Each leaf seeded adds one set; the rest stay in {} with root until root itself is a seed.
# seed xk (k ≤ 5): k + 1 sets; seed root: the {} set becomes {root}, still 6.
FAN = g(
    root_0=(1, ["x1_1", "x2_2", "x3_3", "x4_4", "x5_5"]),
    x1_1=(50, []),
    x2_2=(40, []),
    x3_3=(30, []),
    x4_4=(20, []),
    x5_5=(10, []),
)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1, [["root", "x1", "x2", "x3", "x4", "x5"]]),
        (3, [["x2"], ["x1"], ["root", "x3", "x4", "x5"]]),  # closures 40, 50, 151
        (5, [["x4"], ["x3"], ["x2"], ["x1"], ["root", "x5"]]),  # seed x5 needs 6
        (6, [["x5"], ["x4"], ["x3"], ["x2"], ["x1"], ["root"]]),
        (20, [["x5"], ["x4"], ["x3"], ["x2"], ["x1"], ["root"]]),
    ],
)
def test_fan_out(limit: int, expected: list[list[str]]) -> None:
    assert short(split_layers(FAN, limit)) == expected


# --- ties --------------------------------------------------------------------------------------------------
# Three unrelated paths of size 10: "3-a", "2-b", "1-c".  Nix hands the graph over sorted by path, and
# the later of equal sizes is taken first: 3-a, then 2-b.  Inside a layer the name orders (b before c).
TIES = g(a_3=(10, []), b_2=(10, []), c_1=(10, []))


def test_equal_sizes_take_the_later_path_first() -> None:
    # limit 2: seed 3-a (2 sets), seed 2-b would make 3: undone.  Closures 10 < 20.
    assert split_layers(TIES, 2) == [["3-a"], ["2-b", "1-c"]]


def test_equal_closure_sizes_are_ordered_by_name() -> None:
    # limit 3: three layers of closure size 10 each.  nixpkgs leaves their order to Python's hash seed;
    # nsbuild orders them by their paths' names (a, b, c) so that the image is reproducible.
    assert split_layers(TIES, 3) == [["3-a"], ["2-b"], ["1-c"]]


def test_self_references_and_unknown_references_are_ignored() -> None:
    graph = {"1-a": Node(5, frozenset({"1-a", "2-b", "9-gone"})), "2-b": Node(3, frozenset({"2-b"}))}
    assert split_layers(graph, 2) == [["2-b"], ["1-a"]]
    assert split_layers({}, 3) == [] and split_layers(graph, 0) == []


# --- hidden nodes: dockerTools' base JSON and customisation layer ----------------------------------------
# custom(hidden) → app(100) → lib(50); json(hidden, 2) refers to nothing.
# Small customisation layer (5): seeds app, lib, custom, json.
#   seed app:  {app}: app, lib; {}: custom, json                    2 sets
#   seed lib:  {app}, {lib}, {}                                     3 sets
#   seed custom: app, lib already own themselves → {custom}: custom; {}: json   4 sets
#   seed json: {json} replaces {}                                   4 sets
# A set holding hidden nodes only still counts, but is not a layer of the image: with a budget of 2 the
# image gets one store layer.
def test_hidden_nodes_count_but_are_not_layers() -> None:
    graph = g(custom_c=(5, ["app_1"]), app_1=(100, ["lib_2"]), lib_2=(50, []), json_j=(2, []))
    hidden = {"c-custom", "j-json"}
    assert short(split_layers(graph, 2, hidden)) == [["app", "lib"]]
    assert short(split_layers(graph, 3, hidden)) == [["lib"], ["app"]]
    assert short(split_layers(graph, 4, hidden)) == [["lib"], ["app"]]


# Large customisation layer (1000, as in a store of tiny paths): it is the first seed.
#   seed custom: app, lib → {custom}; {}: json                      2 sets
#   seed app:    lib drops custom (above app), gains app → {custom}: custom; {app}: app, lib; {}: json  3
#   seed lib:    4 sets
def test_a_large_customisation_layer_is_seeded_first() -> None:
    graph = g(custom_c=(1000, ["app_1"]), app_1=(100, ["lib_2"]), lib_2=(50, []), json_j=(2, []))
    hidden = {"c-custom", "j-json"}
    assert short(split_layers(graph, 1, hidden)) == [["app", "lib"]]
    assert short(split_layers(graph, 2, hidden)) == [["app", "lib"]]
    assert short(split_layers(graph, 3, hidden)) == [["app", "lib"]]
    assert short(split_layers(graph, 4, hidden)) == [["lib"], ["app"]]


# --- sizes -------------------------------------------------------------------------------------------------


def test_nar_size_is_what_nix_store_dump_writes(tmp_path: Path) -> None:
    nix_store = "/usr/bin/nix-store"
    if not os.access(nix_store, os.X_OK):
        pytest.skip("needs Debian's nix-bin (nix-store --dump)")
    top = tmp_path / "tree"
    (top / "bin").mkdir(parents=True)
    (top / "bin" / "run").write_bytes(b"#!/bin/sh\necho hi\n")
    (top / "bin" / "run").chmod(0o755)
    (top / "share" / "empty").mkdir(parents=True)
    (top / "share" / "doc").write_bytes(b"x" * 4097)
    (top / "lib").symlink_to("share/doc")
    (top / "nul").write_bytes(b"")
    single = tmp_path / "single"
    single.write_bytes(b"abc")
    for p in (top, single, top / "lib"):
        dumped = subprocess.run([nix_store, "--dump", str(p)], capture_output=True, check=True).stdout
        assert nar_size(p) == len(dumped), p


def test_customisation_tar_size_matches_gnu_tar(tmp_path: Path) -> None:
    """The estimate of dockerTools' customisation layer: GNU tar of the symlinkJoin of the contents."""
    store = FakeStore(tmp_path / "s")
    a = store.add("a", {"bin/a": "a", "share/long-" + "n" * 120: "x"})
    b = store.add("b", {"bin/b": "b"}, refs=[a])
    join = tmp_path / "join"
    join.mkdir()
    for root in (a, b):  # what lndir does: directories merged, files linked, links copied
        for dirpath, _dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            (join / rel).mkdir(exist_ok=True)
            for f in filenames:
                link = join / rel / f
                if not link.exists():
                    link.symlink_to(os.path.join(dirpath, f))
    out = tmp_path / "layer.tar"
    subprocess.run(["tar", "-C", str(join), "--sort=name", "--format=gnu", "-cf", str(out), "."], check=True)
    assert customisation_tar_size([str(a), str(b)]) == out.stat().st_size


# --- the image: budgets with and without fromImage --------------------------------------------------------
# A diamond of real store paths, all far larger than the two hidden nodes (the customisation layer is
# about 11 kB here, the base JSON about 200 bytes): l(400 kB), r(300 kB) → base(200 kB), top(100 kB) → l, r;
# contents = [top].  Seeds l, r, base, top, customisation layer, base JSON.
#   seed l: {l}: l, base; {}: r, top, hidden               2 sets
#   seed r: {l}, {r}, {l, r}: base, {}                     4 sets
#   seed base: {l}, {r}, {base}, {}                        4 sets
#   seed top: {l}, {r}, {base}, {top}, {}: hidden only     5 sets
#   seed customisation layer: + {custom}                   6 sets
# Store budget (maxLayers - base layers - 1) → store layers, lowest first:
#   1 → [all]; 2, 3 → [base, l], [r, top]; 4 and more → [base], [r], [l], [top].
DIAMOND_LAYERS = {
    1: [["base", "l", "r", "top"]],
    2: [["base", "l"], ["r", "top"]],
    3: [["base", "l"], ["r", "top"]],
    4: [["base"], ["r"], ["l"], ["top"]],
    5: [["base"], ["r"], ["l"], ["top"]],
    9: [["base"], ["r"], ["l"], ["top"]],
}


def _diamond_store(root: Path) -> tuple[FakeStore, Path]:
    store = FakeStore(root)
    base = store.add("base", {"lib/base": b"b" * 200_000})
    left = store.add("l", {"lib/l": b"l" * 400_000}, refs=[base])
    right = store.add("r", {"lib/r": b"r" * 300_000}, refs=[base])
    top = store.add("top", {"bin/top": b"t" * 100_000}, refs=[left, right])
    return store, top


def _store_layers(view, store: FakeStore) -> list[list[str]]:  # type: ignore[no-untyped-def]
    """Per layer, the names (after the hash) of the store entries it holds."""
    return _store_layers_in(view, str(store.dir))


def _store_layers_in(view, store_dir: str) -> list[list[str]]:  # type: ignore[no-untyped-def]
    rel = store_dir.lstrip("/") + "/"
    out = []
    for members in view.layers:
        entries = {m.name[len(rel) :].split("/", 1)[0] for m in members if m.name.startswith(rel)}
        out.append(sorted(e.split("-", 1)[1] for e in entries if e))
    return out


@pytest.mark.parametrize("budget", [1, 2, 3, 4, 9])
def test_image_layers_follow_auto_layer(unprivileged_user: str | None, user_tmp, budget: int) -> None:  # type: ignore[no-untyped-def]
    work = user_tmp(unprivileged_user)
    store, top = _diamond_store(work / "store")
    spec = write_spec(
        work,
        {"name": "diamond", "tag": "t", "storeDir": str(store.dir), "contents": [str(top)], "maxLayers": budget + 1},
    )
    build(spec, work / "img.tar", user=unprivileged_user)
    view = read_image(work / "img.tar", work / "view")
    expected = DIAMOND_LAYERS[budget]
    assert _store_layers(view, store) == [*expected, []], "store layers, then the customisation layer"


@pytest.mark.parametrize("budget", [2, 4])
def test_image_layers_with_from_image(unprivileged_user: str | None, user_tmp, budget: int) -> None:  # type: ignore[no-untyped-def]
    """fromImage's layers come out of maxLayers first (and the customisation layer's one)."""
    work = user_tmp(unprivileged_user)
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("base\n")
    base_spec = write_spec(work, {"name": "base", "tag": "b", "contents": [str(tree)]}, "base.json")
    build(base_spec, work / "base.tar", user=unprivileged_user)
    base_layers = len(read_image(work / "base.tar", work / "bview").layers)
    assert base_layers == 2  # the tree + its customisation layer
    store, top = _diamond_store(work / "store")
    spec = write_spec(
        work,
        {
            "name": "diamond",
            "tag": "t",
            "storeDir": str(store.dir),
            "contents": [str(top)],
            "fromImage": str(work / "base.tar"),
            "maxLayers": base_layers + 1 + budget,
        },
    )
    build(spec, work / "img.tar", user=unprivileged_user)
    view = read_image(work / "img.tar", work / "view")
    assert _store_layers(view, store) == [[], [], *DIAMOND_LAYERS[budget], []]


# --- the two hidden nodes in an image: paths named only in config ------------------------------------------
# contents = [app(5 kB) → lib(4 kB)]; config names cfg(3 kB), which nothing in contents refers to.  The
# customisation layer (about 10.5 kB: a 10240-byte tar of links, in a directory with its checksum) refers
# to app only; the base JSON (a few hundred bytes) to cfg.  Seeds: customisation layer, app, lib, cfg, JSON.
#   seed custom: app, lib → {custom}; {}: cfg, json                        2 sets
#   seed app:    lib drops custom (above app), gains app → {custom}, {app}: app, lib, {}: cfg, json    3
#   seed lib:    {lib}                                                     4 sets
#   seed cfg:    {cfg}; {}: json alone                                     5 sets
# Budget 2: {custom} holds app, lib; {}: cfg — cfg is apart because only the base JSON reaches it, and
# comes first (closure 3 kB + JSON < custom + app + lib).
CONFIG_ONLY_LAYERS = {
    1: [["app", "cfg", "lib"]],
    2: [["cfg"], ["app", "lib"]],
    3: [["cfg"], ["app", "lib"]],  # {custom} holds the customisation layer alone: not a store layer
    4: [["cfg"], ["lib"], ["app"]],
    5: [["cfg"], ["lib"], ["app"]],
}


@pytest.mark.parametrize("budget", sorted(CONFIG_ONLY_LAYERS))
def test_paths_named_only_in_config(tmp_path: Path, budget: int) -> None:
    store = FakeStore(tmp_path / "store")
    lib = store.add("lib", {"lib/lib.so": b"l" * 4000})
    app = store.add("app", {"bin/app": b"a" * 5000}, refs=[lib])
    cfg = store.add("cfg", {"etc/cfg": b"c" * 3000})
    spec = write_spec(
        tmp_path,
        {
            "name": "cfg",
            "tag": "t",
            "storeDir": str(store.dir),
            "contents": [str(app)],
            "config": {"Env": [f"CFG={cfg}/etc/cfg"]},
            "maxLayers": budget + 1,
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert _store_layers(view, store) == [*CONFIG_ONLY_LAYERS[budget], []]


# --- against real Nix ----------------------------------------------------------------------------------------
# Debian's nix-bin builds, offline and without a sandbox, a small closure and the two helper derivations
# as dockerTools makes them (a writeText of the base JSON; a directory of layer.tar, GNU tar of the
# contents' links, and its checksum), and hands their reference graph over through exportReferencesGraph.
# Nix's narSize values must be the sizes nsbuild gives the graph's nodes, and the image's store layers
# must be the partition derived from that graph:
#   liba 400808, libb 300856 → liba, app 200904 → libb liba, custom 10784 → app small (hidden),
#   cfgtool 5808 (named in config only), small 3856 → liba, json 248 → cfgtool (hidden).
#   seed liba: 2 sets; libb: 3; app: 4; custom: small → {custom}, 5; cfgtool: 6; small: 7; json: 7.
NIX_EXPR = r"""
let
  sys = builtins.currentSystem;
  mk = name: kb: refs: builtins.derivation {
    name = "nsbuild-al-${name}"; system = sys; builder = "/bin/sh";
    args = [ "-c" ''
      /bin/mkdir -p $out/share/${name}
      echo ${toString refs} > $out/share/${name}/refs
      /usr/bin/head -c ${toString (kb * 1000)} /dev/zero > $out/share/${name}/blob
    '' ];
  };
  liba = mk "liba" 400 [];
  libb = mk "libb" 300 [ liba ];
  app = mk "app" 200 [ liba libb ];
  small = mk "small" 3 [ liba ];
  cfgtool = mk "cfgtool" 5 [];
  config = { Cmd = [ "${cfgtool}/share/cfgtool/blob" ]; };
  baseJson = builtins.derivation {
    name = "al-base.json"; system = sys; builder = "/bin/bash";
    text = builtins.toJSON { inherit config; architecture = "amd64"; os = "linux"; };
    args = [ "-c" "printf '%s' \"$text\" > $out" ];
  };
  custom = builtins.derivation {
    name = "al-customisation-layer"; system = sys; builder = "/bin/bash"; paths = [ app small ];
    args = [ "-c" ''
      set -e
      /bin/mkdir old_out
      for p in $paths; do /bin/cp -rsn $p/. old_out/; done
      /bin/mkdir $out
      cd old_out
      /bin/tar --sort name --numeric-owner --mtime @1 --hard-dereference -cf $out/layer.tar .
      /usr/bin/sha256sum $out/layer.tar | /usr/bin/cut -f 1 -d ' ' > $out/checksum
    '' ];
  };
  graph = builtins.derivation {
    name = "nsbuild-al-graph"; system = sys; builder = "/bin/bash"; __structuredAttrs = true;
    exportReferencesGraph.graph = [ baseJson custom ];
    args = [ "-c" ''. "$NIX_ATTRS_SH_FILE"; /bin/cat "$NIX_ATTRS_JSON_FILE" > "''${outputs[out]}"'' ];
  };
in { inherit graph app small cfgtool config; }
"""
REAL_NIX_LAYERS = {
    2: [["liba"], ["app", "cfgtool", "libb", "small"]],
    4: [["liba"], ["libb"], ["app"], ["cfgtool", "small"]],
    5: [["cfgtool"], ["liba"], ["libb"], ["app"], ["small"]],
    7: [["cfgtool"], ["liba"], ["small"], ["libb"], ["app"]],
}


@pytest.fixture(scope="module")
def real_nix_graph(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not os.access("/usr/bin/nix-build", os.X_OK) or os.geteuid() != 0:
        pytest.skip("needs Debian's nix-bin and root (nix-build writes /nix/store)")
    expr = tmp_path_factory.mktemp("nix") / "al.nix"
    expr.write_text(NIX_EXPR)
    options = ["--option", "substituters", "", "--option", "sandbox", "false", "--option", "build-users-group", ""]
    attrs = ["graph", "app", "small", "cfgtool"]
    proc = subprocess.run(
        ["nix-build", str(expr), "--no-out-link", *options, *(a for name in attrs for a in ("-A", name))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(zip(attrs, proc.stdout.split(), strict=True))


def test_sizes_are_nix_narsizes(real_nix_graph: dict[str, str]) -> None:
    from nsbuild.plan.autolayer import base_json_text, customisation_layer_nar_size, nar_size_of_file, nar_size_of_tree

    graph = json.loads(Path(real_nix_graph["graph"]).read_text())["graph"]
    sizes = {x["path"].split("-", 1)[1]: x["narSize"] for x in graph}
    config = {"Cmd": [real_nix_graph["cfgtool"] + "/share/cfgtool/blob"]}
    assert sizes["al-base.json"] == nar_size_of_tree(nar_size_of_file(len(base_json_text(config, "amd64"))))
    assert sizes["al-customisation-layer"] == customisation_layer_nar_size(
        [real_nix_graph["app"], real_nix_graph["small"]]
    )
    for x in graph:
        assert nar_size(x["path"]) == x["narSize"], x["path"]


@pytest.mark.parametrize("budget", sorted(REAL_NIX_LAYERS))
def test_image_layers_on_a_real_nix_store(
    real_nix_graph: dict[str, str], unprivileged_user: str | None, user_tmp, budget: int
) -> None:  # type: ignore[no-untyped-def]
    work = user_tmp(unprivileged_user)
    spec = write_spec(
        work,
        {
            "name": "al",
            "tag": "t",
            "storeDir": "/nix/store",
            "contents": [real_nix_graph["app"], real_nix_graph["small"]],
            "config": {"Cmd": [real_nix_graph["cfgtool"] + "/share/cfgtool/blob"]},
            "maxLayers": budget + 1,
        },
    )
    build(spec, work / "img.tar", user=unprivileged_user)
    view = read_image(work / "img.tar", work / "view")
    layers = [sorted(n.removeprefix("nsbuild-al-") for n in layer) for layer in _store_layers_in(view, "/nix/store")]
    assert layers == [*REAL_NIX_LAYERS[budget], []]
