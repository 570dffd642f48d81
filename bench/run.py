#!/usr/bin/env python3
"""nsbuild against the pipelines a user would otherwise write, measured side by side in one run.

    .venv/bin/python bench/run.py [--tree DIR] [--runs 3] [--quick]

Builds one large real tree (by default the installation prefix of the `python3` on PATH, ~60k files,
~1 GB) as one layer, with `nsbuild layered` and with GNU tar pipelines, and prints one table: wall
time (median of --runs), peak RSS, and the ratio nsbuild/tar.  Then the cache rows: a rebuild with
nothing changed, a 10-layer image rebuilt after touching one file, a tree twice as large (peak
memory), and a tree of 300k small files (how time grows with the file count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NSBUILD = str(Path(sys.executable).parent / "nsbuild")


def run(cmd: list[str] | str, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS MiB (largest process of the tree), stderr."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        shell=isinstance(cmd, str),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        executable="/bin/bash" if isinstance(cmd, str) else None,
    )
    err = proc.stderr.read().decode() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {cmd}\n{err}")
    return wall, usage.ru_maxrss / 1024, err


def median_run(cmd: list[str] | str, runs: int, before: object = None) -> tuple[float, float]:
    walls, peaks = [], []
    for _ in range(runs):
        if callable(before):
            before()
        wall, peak, _ = run(cmd)
        walls.append(wall)
        peaks.append(peak)
    return statistics.median(walls), max(peaks)


def spec(path: Path, contents: list, compressor: str, max_layers: int = 100) -> Path:
    path.write_text(
        json.dumps(
            {"name": "bench", "tag": "t", "contents": contents, "compressor": compressor, "maxLayers": max_layers}
        )
    )
    return path


def count_files(tree: Path) -> tuple[int, int]:
    n = size = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        n += len(filenames) + len(dirnames)
        for f in filenames:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, f)).st_size
    return n, size


def main() -> None:
    ap = argparse.ArgumentParser()
    default_tree = subprocess.run(
        ["python3", "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True
    ).stdout.strip()
    ap.add_argument("--tree", default=default_tree)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the 2x tree and the 300k-file rows")
    args = ap.parse_args()
    tree = Path(args.tree)
    files, size = count_files(tree)
    work = Path(tempfile.mkdtemp(prefix="nsbuild-bench-"))
    cache = work / "cache"
    rows: list[tuple[str, ...]] = []

    def row(tool: str, comp: str, n: int, nbytes: int, wall: float, peak: float, ratio: float | None) -> None:
        r = (
            tool,
            comp,
            str(n) if n else "",
            f"{nbytes / 2**20:.0f} MiB" if nbytes else "",
            f"{wall:.2f}",
            f"{peak:.0f}",
            "" if ratio is None else f"{ratio:.2f}",
        )
        rows.append(r)
        print("  ".join(r), file=sys.stderr, flush=True)

    try:
        contents = [{"path": str(tree), "target": "/opt/tree"}]
        tar = f"tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@1 -C {tree} -cf - ."
        pipelines = {
            "none": f"{tar} | sha256sum > {work}/h",
            "zstd": f"{tar} | zstd -q -T0 -3 | sha256sum > {work}/h",
            "gz": f"{tar} | gzip -6 | sha256sum > {work}/h",
        }
        for comp in ("none", "zstd", "gz"):
            s = spec(work / f"{comp}.json", contents, comp, 2)
            tw, tp = median_run(pipelines[comp], args.runs)
            row(
                f"tar | {'sha256sum' if comp == 'none' else ('zstd -T0 -3' if comp == 'zstd' else 'gzip -6')}",
                comp,
                files,
                size,
                tw,
                tp,
                None,
            )
            nw, np_ = median_run(
                [NSBUILD, "layered", "-q", "--no-cache", str(s), "-o", f"oci-archive:{work}/o.tar"], args.runs
            )
            row("nsbuild layered (oci-archive)", comp, files, size, nw, np_, nw / tw)
            dw, dp = median_run([NSBUILD, "layered", "-q", "--no-cache", str(s), "-o", f"{work}/d.tar"], args.runs)
            row("nsbuild layered (docker-archive)", comp, files, size, dw, dp, dw / tw)
            if comp == "none":
                cold_none = dw
                cold_oci = nw

        # What any rebuild costs at least: starting the CLI, and one stat() per entry (in C, by du).
        w, p = median_run([NSBUILD, "--help"], args.runs)
        row("floor: nsbuild --help (interpreter + CLI start)", "", 0, 0, w, p, w / cold_none)
        w, p = median_run(["du", "-s", str(tree)], args.runs)
        row("floor: du -s (one lstat per entry, in C)", "", files, size, w, p, w / cold_none)

        # Rebuilds through the cache.
        s = spec(work / "none.json", contents, "none", 2)
        w, p = median_run(
            [NSBUILD, "layered", "-q", "--cache-dir", str(work / "cold-cache"), str(s), "-o", f"{work}/c.tar"],
            args.runs,
            before=lambda: shutil.rmtree(work / "cold-cache", True),
        )
        row("cold, with the cache (writes cache + output)", "none", files, size, w, p, w / cold_none)
        run([NSBUILD, "layered", "-q", "--cache-dir", str(cache), str(s), "-o", f"{work}/d.tar"])
        warm = [NSBUILD, "layered", "-q", "--cache-dir", str(cache), str(s), "-o", f"{work}/d.tar"]
        w, p = median_run(warm, args.runs)
        row("rebuild, nothing changed (docker-archive, up to date)", "none", files, size, w, p, w / cold_none)
        fresh = [NSBUILD, "layered", "-q", "--cache-dir", str(cache), str(s), "-o", f"{work}/new.tar"]
        w, p = median_run(fresh, args.runs, before=lambda: (work / "new.tar").unlink(missing_ok=True))
        row("rebuild, nothing changed (docker-archive, new file)", "none", files, size, w, p, w / cold_none)
        run([NSBUILD, "layered", "-q", "--cache-dir", str(cache), str(s), "-o", f"oci:{work}/ocidir:t"])
        w, p = median_run(
            [NSBUILD, "layered", "-q", "--cache-dir", str(cache), str(s), "-o", f"oci:{work}/ocidir:t"], args.runs
        )
        row("rebuild, nothing changed (oci-dir)", "none", files, size, w, p, w / cold_oci)

        # Ten layers from ten copies' subtrees; touch one file, rebuild: one layer is rebuilt.
        ten = work / "ten"
        subdirs = sorted(p for p in tree.rglob("*") if p.is_dir() and not p.is_symlink())
        picked = sorted(subdirs, key=lambda p: -sum(1 for _ in p.iterdir()))[:10]
        for i, d in enumerate(picked):
            shutil.copytree(d, ten / f"l{i}", symlinks=True)
        ten_contents = [{"path": str(ten / f"l{i}"), "target": f"/l{i}"} for i in range(10)]
        n10, s10 = count_files(ten)
        s = spec(work / "ten.json", ten_contents, "none", 12)
        victim = next(p for p in (ten / "l3").rglob("*") if p.is_file() and not p.is_symlink())

        def touch() -> None:
            with open(victim, "ab") as f:
                f.write(b"#")

        for kind, out in (("docker-archive", f"{work}/t.tar"), ("oci-dir", f"oci:{work}/tlayout:t")):
            cold, _ = median_run([NSBUILD, "layered", "-q", "--no-cache", str(s), "-o", out], args.runs)
            run([NSBUILD, "layered", "-q", "--cache-dir", str(cache), str(s), "-o", out])
            walls = []
            rebuilt = []
            for _ in range(args.runs):
                touch()
                w, p, err = run([NSBUILD, "layered", "--cache-dir", str(cache), str(s), "-o", out])
                walls.append(w)
                lines = err.splitlines()
                # Content layers built again (the customisation layer, the scripts' output, always is).
                rebuilt.append(
                    sum(
                        1
                        for ln in lines
                        if ln.startswith("nsbuild: [") and "cached" not in ln and "customisation layer" not in ln
                    )
                )
            row(
                f"10 layers, 1 file touched ({max(rebuilt)} of 10 rebuilt, {kind})",
                "none",
                n10,
                s10,
                statistics.median(walls),
                p,
                statistics.median(walls) / cold,
            )

        if not args.quick:
            s = spec(
                work / "double.json",
                [{"path": str(tree), "target": "/a"}, {"path": str(tree), "target": "/b"}],
                "zstd",
                2,
            )
            w, p, _ = run([NSBUILD, "layered", "-q", "--no-cache", str(s), "-o", f"oci-archive:{work}/o.tar"])
            row("nsbuild, tree twice as large (oci-archive)", "zstd", 2 * files, 2 * size, w, p, None)
            small = work / "small"
            for i in range(300):
                d = small / f"d{i:03d}"
                d.mkdir(parents=True)
                for j in range(1000):
                    (d / f"f{j:04d}").write_bytes(b"x" * (j % 200))
            ns, ss = count_files(small)
            tw, tp, _ = run(f"tar --sort=name -C {small} -cf - . | sha256sum > {work}/h")
            row("tar | sha256sum (300k small files)", "none", ns, ss, tw, tp, None)
            s = spec(work / "small.json", [{"path": str(small), "target": "/s"}], "none", 2)
            w, p, _ = run([NSBUILD, "layered", "-q", "--no-cache", str(s), "-o", f"{work}/d.tar"])
            row("nsbuild layered (300k small files)", "none", ns, ss, w, p, w / tw)
            print(
                f"per file: nsbuild {w / ns * 1e6:.1f} µs (300k small) vs {cold_none / files * 1e6:.1f} µs "
                f"(bench tree, {files} files)",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = ("tool", "compressor", "files", "bytes", "wall s", "peak MiB", "ratio")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(
        f"\nbench tree: {tree} ({files} entries, {size / 2**20:.0f} MiB), {os.cpu_count()} CPUs, "
        f"median of {args.runs}; ratio = nsbuild / the tar pipeline above it (rebuild rows: / cold nsbuild)\n"
    )
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        # A pipeline's "|" would end a Markdown cell.
        print("| " + " | ".join(c.replace("|", "\\|").ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
