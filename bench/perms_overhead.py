"""What `perms` rules cost the layer writer per entry: write_tar over one big tree into a hashing
null writer, without rules and with several rule sets, best of N runs each, in CPU time
(process_time: the machine may be shared); and the rules alone, over the listed entries.

    python bench/perms_overhead.py [TREE] [--runs N]

Without TREE, a synthetic tree of 60 000 small files in 600 directories is made once under /var/tmp.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path
from typing import Any

from nsbuild.core.perms import parse_perms
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.perms import compiled
from nsbuild.tar.tarwriter import Entry, Source, iter_entries, write_tar

RULE_SETS: dict[str, list[dict[str, Any]]] = {
    "no rules": [],
    "3 path rules, none matching": [
        {"path": "/opt/a", "uid": 1},
        {"path": "/srv/b", "mode": "0600"},
        {"path": "/home/c", "gid": 2},
    ],
    "1 path rule matching all (/)": [{"path": "/", "uid": 1000, "gid": 1000, "uname": "app", "gname": "app"}],
    "3 path rules, each a third": [
        {"path": "/d000", "uid": 1},
        {"path": "/d200", "mode": "0600"},
        {"path": "/d400", "dirMode": "0750"},
    ],
    "1 regex matching every .txt": [{"regex": r".*\.txt", "mode": "0640"}],
    "5 regex rules, none matching": [{"regex": f"/nothing{i}/.*", "uid": i} for i in range(5)],
    "5 path + 5 regex, mixed": [
        *({"path": f"/d{i:03d}", "uid": i} for i in range(0, 500, 100)),
        *({"regex": f"/d{i:03d}/f0.*", "mode": "0600"} for i in range(5)),
    ],
}


class NullHash:
    """Hashes what it is given (the writer's real consumer hashes too), keeps nothing."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.h.update(data)
        return len(data)


def synthetic_tree(root: Path, dirs: int = 600, files: int = 100) -> Path:
    done = root / ".done"
    if done.exists():
        return root
    for d in range(dirs):
        sub = root / f"d{d:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            (sub / f"f{f:03d}.{'txt' if f % 2 else 'bin'}").write_bytes(b"x" * (f % 7))
    done.write_text("")
    return root


def best(tree: Path, rules: list[dict[str, Any]], runs: int) -> tuple[float, int]:
    policy = OwnerPolicy.fixed_owner(Owner(0, 0, "root", "root"), compiled(parse_perms("perms", rules)))
    times = []
    entries = 0
    for _ in range(runs):
        t0 = time.process_time()
        entries = write_tar([Source(tree, "/")], NullHash(), mtime=1, owner=policy).entries
        times.append(time.process_time() - t0)
    return min(times), entries


def rule_cost(entries: list[Entry], rules: list[dict[str, Any]], runs: int) -> float:
    """Seconds per entry of what the writer's loop does for the owner: resolve, or owner_of with rules
    (the rules alone, no I/O: the writer figures above carry the machine's noise)."""
    policy = OwnerPolicy.fixed_owner(Owner(0, 0, "root", "root"), compiled(parse_perms("perms", rules)))
    ruled = policy.perms is not None
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        for e in entries:
            policy.owner_of(e) if ruled else policy.resolve(e.uid, e.gid)
        times.append(time.process_time() - t0)
    return min(times) / len(entries)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tree", nargs="?", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    tree = args.tree or synthetic_tree(Path(os.environ.get("TMPDIR", "/var/tmp")) / "nsbuild-perms-bench")
    listed = list(iter_entries([Source(tree, "/")]))
    base, entries = best(tree, [], args.runs)
    own = rule_cost(listed, [], args.runs * 4)
    print(f"{tree}: {entries} entries; no rules: write_tar {base:.3f}s ({base / entries * 1e6:.2f} µs/entry), ")
    print(f"  owner lookup alone {own * 1e6:.3f} µs/entry")
    print(f"  {'rules':<32} {'write_tar':>9} {'per entry':>10} {'rules alone, per entry':>24}")
    for label, rules in RULE_SETS.items():
        if not rules:
            continue
        seconds, _ = best(tree, rules, args.runs)
        extra = (seconds - base) / entries * 1e6
        alone = (rule_cost(listed, rules, args.runs * 4) - own) * 1e6
        print(f"  {label:<32} {seconds:8.3f}s {extra:+8.2f}µs {alone:+20.3f} µs")


if __name__ == "__main__":
    main()
