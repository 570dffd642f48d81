#!/usr/bin/env python3
"""The sha256 of every output of a build matrix: the oracle that a refactoring changed nothing.

    .venv/bin/python bench/output_matrix.py record digests.json   # before a move
    .venv/bin/python bench/output_matrix.py check digests.json    # after it: exit 1 on any difference

nsbuild is bit-reproducible, so the same inputs must give the same bytes whatever the code layout.
The matrix: specs (the bundled example, a store path with includeNixDB, fromImage on each base format,
fakeRootCommands ownership, buildImage with runAsRoot and copyToRoot) x outputs (docker-archive,
oci-dir, oci-archive, stream) x compressors (none, gz, zstd) x accounts (the caller, nsbuild-test when
run as root) x cache (none, a cold cache, the same cache warm). Inputs are made afresh in a temporary
tree each run, from fixed bytes, so digests from different runs and machines compare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.core import EXAMPLE_SPEC, FakeStore, write_spec  # noqa: E402
from tests.support.users import account, is_root, make_user_tmp, remove_tree, run_nsbuild  # noqa: E402

TEST_USER = "test"  # nsbuild-test, with a subordinate id range
STORE_DIR = Path("/var/tmp/nsbuild-output-matrix-store")
INPUT_DIR = Path("/var/tmp/nsbuild-output-matrix-in")
OUTPUTS = {"docker-archive": "out.tar", "oci-dir": "out.oci", "oci-archive": "out-oci.tar", "stream": "out.stream"}
COMPRESSORS = ("none", "gz", "zstd")
CACHES = ("no-cache", "cold", "warm")


def tree_digest(path: Path) -> str:
    """One digest of a file or of a directory's files (relative names, modes' type bits, bytes)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(path)}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _inputs(top: Path) -> dict[str, tuple[str, Path]]:
    """(command, spec) per spec name; bases are built by nsbuild itself, once, as the caller."""
    example = top / "example"
    shutil.copytree(EXAMPLE_SPEC.parent, example, symlinks=True)
    # Store paths are absolute paths in the image: the store must be at the same place in every run.
    store = FakeStore(STORE_DIR)
    lib = store.add("libgreet-1.0", {"lib/libgreet.so": b"\x7fELF greet\n"})
    app = store.add("hello-2.12", {"bin/hello": "#!/bin/sh\necho hello\n"}, refs=[lib])
    specs: dict[str, tuple[str, Path]] = {"example": ("layered", example / "spec.json")}
    specs["store"] = (
        "layered",
        write_spec(
            top,
            {"name": "store", "tag": "1", "contents": [str(app)], "storeDir": str(store.dir), "includeNixDB": True},
            "store.json",
        ),
    )
    specs["fakeroot"] = (
        "layered",
        write_spec(
            top,
            {
                "name": "fr",
                "tag": "1",
                "extraCommands": "mkdir -p srv/data; echo x > srv/f",
                "fakeRootCommands": "chown -R 1003:1004 srv; chmod 4755 srv/f; mknod srv/null c 1 3",
            },
            "fakeroot.json",
        ),
    )
    base = top / "base.tar"
    plain = str(with_compressor(example / "spec.json", "none"))
    _run(["layered", plain, "-o", f"docker-archive:{base}", "--no-cache", "-q"], None)
    _run(["layered", str(example / "spec.json"), "-o", f"oci:{top / 'base.oci'}:latest", "--no-cache", "-q"], None)
    _run(["layered", str(example / "spec.json"), "-o", f"oci-archive:{top / 'base-oci.tar'}", "--no-cache", "-q"], None)
    for kind, ref in (
        ("docker", str(base)),
        ("oci", f"oci:{top / 'base.oci'}:latest"),
        ("ociarchive", f"oci-archive:{top / 'base-oci.tar'}"),
    ):
        specs[f"from-{kind}"] = (
            "layered",
            write_spec(
                top,
                {
                    "name": f"from-{kind}",
                    "tag": "1",
                    "fromImage": ref,
                    "extraCommands": "mkdir -p opt; echo on-top > opt/new",
                },
                f"from-{kind}.json",
            ),
        )
    (top / "rootfs" / "etc").mkdir(parents=True)
    (top / "rootfs" / "etc" / "app.conf").write_text("port=80\n")
    specs["image"] = (
        "image",
        write_spec(
            top,
            {
                "name": "img",
                "tag": "1",
                "fromImage": str(base),
                "copyToRoot": [str(top / "rootfs")],
                "runAsRoot": "mkdir -p /data; chown 1000:1000 /data; echo ok > /data/x",
            },
            "image.json",
        ),
    )
    for p in [top, *top.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
    return specs


def with_compressor(spec: Path, comp: str) -> Path:
    """The spec with `compressor` set, beside it (relative paths in it stay right)."""
    variant = spec.with_name(f"{spec.stem}-{comp}.json")
    if not variant.exists():
        variant.write_text(json.dumps({**json.loads(spec.read_text()), "compressor": comp}, indent=1))
        variant.chmod(0o644)
    return variant


def _run(args: list[str], user: str | None) -> None:
    proc = run_nsbuild(args, user, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"nsbuild {' '.join(args)} (as {user or 'caller'}) failed:\n{proc.stderr}")


def _cases(specs: dict[str, tuple[str, Path]], users: list[str | None]) -> Iterator[tuple[str, list[str], str | None]]:
    for user in users:
        for name, (command, spec) in specs.items():
            for fmt in OUTPUTS:
                if fmt == "stream" and command != "layered":
                    continue
                for comp in COMPRESSORS if fmt != "stream" else ("none",):
                    for cache in CACHES:
                        key = f"{name}/{fmt}/{comp}/{user or 'caller'}/{cache}"
                        yield key, [command, str(with_compressor(spec, comp))], user


def run_matrix(quick: bool, only: list[str]) -> dict[str, str]:
    users: list[str | None] = [None, TEST_USER] if is_root() and not quick else [None]
    owner = TEST_USER if is_root() else None
    # The inputs' paths are written into the SBOM provenance (the spec as given, fromImage included),
    # so they are fixed like the store's, or no recorded digest could be checked in a later run.
    top = INPUT_DIR
    out: dict[str, str] = {}
    for fixed in (STORE_DIR, top):
        if fixed.exists():
            remove_tree(fixed, owner if fixed == top else None)  # a run killed earlier (one run at a time)
    top.mkdir(mode=0o755)
    if owner is not None:
        acc = account(owner)
        os.chown(top, acc.uid, acc.gid)
    try:
        specs = _inputs(top / "in")
        specs = {k: v for k, v in specs.items() if not only or k in only}
        for user in users:
            work = make_user_tmp(user, prefix="nsbuild-matrix-out-")
            try:
                for key, args, who in _cases(specs, [user]):
                    fmt, cache = key.split("/")[1], key.split("/")[-1]
                    out[key] = _one(work, key, args, fmt, cache, who)
                    print(f"{out[key][:16]}  {key}", flush=True)
            finally:
                remove_tree(work, user)
    finally:
        remove_tree(top, owner)
        remove_tree(STORE_DIR, None)
    return out


def _one(work: Path, key: str, args: list[str], fmt: str, cache: str, user: str | None) -> str:
    """Build one case into its own directory and return the digest of what it wrote."""
    dest = work / key.replace("/", "_") / OUTPUTS[fmt]
    dest.parent.mkdir(parents=True)
    if user is not None and is_root():
        acc = account(user)
        os.chown(dest.parent, acc.uid, acc.gid)
    cache_dir = work / f"cache-{key.split('/')[0]}-{fmt}"
    if cache == "cold" and cache_dir.exists():
        remove_tree(cache_dir, user)
    cache_args = ["--no-cache"] if cache == "no-cache" else ["--cache-dir", str(cache_dir)]
    if fmt == "stream":
        proc = run_nsbuild(["stream", args[1], *cache_args, "-q"], user, text=False, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"nsbuild stream {args[1]} failed:\n{proc.stderr!r}")
        return hashlib.sha256(proc.stdout).hexdigest()
    target = {
        "docker-archive": f"docker-archive:{dest}",
        "oci-dir": f"oci:{dest}:1",
        "oci-archive": f"oci-archive:{dest}",
    }
    _run([*args, "-o", target[fmt], *cache_args, "-q"], user)
    return tree_digest(dest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("record", "check"))
    ap.add_argument("file", type=Path)
    ap.add_argument("--quick", action="store_true", help="the caller's account only")
    ap.add_argument("--only", action="append", default=[], help="a spec of the matrix (repeatable)")
    opts = ap.parse_args()
    digests = run_matrix(opts.quick, opts.only)
    if opts.mode == "record":
        if opts.only and opts.file.exists():
            digests = {**json.loads(opts.file.read_text()), **digests}
        opts.file.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(digests)} outputs in {opts.file}")
        return 0
    want: dict[str, Any] = json.loads(opts.file.read_text())
    if opts.only:
        want = {k: v for k, v in want.items() if k.split("/")[0] in opts.only}
    diff = sorted(k for k in want.keys() | digests.keys() if want.get(k) != digests.get(k))
    for k in diff:
        print(f"DIFFERS {k}: recorded {want.get(k, 'absent')}, now {digests.get(k, 'absent')}")
    print(f"{len(digests) - len(diff)} of {len(want)} outputs identical")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
