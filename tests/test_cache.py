"""Layer cache: what invalidates what, corruption, and identical bytes with and without the cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from support.core import write_spec
from support.users import describe, is_root, run_nsbuild

LAYER_LINE = re.compile(r"^nsbuild: \[(\d+)/(\d+)\] (.*): .* \((cached|[0-9.]+s)\)$")


def make_trees(base: Path) -> list[Path]:
    trees = []
    for name in ("alpha", "beta", "gamma"):
        t = base / name
        (t / "sub").mkdir(parents=True)
        (t / "sub" / "file.txt").write_text(f"{name} data\n")
        (t / "other").write_bytes(os.urandom(2048))
        trees.append(t)
    return trees


def layer_states(stderr: str) -> dict[str, bool]:
    """comment → True when served from the cache."""
    states = {}
    for line in stderr.splitlines():
        m = LAYER_LINE.match(line)
        if m:
            states[m.group(3)] = m.group(4) == "cached"
    return states


def rebuilt(stderr: str) -> list[str]:
    """Content layers built from scratch (the customisation layer is always rebuilt)."""
    return sorted(
        k.split(":")[0] for k, cached in layer_states(stderr).items() if not cached and k != "customisation layer"
    )


class Builder:
    def __init__(self, tmp: Path, user: str | None = None) -> None:
        self.tmp = tmp
        self.user = user
        self.cache = tmp / "cache"
        self.trees = make_trees(tmp / "in")
        self.spec = {
            "name": "cachetest",
            "tag": "t",
            "compressor": "none",
            "contents": [{"path": str(t), "target": f"/{t.name}"} for t in self.trees],
        }
        self.n = 0

    def build(self, *extra: str, spec: dict | None = None, fmt: str = "docker-archive") -> tuple[str, bytes]:
        self.n += 1
        path = write_spec(self.tmp, spec or self.spec, f"spec{self.n}.json")
        out = self.tmp / f"out{self.n}.tar"
        target = f"oci-archive:{out}" if fmt == "oci-archive" else str(out)
        proc = run_nsbuild(["layered", str(path), "-o", target, "--cache-dir", str(self.cache), *extra], self.user)
        assert proc.returncode == 0, describe(proc)
        return proc.stderr, out.read_bytes()


@pytest.fixture
def builder(tmp_path: Path) -> Builder:
    b = Builder(tmp_path)
    b.build()
    return b


def test_nothing_changed_serves_every_layer_from_cache(builder: Builder) -> None:
    err, _ = builder.build()
    assert rebuilt(err) == []
    assert sum(layer_states(err).values()) == 3


@pytest.mark.parametrize("change", ["content", "mode", "mtime", "rename", "delete", "add", "xattr"])
def test_a_change_rebuilds_exactly_its_layer(builder: Builder, change: str) -> None:
    f = builder.trees[1] / "sub" / "file.txt"
    if change == "content":
        f.write_text("beta changed\n")
    elif change == "mode":
        f.chmod(0o600)
    elif change == "mtime":
        os.utime(f, (1, 1))
    elif change == "rename":
        f.rename(f.with_name("renamed.txt"))
    elif change == "delete":
        f.unlink()
    elif change == "add":
        (builder.trees[1] / "new").write_text("x")
    elif change == "xattr":
        os.setxattr(f, "user.test", b"1")
    err, _ = builder.build()
    assert rebuilt(err) == ["contents[1]"], err


@pytest.mark.skipif(not is_root(), reason="changing a file's owner needs root")
def test_owner_change_rebuilds_its_layer(builder: Builder) -> None:
    os.chown(builder.trees[2] / "other", 4242, 4242)
    err, _ = builder.build()
    assert rebuilt(err) == ["contents[2]"]


@pytest.mark.parametrize(
    "field,value,expect",
    [
        ("mtime", "2001-02-03T04:05:06Z", ["contents[0]", "contents[1]", "contents[2]"]),
        ("uid", 1000, ["contents[0]", "contents[1]", "contents[2]"]),
        ("uname", "someone", ["contents[0]", "contents[1]", "contents[2]"]),
        ("tag", "other", []),
        ("config", {"Cmd": ["/bin/true"]}, []),
    ],
)
def test_a_spec_field_invalidates_what_it_decides(
    builder: Builder, field: str, value: object, expect: list[str]
) -> None:
    err, _ = builder.build(spec={**builder.spec, field: value})
    assert rebuilt(err) == expect, err


def test_cached_and_uncached_builds_are_identical(builder: Builder) -> None:
    _, warm = builder.build()
    _, cold = builder.build("--no-cache")
    _, serial = builder.build("--no-cache", "-j", "1")
    assert warm == cold == serial
    _, oci_cold = builder.build("--no-cache", fmt="oci-archive")
    _, oci_warm1 = builder.build(fmt="oci-archive")
    _, oci_warm2 = builder.build(fmt="oci-archive")
    assert oci_cold == oci_warm1 == oci_warm2


def test_corrupted_cache_blob_is_rebuilt_not_served(builder: Builder) -> None:
    _, good = builder.build()
    blobs = sorted((builder.cache / "blobs" / "sha256").iterdir(), key=lambda p: -p.stat().st_size)
    victim = blobs[0]
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF  # inside the first file's data: same size, wrong bytes
    victim.write_bytes(bytes(data))
    err, again = builder.build()
    assert again == good
    assert len(rebuilt(err)) == 1, err
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.name


def test_missing_cache_blob_is_rebuilt(builder: Builder) -> None:
    _, good = builder.build()
    for blob in (builder.cache / "blobs" / "sha256").iterdir():
        blob.unlink()
    err, again = builder.build()
    assert again == good
    assert rebuilt(err) == ["contents[0]", "contents[1]", "contents[2]"]


def test_cache_du_and_prune(builder: Builder) -> None:
    du = run_nsbuild(["cache", "du", "--cache-dir", str(builder.cache)])
    assert du.returncode == 0 and "3 layer entries" in du.stdout, describe(du)
    pr = run_nsbuild(["cache", "prune", "--all", "--cache-dir", str(builder.cache)])
    assert pr.returncode == 0 and "removed 3 layer entries" in pr.stdout, describe(pr)
    assert list((builder.cache / "blobs" / "sha256").iterdir()) == []
    err, _ = builder.build()
    assert len(rebuilt(err)) == 3


def test_default_cache_dir_is_per_user(unprivileged_user: str | None, user_tmp) -> None:
    tmp = user_tmp(unprivileged_user)
    tree = tmp / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    spec = write_spec(tmp, {"name": "c", "tag": "t", "compressor": "none", "contents": [str(tree)]})
    cache = tmp / "xdg"
    env = {"XDG_CACHE_HOME": str(cache)}
    for expect_cached in (False, True):
        proc = run_nsbuild(["layered", str(spec), "-o", str(tmp / "o.tar")], unprivileged_user, env=env)
        assert proc.returncode == 0, describe(proc)
        states = layer_states(proc.stderr)
        assert states[f"contents[0]: {tree} → /"] is expect_cached, proc.stderr
    entries = list((cache / "nsbuild" / "layers").glob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["diff_id"].startswith("sha256:")


def test_unwritable_cache_dir_is_one_line_error(unprivileged_user: str | None, user_tmp) -> None:
    """A cache directory that exists but the caller cannot write (another account's, a read-only
    mount) fails before any layer with one line, not a traceback from the layer writer."""
    tmp = user_tmp(unprivileged_user)
    tree = tmp / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    spec = write_spec(tmp, {"name": "c", "tag": "t", "compressor": "none", "contents": [str(tree)]})
    cache = user_tmp(None) / "cache"  # root's when we are root, else our own made read-only
    dirs = [cache / "blobs" / "sha256", cache / "blobs", cache / "layers", cache]
    dirs[0].mkdir(parents=True)
    dirs[2].mkdir()
    for d in dirs:
        d.chmod(0o555)
    try:
        proc = run_nsbuild(
            ["layered", str(spec), "-o", str(tmp / "o.tar"), "--cache-dir", str(cache)], unprivileged_user
        )
        assert proc.returncode == 1, describe(proc)
        assert (
            proc.stderr.strip() == f"nsbuild: error: cache directory {cache}: not writable "
            "(use --cache-dir or --no-cache)"
        ), describe(proc)
        assert not (tmp / "o.tar").exists()
        du = run_nsbuild(["cache", "du", "--cache-dir", str(cache)], unprivileged_user)
        assert du.returncode == 0 and "0 layer entries" in du.stdout, describe(du)
    finally:
        for d in dirs:
            d.chmod(0o755)
