#!/usr/bin/env python3
"""nsbuild against the pipelines and the rootless tools a user would otherwise run, side by side in one run.

    .venv/bin/python bench/run.py [--tree DIR] [--runs 3] [--quick]

Builds one large real tree (by default the installation prefix of the `python3` on PATH, ~60k files,
~1 GB) as one layer, with `nsbuild layered` and with GNU tar pipelines, and prints one table: wall
time (median of --runs), peak RSS, and the ratio nsbuild/tar.  Beside them, run as an unprivileged
account (nsbuild-test when the bench runs as root): nsbuild, buildah (from scratch / copy / commit to
an OCI archive) and umoci (init / new / insert --rootless), with the ratio nsbuild/peer.  Then the cache
rows: a rebuild with nothing changed, a 10-layer image rebuilt after touching one file; a real
node_modules (npm install of a few common packages) with the same tar, nsbuild and peer rows; and
without --quick a tree twice as large (peak memory) and a tree of 300k small files (how time grows with
the file count).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import peers
from timing import NO_TREE, CommandFailed, Table, Tree, median_run, run, spec

NSBUILD = str(Path(sys.executable).parent / "nsbuild")
COMPRESSORS = ("none", "zstd", "gz")
PIPE_NAMES = {"none": "sha256sum", "zstd": "zstd -T0 -3", "gz": "gzip -6"}
NPM_PACKAGES = ("express", "lodash", "react", "react-dom", "typescript", "webpack", "eslint", "jest", "@babel/core")


@dataclass(frozen=True)
class Bench:
    """What every section needs: the scratch directory, the run count, the table, the peer account."""

    work: Path
    runs: int
    table: Table
    peer: peers.Peer | None

    def nsbuild(self, *args: str) -> list[str]:
        return [NSBUILD, "layered", "-q", *args]


def tar_pipeline(b: Bench, tree: Tree, comp: str) -> str:
    tar = f"tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1 -C {tree.path} -cf - ."
    middle = {"none": "", "zstd": " | zstd -q -T0 -3", "gz": " | gzip -6"}[comp]
    return f"{tar}{middle} | sha256sum > {b.work}/h"


def peer_rows(b: Bench, tree: Tree, comps: Sequence[str], tar_walls: dict[str, float], label: str = "") -> None:
    """nsbuild, buildah and umoci as the unprivileged account; ratio = that nsbuild row / the peer."""
    if b.peer is None:
        return
    try:
        shared = peers.share(b.peer, tree, label.strip(" ,").replace(" ", "-") or "tree")
    except subprocess.CalledProcessError as exc:
        b.table.note(f"peer rows{label} skipped: copying the tree for {b.peer.name} failed ({exc})")
        return
    who = b.peer.name
    for comp in comps:
        nw, np_ = peers.time_nsbuild(b.peer, shared, comp, b.runs)
        tw = tar_walls.get(comp)
        b.table.row(f"nsbuild layered as {who} (oci-archive{label})", comp, tree, nw, np_, tw and nw / tw)
        for tool, timer, what, out in (
            ("buildah", peers.time_buildah, "copy + commit", "oci-archive"),
            ("umoci", peers.time_umoci, "insert --rootless", "oci layout"),
        ):
            try:
                got = timer(b.peer, shared, comp, b.runs)
            except (CommandFailed, FileNotFoundError) as exc:
                b.table.note(f"{tool} {comp}{label} failed as {who}: {exc}")
                got = None
            name = f"{tool} {what} ({out}{label})"
            if got is None:
                b.table.row(name, comp, tree, None, None, None)
            else:
                b.table.row(name, comp, tree, got[0], got[1], nw / got[0])


def main_tree(b: Bench, tree: Tree) -> tuple[float, float]:
    """tar pipelines, nsbuild as the caller and the peers per compressor; returns the cold nsbuild
    walls for the uncompressed (docker-archive, oci-archive) outputs, the rebuild rows' baselines."""
    contents = [{"path": str(tree.path), "target": "/opt/tree"}]
    # Untimed: with one run (--quick) the first row would otherwise also pay for reading the tree from
    # disk. (Through cat: GNU tar skips reading file data when it writes to /dev/null.)
    run(f"tar -C {tree.path} -cf - . | cat > /dev/null")
    walls: dict[str, float] = {}
    for comp in COMPRESSORS:
        s = spec(b.work / f"{comp}.json", contents, comp, 2)
        tw, tp = median_run(tar_pipeline(b, tree, comp), b.runs)
        walls[comp] = tw
        b.table.row(f"tar | {PIPE_NAMES[comp]}", comp, tree, tw, tp, None)
        nw, np_ = median_run(b.nsbuild("--no-cache", str(s), "-o", f"oci-archive:{b.work}/o.tar"), b.runs)
        b.table.row("nsbuild layered (oci-archive)", comp, tree, nw, np_, nw / tw)
        dw, dp = median_run(b.nsbuild("--no-cache", str(s), "-o", f"{b.work}/d.tar"), b.runs)
        b.table.row("nsbuild layered (docker-archive)", comp, tree, dw, dp, dw / tw)
        if comp == "none":
            cold_none, cold_oci = dw, nw
        peer_rows(b, tree, [comp], walls)
    return cold_none, cold_oci


