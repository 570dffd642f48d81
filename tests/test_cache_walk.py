"""The layer cache's tree walk in C (nsbuild/cache/_treestat.c) against the Python loop it replaces
(issue 17): the same records byte for byte, so the same fingerprints, on a tree of awkward names and
every file type; the same error for a directory it cannot read (as the unprivileged test account)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
from support.users import UserTmpFactory, chown_tree, describe, is_root, run_as

from nsbuild.cache import cache
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.tarwriter import Source


def test_the_extension_is_built() -> None:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler here: nsbuild runs the Python walk")
    assert cache._treestat is not None, "nsbuild/cache/_treestat.c did not build (make venv)"


def _tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "a/b/c").mkdir(parents=True)
    (tree / "empty").mkdir()
    (tree / "a/b/f\nnewline").write_bytes(b"x")
    (tree / "é").write_text("accent")
    (tree / os.fsdecode(b"\xfe\xff")).write_bytes(b"\xff")
    for name in (".hidden", "Z", "_", "a.b", "a-b", "A"):
        (tree / name).write_text(name)
    (tree / "dangling").symlink_to("/nonexistent")
    (tree / "dirlink").symlink_to("a")
    os.link(tree / "Z", tree / "a/hardlink")
    os.mkfifo(tree / "fifo")
    (tree / "a/b/c/deep").write_text("deep")
    return tree


def test_the_same_records_and_fingerprints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if cache._treestat is None:
        pytest.skip("the extension is not built")
    tree = _tree(tmp_path)
    for top in (tree, tree / "a", Path(sys.base_prefix) / "lib"):
        py = hashlib.sha256()
        cache._hash_tree_py(os.fsencode(top), py)
        for threads in (1, 2, 4):  # directories read at once: the records still in the Python order
            c = hashlib.sha256()
            cache._treestat.walk(os.fsencode(top), c.update, threads)
            assert c.hexdigest() == py.hexdigest(), (top, threads)
    sources = [Source(tree, "/t"), Source(tree / "Z", "/z"), Source(tmp_path / "missing", "/m")]
    owner = OwnerPolicy.fixed_owner(Owner(0, 0, "root", "root"))
    compiled = cache.fingerprint(sources, mtime=1, owner=owner)
    monkeypatch.setenv("NSBUILD_PURE_PYTHON", "1")
    assert cache.fingerprint(sources, mtime=1, owner=owner) == compiled


CHECK = """
import hashlib, os, sys
from nsbuild.cache import cache
top = os.fsencode(sys.argv[1])
for walk in (cache._hash_tree_py, lambda t, h: cache._treestat.walk(t, h.update, 2)):
    try:
        walk(top, hashlib.sha256())
    except OSError as exc:
        print(type(exc).__name__, exc.errno, os.fsdecode(exc.filename))
"""


def test_an_unreadable_directory_is_the_same_error(user_tmp: UserTmpFactory) -> None:
    if cache._treestat is None:
        pytest.skip("the extension is not built")
    user = "test" if is_root() else None
    work = user_tmp(user)
    (work / "tree/locked").mkdir(parents=True)
    (work / "tree/locked/f").write_text("x")
    chown_tree(user, work)
    (work / "tree/locked").chmod(0)
    try:
        python = str(Path(os.path.dirname(sys.executable)) / "python")
        proc = run_as([python, "-c", CHECK, str(work / "tree")], user)
        assert proc.returncode == 0, describe(proc)
        lines = proc.stdout.splitlines()
        assert len(lines) == 2 and lines[0] == lines[1], proc.stdout
        assert lines[0].startswith("PermissionError 13 ") and lines[0].endswith("/tree/locked")
    finally:
        (work / "tree/locked").chmod(0o755)
