"""The compiled tar loop (nsbuild/tar/_fasttar.c via nsbuild.tar.fasttree) against the pure-Python one.

Every case writes the same real tree both ways and compares the write() calls, not only the bytes: a
gzip layer's blocks follow those calls, so the compressed layers match too (checked through
build_layer for gz and zstd, and through the CLI as the unprivileged accounts).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from support import is_root
from support.users import run_as, run_nsbuild

from nsbuild.errors import BuildError
from nsbuild.layer.layer import LayerRequest, build_layer
from nsbuild.tar import fasttree, tarwriter
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.tarwriter import Source

MTIME = 981173106
FIXED = OwnerPolicy.fixed_owner(Owner(0, 0, "root", "root"))
SIZES = (0, 1, 511, 512, 513, 4096, 64 * 1024, 64 * 1024 + 1, (1 << 20) + 3, 3 << 20)


class Chunks:
    """Records every write() call."""

    def __init__(self, on_write=None) -> None:  # type: ignore[no-untyped-def]
        self.chunks: list[bytes] = []
        self.on_write = on_write

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.chunks.append(bytes(data))
        if self.on_write is not None:
            self.on_write(len(self.chunks))
        return len(data)


def both(sources: list[Source], owner: OwnerPolicy = FIXED, mtime: int = MTIME) -> list[bytes]:
    """The write() calls of the compiled and the pure path; asserted equal, returned."""
    assert fasttree.compiled(), "the C extension did not build (make venv builds it)"
    fast, pure = Chunks(), Chunks()
    n_fast = fasttree.write_tar(sources, fast, mtime=mtime, owner=owner).entries
    n_pure = tarwriter.write_tar(sources, pure, mtime=mtime, owner=owner).entries
    assert b"".join(fast.chunks) == b"".join(pure.chunks)
    assert [len(c) for c in fast.chunks] == [len(c) for c in pure.chunks]
    assert n_fast == n_pure
    return fast.chunks


def can_xattr(path: Path) -> bool:
    try:
        os.setxattr(path, "user.nsbuild-probe", b"1")
        os.removexattr(path, "user.nsbuild-probe")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    return True


def awkward_tree(root: Path) -> Path:
    """Sizes around every boundary, links, long and odd names, odd modes, xattrs, a fifo."""
    root.mkdir()
    for i, size in enumerate(SIZES):
        (root / f"f{i:02d}").write_bytes(bytes([65 + i]) * size)
    for name in ("zeta", "Alpha", "beta", "_u", "10", "9", "é-utf8"):
        (root / name).write_text(name)
    os.mkdir(os.fsencode(root) + b"/caf\xe9-\xff")
    (Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9-\xff")) / "in").write_text("x")
    (root / "empty").mkdir()
    (root / "modes").mkdir()
    for mode in (0o4755, 0o2711, 0o1777, 0o7777, 0o600, 0o444):
        p = root / "modes" / f"m{mode:o}"
        p.write_text("m")
        p.chmod(mode)
    (root / "modes" / "none").touch()
    (root / "modes" / "none").chmod(0)  # empty: never opened, so even unreadable it is stored
    (root / "modes" / "dir555").mkdir()
    (root / "modes" / "dir555" / "k").write_text("k")
    (root / "modes" / "dir555").chmod(0o555)
    long_dir = root / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / ("n" * 99)).write_text("prefix split")  # > 100 bytes: ustar prefix
    (root / ("l" * 150)).write_text("no slash to cut at: PAX path")
    deep = root.joinpath(*["g" * 60] * 5)  # > 255 bytes
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("deep")
    (root / "hl-a").write_text("hard")
    os.link(root / "hl-a", root / "hl-b")
    os.link(root / "hl-a", root / "modes" / "hl-c")
    (root / "ln-short").symlink_to("f01")
    (root / "ln-abs-out").symlink_to("/etc/passwd")  # out of the tree: stored as a link, never followed
    (root / "ln-dir-out").symlink_to("/etc")
    (root / "ln-long").symlink_to("t" * 150)
    (root / "ln-utf8").symlink_to("zielé")
    (root / "ln-dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    if can_xattr(root / "f01"):
        os.setxattr(root / "f01", "user.note", b"small")
        os.setxattr(root / f"f{len(SIZES) - 1:02d}", "user.big", b"v" * 300)
        os.setxattr(root / "empty", "user.d", b"dir")
        os.setxattr(root / "f00", "user.e", b"")
    return root


def small_tree(root: Path, dirs: int = 12, files: int = 300) -> Path:
    """Enough small files to cross the 1 MiB batches several times."""
    for i in range(dirs):
        d = root / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(files):
            (d / f"f{j:04d}").write_bytes(b"x" * ((i * 7 + j * 131) % 9000))
    return root


def test_awkward_tree_same_calls(tmp_path: Path) -> None:
    tree = awkward_tree(tmp_path / "t")
    try:
        both([Source(tree, "/opt/t")])
        both([Source(tree, "/")])
    finally:
        (tree / "modes" / "dir555").chmod(0o755)


def test_many_small_files_same_calls(tmp_path: Path) -> None:
    chunks = both([Source(small_tree(tmp_path / "s"), "/s")])
    assert len(chunks) > 10  # batched in ~1 MiB writes, as the pure path batches them


def test_several_sources_and_top_level_files(tmp_path: Path) -> None:
    a = small_tree(tmp_path / "a", 2, 50)
    b = awkward_tree(tmp_path / "b")
    (tmp_path / "single").write_bytes(b"s" * 70000)
    (tmp_path / "tiny").write_bytes(b"t")
    os.link(tmp_path / "tiny", a / "d000" / "linked")  # a hardlink across sources
    sources = [
        Source(a, "/opt/a"),
        Source(b, "/nix/store/abc-b"),
        Source(tmp_path / "single", "/etc/single"),
        Source(tmp_path / "tiny", "/etc/tiny"),
        Source(tmp_path / "missing", "/gone"),
    ]
    try:
        both(sources)
        # Not plain (two sources at one target, one below another): the pure path, same bytes anyway.
        both([Source(a, "/x"), Source(b, "/x")])
        both([Source(a, "/x"), Source(tmp_path / "tiny", "/x/d000/tiny")])
    finally:
        (b / "modes" / "dir555").chmod(0o755)


@pytest.mark.skipif(not is_root(), reason="needs root to give files other owners")
def test_mapped_owners(tmp_path: Path) -> None:
    """Owners from lstat through a mapped policy; one without a template (PAX uid) takes the slow path."""
    tree = small_tree(tmp_path / "s", 3, 20)
    for i, p in enumerate(sorted(tree.rglob("*"))):
        os.lchown(p, [0, 1000, 3000000, 65534][i % 4], [0, 100, 5678][i % 3])
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/:/bin/sh\napp:x:1000:100::/:/bin/sh\n" + "u" * 40 + ":x:65534:0::/:/bin/sh\n")
    owner = OwnerPolicy.mapped(Owner(0, 0, "root", "root"), passwd, None)
    both([Source(tree, "/s")], owner=owner)


def test_unknown_xattrs_and_owner_names(tmp_path: Path) -> None:
    long_name = OwnerPolicy.fixed_owner(Owner(7, 8, "n" * 40, "grp"))  # uname needs PAX: no template
    both([Source(awkward_tree(tmp_path / "t"), "/t")], owner=long_name)
    (tmp_path / "t" / "modes" / "dir555").chmod(0o755)


def test_mtime_out_of_range_refused_the_same(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "s", 1, 2)
    with pytest.raises(BuildError, match="outside the range"):
        fasttree.write_tar([Source(tree, "/s")], Chunks(), mtime=-1, owner=FIXED)


def errors_of(sources: list[Source], on_write=None, reset=None) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    got = []
    for write in (fasttree.write_tar, tarwriter.write_tar):
        if reset is not None:
            reset()
        with pytest.raises((BuildError, OSError)) as exc:
            write(sources, Chunks(on_write), mtime=MTIME, owner=FIXED)
        got.append(f"{type(exc.value).__name__}: {exc.value}")
    assert got[0] == got[1]
    return got[0], got[1]


def test_socket_refused_the_same(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "s", 1, 3)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "d000" / "sock"))
        msg, _ = errors_of([Source(tree, "/s")])
    assert "sockets and other special files" in msg and "/d000/sock" in msg


def test_file_shrinking_during_the_build(tmp_path: Path) -> None:
    """A large file truncated after its header went out (the pending batch is written before its
    data): the same error both ways."""
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_bytes(b"a" * 100)
    big = tree / "b"

    def shrink_big(n: int) -> None:
        if n == 1:
            big.write_bytes(b"b" * 10)

    msg, _ = errors_of([Source(tree, "/t")], shrink_big, lambda: big.write_bytes(b"b" * (3 << 20)))
    assert msg.endswith("/t/b: file shrank while it was being archived")


def test_file_growing_during_the_build(tmp_path: Path) -> None:
    """Bytes appended after the lstat are not read: the entry keeps the size its header says.  (The
    file grows in a later directory: the compiled path lstats a directory's entries together, when it
    lists the directory, the pure one each just before it is written.)"""
    tree = small_tree(tmp_path / "s", 2, 400)
    victim = tree / "d001" / "f0399"
    calls = []
    for write in (fasttree.write_tar, tarwriter.write_tar):
        victim.write_bytes(b"g" * 100)

        def grow(n: int) -> None:
            if n == 1:
                with open(victim, "ab") as f:
                    f.write(b"more" * 1000)

        out = Chunks(grow)
        write([Source(tree, "/s")], out, mtime=MTIME, owner=FIXED)
        calls.append(out.chunks)
    assert calls[0] == calls[1]


@pytest.mark.skipif(is_root(), reason="root reads any file; the unprivileged case runs through the CLI below")
def test_unreadable_file_same_error(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "s", 1, 3)
    (tree / "d000" / "f0001").chmod(0)
    msg, _ = errors_of([Source(tree, "/s")])
    assert "f0001: cannot read: Permission denied" in msg


@pytest.mark.parametrize("compression", ["gz", "zstd", "none"])
def test_compressed_layers_identical(tmp_path: Path, compression: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = small_tree(tmp_path / "s", 4, 200)
    (tree / "big").write_bytes(os.urandom(3 << 20))
    layers = []
    for pure in ("0", "1"):
        monkeypatch.setenv("NSBUILD_PURE_PYTHON", pure)
        assert fasttree.compiled() == (pure == "0")
        req = LayerRequest([Source(tree, "/s")], MTIME, FIXED, compression, keep_tar=True, comment="c")
        layers.append(build_layer(req, tmp_path / f"blobs{pure}"))
    assert layers[0].diff_id == layers[1].diff_id
    assert layers[0].digest == layers[1].digest


def test_cli_as_unprivileged_account(unprivileged_user: str | None, user_tmp) -> None:  # type: ignore[no-untyped-def]
    """nsbuild as the test accounts: the compiled and the pure path write the same archive, and an
    unreadable file is the same error."""
    work = user_tmp(unprivileged_user)
    script = (
        "import os, sys\n"
        "root = sys.argv[1]\n"
        "for i in range(3):\n"
        "    os.makedirs(f'{root}/tree/d{i}')\n"
        "    for j in range(400):\n"
        "        open(f'{root}/tree/d{i}/f{j}', 'wb').write(b'y' * (j * 37 % 5000))\n"
        "os.symlink('/etc/passwd', f'{root}/tree/out')\n"
        "os.link(f'{root}/tree/d0/f1', f'{root}/tree/hl')\n"
    )
    made = run_as(["/usr/bin/python3", "-c", script, str(work)], unprivileged_user)
    assert made.returncode == 0, made.stderr
    # The account loads the extension too (else both runs below would take the pure path).
    probe = "from nsbuild.tar import fasttree; print(fasttree.compiled())"
    loaded = run_as([sys.executable, "-c", probe], unprivileged_user, env={"NSBUILD_PURE_PYTHON": "0"})
    assert loaded.stdout.strip() == "True", loaded.stderr
    spec = work / "spec.json"
    contents = [{"path": f"{work}/tree", "target": "/t"}]
    spec.write_text(json.dumps({"name": "fast", "tag": "t", "compressor": "gz", "contents": contents}))
    spec.chmod(0o644)
    outs = []
    for pure in ("0", "1"):
        out = work / f"out{pure}.tar"
        proc = run_nsbuild(
            ["layered", "--no-cache", str(spec), "-o", str(out)], unprivileged_user, env={"NSBUILD_PURE_PYTHON": pure}
        )
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    run_as(["chmod", "0", str(work / "tree" / "d1" / "f5")], unprivileged_user, check=True)
    errs = []
    for pure in ("0", "1"):
        proc = run_nsbuild(
            ["layered", "--no-cache", str(spec), "-o", str(work / "x.tar")],
            unprivileged_user,
            env={"NSBUILD_PURE_PYTHON": pure},
        )
        assert proc.returncode == 1, proc.stderr  # a build failure, as for any unreadable input
        assert "Traceback" not in proc.stderr
        errs.append(proc.stderr.splitlines()[-1])
    assert errs[0] == errs[1]
    assert "d1/f5: cannot read: Permission denied" in errs[0]
    assert not os.path.exists(work / "x.tar")