def floor_and_cache_rows(b: Bench, tree: Tree, cold_none: float, cold_oci: float) -> None:
    t = b.table
    # What any rebuild costs at least: starting the CLI, and one stat() per entry (in C, by du).
    w, p = median_run([NSBUILD, "--help"], b.runs)
    t.row("floor: nsbuild --help (interpreter + CLI start)", "", NO_TREE, w, p, w / cold_none)
    floor = w
    w, p = median_run(["du", "-s", str(tree.path)], b.runs)
    t.row("floor: du -s (one lstat per entry, in C)", "", tree, w, p, w / cold_none)
    floor += w

    # Rebuilds through the cache.
    s = str(spec(b.work / "none.json", [{"path": str(tree.path), "target": "/opt/tree"}], "none", 2))
    cold_cache, cache = str(b.work / "cold-cache"), str(b.work / "cache")
    w, p = median_run(
        b.nsbuild("--cache-dir", cold_cache, s, "-o", f"{b.work}/c.tar"),
        b.runs,
        before=lambda: shutil.rmtree(cold_cache, True),
    )
    t.row("cold, with the cache (writes cache + output)", "none", tree, w, p, w / cold_none)
    warm = b.nsbuild("--cache-dir", cache, s, "-o", f"{b.work}/d.tar")
    run(warm)
    w, p = median_run(warm, b.runs)
    t.row("rebuild, nothing changed (docker-archive, up to date)", "none", tree, w, p, w / cold_none)
    t.note(f"rebuild, nothing changed (docker-archive, up to date) / floor (--help + du -s): {w / floor:.2f}")
    fresh = b.nsbuild("--cache-dir", cache, s, "-o", f"{b.work}/new.tar")
    w, p = median_run(fresh, b.runs, before=lambda: (b.work / "new.tar").unlink(missing_ok=True))
    t.row("rebuild, nothing changed (docker-archive, new file)", "none", tree, w, p, w / cold_none)
    oci = b.nsbuild("--cache-dir", cache, s, "-o", f"oci:{b.work}/ocidir:t")
    run(oci)
    # Linking the blobs into the new layout moved their ctime: the next build hashes them once more
    # (nsbuild/cache/cache.py), the ones after it read no layer.
    run(oci)
    w, p = median_run(oci, b.runs)
    t.row("rebuild, nothing changed (oci-dir)", "none", tree, w, p, w / cold_oci)


def ten_layer_rows(b: Bench, tree: Tree) -> None:
    """Ten layers from ten copies' subtrees; touch one file, rebuild: one layer is rebuilt."""
    ten = b.work / "ten"
    subdirs = sorted(p for p in tree.path.rglob("*") if p.is_dir() and not p.is_symlink())
    picked = sorted(subdirs, key=lambda p: -sum(1 for _ in p.iterdir()))[:10]
    for i, d in enumerate(picked):
        shutil.copytree(d, ten / f"l{i}", symlinks=True)
    ten_contents = [{"path": str(ten / f"l{i}"), "target": f"/l{i}"} for i in range(10)]
    tree10 = Tree.of(ten)
    s = str(spec(b.work / "ten.json", ten_contents, "none", 12))
    cache = str(b.work / "cache")
    victim = next(p for p in (ten / "l3").rglob("*") if p.is_file() and not p.is_symlink())
    for kind, out in (("docker-archive", f"{b.work}/t.tar"), ("oci-dir", f"oci:{b.work}/tlayout:t")):
        cold, _ = median_run(b.nsbuild("--no-cache", s, "-o", out), b.runs)
        run(b.nsbuild("--cache-dir", cache, s, "-o", out))
        walls, rebuilt = [], []
        for _ in range(b.runs):
            with open(victim, "ab") as f:
                f.write(b"#")
            w, p, err = run([NSBUILD, "layered", "--cache-dir", cache, s, "-o", out])
            walls.append(w)
            # Content layers built again (the customisation layer, the scripts' output, always is).
            rebuilt.append(
                sum(
                    1
                    for ln in err.splitlines()
                    if ln.startswith("nsbuild: [") and "cached" not in ln and "customisation layer" not in ln
                )
            )
        wall = statistics.median(walls)
        b.table.row(
            f"10 layers, 1 file touched ({max(rebuilt)} of 10 rebuilt, {kind})", "none", tree10, wall, p, wall / cold
        )


def npm_tree(b: Bench) -> Tree | None:
    """A real node_modules: `npm install` of a few common packages, or None (with a note) without npm or
    the registry."""
    npm = shutil.which("npm")
    if npm is None:
        b.table.note("node_modules rows skipped: npm is not installed")
        return None
    d = b.work / "npm"
    d.mkdir()
    (d / "package.json").write_text('{"name": "bench", "version": "1.0.0", "private": true}\n')
    env = {**os.environ, "npm_config_cache": str(b.work / "npm-cache"), "npm_config_update_notifier": "false"}
    cmd = [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", *NPM_PACKAGES]
    try:
        proc = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        b.table.note("node_modules rows skipped: npm install did not finish in 10 minutes")
        return None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        b.table.note(f"node_modules rows skipped: npm install failed ({proc.returncode}): {last}")
        return None
    return Tree.of(d / "node_modules")


def npm_rows(b: Bench) -> None:
    tree = npm_tree(b)
    if tree is None:
        return
    b.table.note(f"node_modules: npm install {' '.join(NPM_PACKAGES)} ({tree.files} entries)")
    contents = [{"path": str(tree.path), "target": "/opt/tree"}]
    walls: dict[str, float] = {}
    for comp in COMPRESSORS:
        s = spec(b.work / f"npm-{comp}.json", contents, comp, 2)
        tw, tp = median_run(tar_pipeline(b, tree, comp), b.runs)
        walls[comp] = tw
        b.table.row(f"tar | {PIPE_NAMES[comp]} (node_modules)", comp, tree, tw, tp, None)
        nw, np_ = median_run(b.nsbuild("--no-cache", str(s), "-o", f"oci-archive:{b.work}/o.tar"), b.runs)
        b.table.row("nsbuild layered (oci-archive, node_modules)", comp, tree, nw, np_, nw / tw)
        peer_rows(b, tree, [comp], walls, ", node_modules")


def large_rows(b: Bench, tree: Tree, cold_none: float) -> None:
    """A tree twice as large (peak memory) and 300k small files (time per entry)."""
    s = spec(
        b.work / "double.json",
        [{"path": str(tree.path), "target": "/a"}, {"path": str(tree.path), "target": "/b"}],
        "zstd",
        2,
    )
    w, p, _ = run(b.nsbuild("--no-cache", str(s), "-o", f"oci-archive:{b.work}/o.tar"))
    b.table.row("nsbuild, tree twice as large (oci-archive)", "zstd", tree.scaled(2), w, p, None)
    small, tw, w = small_rows(b)
    print(
        f"per file: nsbuild {w / small.files * 1e6:.1f} µs (300k small) vs {cold_none / tree.files * 1e6:.1f} µs "
        f"(bench tree, {tree.files} files)",
        file=sys.stderr,
    )
    peer_rows(b, small, ("none", "gz"), {"none": tw}, ", 300k small files")


def small_rows(b: Bench) -> tuple[Tree, float, float]:
    """300k small files: GNU tar, nsbuild's pure-Python loop and its compiled one, interleaved run by
    run (so that a busy machine weighs on all three alike), medians."""
    small_dir = b.work / "small"
    for i in range(300):
        d = small_dir / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(1000):
            (d / f"f{j:04d}").write_bytes(b"x" * (j % 200))
    small = Tree.of(small_dir)
    s = spec(b.work / "small.json", [{"path": str(small.path), "target": "/s"}], "none", 2)
    pure = {**os.environ, "NSBUILD_PURE_PYTHON": "1"}
    cmds: dict[str, tuple[list[str] | str, dict[str, str] | None]] = {
        "tar": (f"tar --sort=name -C {small.path} -cf - . | sha256sum > {b.work}/h", None),
        "pure": (b.nsbuild("--no-cache", str(s), "-o", f"{b.work}/p.tar"), pure),
        "compiled": (b.nsbuild("--no-cache", str(s), "-o", f"{b.work}/d.tar"), None),
    }
    got = interleaved(cmds, b.runs)
    tw = got["tar"][0]
    b.table.row("tar | sha256sum (300k small files)", "none", small, *got["tar"], None)
    b.table.row("nsbuild layered, pure Python (300k small files)", "none", small, *got["pure"], got["pure"][0] / tw)
    b.table.row("nsbuild layered (300k small files)", "none", small, *got["compiled"], got["compiled"][0] / tw)
    return small, tw, got["compiled"][0]


def interleaved(
    cmds: dict[str, tuple[list[str] | str, dict[str, str] | None]], runs: int
) -> dict[str, tuple[float, float]]:
    """Median wall and largest peak RSS of each command, the commands run in turn `runs` times."""
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    peaks: dict[str, float] = dict.fromkeys(cmds, 0.0)
    for _ in range(runs):
        for key, (cmd, env) in cmds.items():
            w, p, _ = run(cmd, env)
            walls[key].append(w)
            peaks[key] = max(peaks[key], p)
    return {k: (statistics.median(walls[k]), peaks[k]) for k in cmds}


def zstd_rows(b: Bench, tree: Tree) -> None:
    """Only the zstd layer of the bench tree: `tar | zstd -T0 -3 | sha256sum` against nsbuild, interleaved."""
    s = spec(b.work / "zstd.json", [{"path": str(tree.path), "target": "/opt/tree"}], "zstd", 2)
    run(f"tar -C {tree.path} -cf - . | cat > /dev/null")
    cmds: dict[str, tuple[list[str] | str, dict[str, str] | None]] = {
        "tar": (tar_pipeline(b, tree, "zstd"), None),
        "nsbuild": (b.nsbuild("--no-cache", str(s), "-o", f"oci-archive:{b.work}/o.tar"), None),
    }
    got = interleaved(cmds, b.runs)
    b.table.row(f"tar | {PIPE_NAMES['zstd']}", "zstd", tree, *got["tar"], None)
    b.table.row("nsbuild layered (oci-archive)", "zstd", tree, *got["nsbuild"], got["nsbuild"][0] / got["tar"][0])


def all_rows(b: Bench, tree: Tree, quick: bool) -> None:
    cold_none, cold_oci = main_tree(b, tree)
    floor_and_cache_rows(b, tree, cold_none, cold_oci)
    ten_layer_rows(b, tree)
    npm_rows(b)
    if not quick:
        large_rows(b, tree, cold_none)


def main() -> None:
    ap = argparse.ArgumentParser()
    default_tree = subprocess.run(
        ["python3", "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True
    ).stdout.strip()
    ap.add_argument("--tree", default=default_tree)
    ap.add_argument("--runs", type=int, help="runs per row, the median is shown (default 3, 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="skip the 2x tree and the 300k-file rows")
    ap.add_argument("--no-peers", action="store_true", help="skip the buildah/umoci rows")
    ap.add_argument(
        "--rebuild-only",
        action="store_true",
        help="only the floor and the rebuild rows (their cold baselines measured once, untabled)",
    )
    ap.add_argument(
        "--only",
        choices=("small", "zstd"),
        help="only the 300k-small-file rows (GNU tar, nsbuild pure Python and compiled) or the zstd rows "
        "of the bench tree, each command in turn per run",
    )
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    tree = Tree.of(Path(args.tree))
    table = Table()
    peer = None if args.no_peers else peers.open_peer()
    if isinstance(peer, str):
        table.note(f"peer rows skipped: {peer}")
        peer = None
    elif peer is not None:
        table.note(peers.NOT_AVAILABLE)
    b = Bench(Path(tempfile.mkdtemp(prefix="nsbuild-bench-")), runs, table, peer)
    try:
        if args.rebuild_only:
            floor_and_cache_rows(b, tree, *cold_baselines(b, tree))
            _print(table, tree, runs, None)
            return
        if args.only == "small":
            small_rows(b)
        elif args.only == "zstd":
            zstd_rows(b, tree)
        else:
            all_rows(b, tree, args.quick)
    finally:
        shutil.rmtree(b.work, ignore_errors=True)
        if peer is not None:
            peers.close_peer(peer)
    _print(table, tree, runs, peer)


def _print(table: Table, tree: Tree, runs: int, peer: peers.Peer | None) -> None:
    who = f"; peers as {peer.name}: {', '.join(peers.versions())}" if peer else ""
    table.print(
        f"bench tree: {tree.path} ({tree.files} entries, {tree.size / 2**20:.0f} MiB), {os.cpu_count()} CPUs, "
        f"median of {runs}{who}\nratio = nsbuild / the tar pipeline above it; buildah/umoci rows: the "
        "`nsbuild layered as ...` row above them / the peer; floor, cache and rebuild rows: / cold nsbuild"
    )


def cold_baselines(b: Bench, tree: Tree) -> tuple[float, float]:
    """--rebuild-only: the cold uncompressed docker-archive and oci-archive builds the rebuild rows are
    divided by, one run each."""
    s = str(spec(b.work / "cold.json", [{"path": str(tree.path), "target": "/opt/tree"}], "none", 2))
    run(f"tar -C {tree.path} -cf - . | cat > /dev/null")  # the tree in the page cache, as for main_tree
    cold_none = run(b.nsbuild("--no-cache", s, "-o", f"{b.work}/d.tar"))[0]
    cold_oci = run(b.nsbuild("--no-cache", s, "-o", f"oci-archive:{b.work}/o.tar"))[0]
    return cold_none, cold_oci


if __name__ == "__main__":
    main()
