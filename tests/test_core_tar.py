"""Layer tar details, read from the bytes (our own header walker), by Python's tarfile, bsdtar and GNU tar.

One tree with every awkward kind of entry is built once per module; each test checks one property.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import bsdtar_extract, check_all_layers, gnutar_extract, is_root, skopeo_copy, umoci_unpack
from support.core import RawMember, build, raw_members, read_image, write_spec

MTIME = "2001-02-03T04:05:06Z"
MTIME_EPOCH = 981173106
UID, GID, UNAME, GNAME = 3000000, 5678, "app", "grp"  # uid beyond ustar's 7 octal digits
LONG_COMPONENT = "l" * 150
DEEP = "/".join(["d" * 60] * 5)  # a path > 255 bytes
NON_UTF8 = b"caf\xe9-\xff\xfe"
ALLOWED_PAX = {b"path", b"linkpath", b"uid", b"gid", b"size", b"uname", b"gname"}


def make_tree(root: Path) -> Path:
    """Created in a deliberately unsorted order."""
    root.mkdir()
    for name in ("zeta", "Alpha", "beta", "_under", "10", "9"):
        (root / name).write_text(name)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "file").write_text("deep")
    (root / "dir" / "b").write_text("b")
    (root / "dir" / "a").write_text("a")
    (root / "empty").mkdir()
    (root / "setuid").write_text("#!/bin/sh\n")
    (root / "setuid").chmod(0o4755)
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    (root / "hard1").write_text("linked content\n")
    os.link(root / "hard1", root / "dir" / "hard2")
    (root / "abs-link").symlink_to("/etc/os-release")
    (root / "rel-link").symlink_to("dir/a")
    (root / "dangling").symlink_to("no/such/target")
    os.mkfifo(root / "fifo")
    (root / "xattr").write_text("x")
    os.setxattr(root / "xattr", "user.nsbuild.test", b"value\x00\xff")
    with contextlib.suppress(OSError):  # not settable everywhere: the absence check still holds then
        os.setxattr(root / "xattr", "security.selinux", b"system_u:object_r:tmp_t:s0\x00")
    (root / LONG_COMPONENT).write_text("long component")
    (root / DEEP).mkdir(parents=True)
    (root / DEEP / "leaf").write_text("deep leaf")
    (root / ("k" * 120)).symlink_to("t" * 130)
    (root / "üñíçødé").write_text("utf-8 name")
    return root


def add_non_utf8(root: Path) -> None:
    os.mkdir(os.path.join(os.fsencode(root), NON_UTF8))
    with open(os.path.join(os.fsencode(root), NON_UTF8, b"\xe9t\xe9.txt"), "w") as f:
        f.write("latin-1 name")
    # Too long for ustar's fields: a PAX path record is unavoidable.
    with open(os.path.join(os.fsencode(root), NON_UTF8 * 20), "w") as f:
        f.write("long latin-1 name")


@dataclass
class Built:
    tree: Path
    image: Path
    layer: Path  # the content tree's layer (plain tar)
    raw: list[RawMember]
    members: list[tarfile.TarInfo]
    work: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    tmp = tmp_path_factory.mktemp("tar")
    tree = make_tree(tmp / "tree")
    spec = write_spec(
        tmp,
        {
            "name": "tardetails",
            "tag": "t",
            "compressor": "none",
            "mtime": MTIME,
            "uid": UID,
            "gid": GID,
            "uname": UNAME,
            "gname": GNAME,
            "contents": [str(tree), {"path": str(tree / "dir" / "a"), "target": "/opt/deep/x/a"}],
            "extraCommands": "mkdir -p var/empty && mkfifo var/fifo",
        },
    )
    image = tmp / "img.tar"
    build(spec, image)
    view = read_image(image, tmp / "view")
    layer = view.plain_paths[0]
    return Built(tree, image, layer, list(raw_members(layer)), view.layers[0], tmp)


def all_layer_raws(built: Built) -> list[list[RawMember]]:
    view = read_image(built.image, built.work / "view-all")
    return [list(raw_members(p)) for p in view.plain_paths]


def test_entries_sorted_parents_first(built: Built) -> None:
    for raws in all_layer_raws(built):
        names = [m.name.rstrip(b"/") for m in raws]
        assert names == sorted(names, key=lambda n: n.split(b"/")), names
        seen: set[bytes] = set()
        for n in names:
            parent = n.rpartition(b"/")[0]
            assert not parent or parent in seen, f"{n!r} comes before its parent"
            seen.add(n)
        assert len(names) == len(set(names)), "duplicate entries"


def test_no_atime_ctime_and_fixed_mtime_everywhere(built: Built) -> None:
    for raws in all_layer_raws(built):
        for m in raws:
            extra = {k for k in m.pax if not k.startswith(b"SCHILY.xattr.")} - ALLOWED_PAX
            assert not extra, f"{m.name!r}: unexpected PAX keys {extra}"
            assert m.mtime == MTIME_EPOCH, (m.name, m.mtime)
    # The PAX extended header blocks themselves carry no time either.
    data = built.layer.read_bytes()
    assert b" atime=" not in data and b" ctime=" not in data and b" mtime=" not in data


def test_numeric_ids_and_names_on_every_entry(built: Built) -> None:
    for raws in all_layer_raws(built):
        for m in raws:
            assert (m.uid, m.gid, m.uname, m.gname) == (UID, GID, UNAME.encode(), GNAME.encode()), m.name
    by_name = {m.name: m for m in built.members}
    assert by_name["zeta"].uid == UID and by_name["zeta"].uname == UNAME  # tarfile agrees (uid via PAX)


def test_parents_of_a_target_are_present(built: Built) -> None:
    names = {m.name.rstrip("/"): m for m in read_image(built.image, built.work / "v-par").layers[1]}
    for d in ("opt", "opt/deep", "opt/deep/x"):
        assert d in names and names[d].isdir() and names[d].mode == 0o755, d
    assert names["opt/deep/x/a"].isfile()


def test_kinds_modes_and_links(built: Built) -> None:
    by = {m.name.rstrip("/"): m for m in built.members}
    assert by["empty"].isdir()
    assert by["fifo"].isfifo()
    assert by["setuid"].mode == 0o4755 and by["sticky"].mode == 0o1777
    assert by["abs-link"].issym() and by["abs-link"].linkname == "/etc/os-release"
    assert by["rel-link"].linkname == "dir/a" and by["dangling"].linkname == "no/such/target"
    assert by["k" * 120].issym() and by["k" * 120].linkname == "t" * 130
    # Hard links stay hard links: the first in archive order holds the data.
    first, second = by["dir/hard2"], by["hard1"]
    assert first.isfile() and first.size == len("linked content\n")
    assert second.islnk() and second.linkname == "dir/hard2" and second.size == 0
    last = {m.name.rstrip("/"): m for m in read_image(built.image, built.work / "v-k").layers[-1]}
    assert last["var/empty"].isdir() and last["var/fifo"].isfifo()


def test_xattrs_kept_but_not_selinux(built: Built) -> None:
    [m] = [m for m in built.raw if m.name == b"xattr"]
    assert m.pax.get(b"SCHILY.xattr.user.nsbuild.test") == b"value\x00\xff"
    assert not any(k.startswith(b"SCHILY.xattr.security.selinux") for r in built.raw for k in r.pax)
    # GNU tar restores it.
    out = gnutar_extract(built.layer, built.work / "gx", xattrs=True)
    assert os.getxattr(out / "xattr", "user.nsbuild.test") == b"value\x00\xff"


def test_long_names(built: Built) -> None:
    names = {m.name.rstrip(b"/") for m in built.raw}
    assert LONG_COMPONENT.encode() in names
    assert (DEEP + "/leaf").encode() in names and len(DEEP + "/leaf") > 255
    assert "üñíçødé".encode() in names
    out = gnutar_extract(built.layer, built.work / "gn")
    assert (out / DEEP / "leaf").read_text() == "deep leaf"
    assert (out / LONG_COMPONENT).read_text() == "long component"
    assert (out / "üñíçødé").read_text() == "utf-8 name"


@pytest.fixture(scope="module")
def non_utf8_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("nonutf8")
    tree = tmp / "tree"
    tree.mkdir()
    add_non_utf8(tree)
    spec = write_spec(tmp, {"name": "nonutf8", "tag": "t", "compressor": "none", "contents": [str(tree)]})
    build(spec, tmp / "img.tar")
    return read_image(tmp / "img.tar", tmp / "view").plain_paths[0]


def test_non_utf8_names_keep_their_bytes(non_utf8_layer: Path, tmp_path: Path) -> None:
    names = {m.name.rstrip(b"/") for m in raw_members(non_utf8_layer)}
    assert names == {NON_UTF8, NON_UTF8 + b"/\xe9t\xe9.txt", NON_UTF8 * 20}
    out = gnutar_extract(non_utf8_layer, tmp_path / "gn")
    assert os.path.exists(os.path.join(os.fsencode(out), NON_UTF8, b"\xe9t\xe9.txt"))
    assert os.path.exists(os.path.join(os.fsencode(out), NON_UTF8 * 20))


def test_non_utf8_names_bsdtar(non_utf8_layer: Path, tmp_path: Path) -> None:
    bsdtar_extract(non_utf8_layer, tmp_path / "bx")
    assert os.path.exists(os.path.join(os.fsencode(tmp_path / "bx"), NON_UTF8 * 20))


def _walk(root: Path) -> dict[bytes, tuple]:
    out: dict[bytes, tuple] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, broot)
            kind = stat.S_IFMT(st.st_mode)
            body: object = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    body = f.read()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), body)
    return out


def test_round_trip_through_bsdtar_and_gnu_tar(built: Built) -> None:
    """Extracting the layer with both real readers gives back the source tree: names, kinds, modes,
    contents, link targets, and the hard link (nlink 2)."""
    names = check_all_layers(built.image, built.work / "rt")
    assert names[0]
    source = _walk(built.tree)
    for reader in ("bsdtar-0", "gnutar-0"):
        got = _walk(built.work / "rt" / reader)
        assert got.keys() == source.keys(), (reader, sorted(set(got) ^ set(source))[:10])
        for k, v in source.items():
            if not is_root():  # an unprivileged extraction drops setuid/sticky bits and applies the umask
                v, got[k] = (v[0], v[1] & 0o755, v[2]), (got[k][0], got[k][1] & 0o755, got[k][2])
            assert got[k] == v, (reader, k, got[k], v)
        assert os.lstat(built.work / "rt" / reader / "hard1").st_nlink == 2


def test_umoci_sees_owners_and_modes(built: Built) -> None:
    layout = built.work / "layout"
    skopeo_copy(f"docker-archive:{built.image}", f"oci:{layout}:t")
    mtree = umoci_unpack(layout, "t", built.work / "bundle")
    assert mtree["zeta"].uid == UID and mtree["zeta"].gid == GID
    assert mtree["setuid"].mode == 0o4755


@pytest.mark.slow  # ~25 s: the writer reads and hashes 8 GiB (sha256 runs at ~1 GiB/s here)
def test_file_larger_than_8_gib(tmp_path: Path) -> None:
    """ustar's size field stops at 8 GiB - 1: the size goes into a PAX record; the data is all there."""
    size = (8 << 30) + 4097
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "big.img", "wb") as f:
        f.truncate(size - 3)
        f.seek(size - 3)
        f.write(b"END")
    spec = write_spec(tmp_path, {"name": "big", "tag": "t", "compressor": "zstd", "contents": [str(tree)]})
    layout = tmp_path / "layout"
    build(spec, f"oci:{layout}:t")
    view_layers = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    # The big layer's blob: the zstd frame whose decompressed stream starts with big.img.
    for blob in view_layers:
        with open(blob, "rb") as f:
            if f.read(4) != b"\x28\xb5\x2f\xfd":
                continue
        proc = subprocess.Popen(["zstd", "-dcq", str(blob)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        head = proc.stdout.read(64 << 10)
        if b"big.img" not in head[:2048]:
            proc.kill()
            proc.wait()
            continue
        proc.kill()
        proc.wait()
        # The rest in C (a Python read loop over 8 GiB of pipe costs more than the build).
        total = int(
            subprocess.run(f"zstd -dcq '{blob}' | wc -c", shell=True, check=True, capture_output=True, text=True).stdout
        )
        tail = subprocess.run(f"zstd -dcq '{blob}' | tail -c 4096", shell=True, check=True, capture_output=True).stdout
        break
    else:
        raise AssertionError("no layer holds big.img")
    prefix = tmp_path / "prefix.tar"
    prefix.write_bytes(head)
    first = next(raw_members(prefix, limit_bytes=0))
    assert first.name == b"big.img" and first.size == size and first.pax[b"size"] == str(size).encode()
    with open(prefix, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:  # headers only
        member = tar.next()
        assert member is not None and member.name == "big.img" and member.size == size
    data_end = first.offset + 512 + size
    assert total == data_end + (-size % 512) + 1024, "data, padding and the two end blocks"
    pad = -size % 512
    assert tail[-(1024 + pad + 3) : -(1024 + pad)] == b"END"


def test_long_and_non_ascii_owner_names(tmp_path: Path) -> None:
    """Names beyond ustar's 32 bytes or outside ASCII travel in PAX records; real readers show them."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("f")
    uname, gname = "u" * 40, "grüppe"
    spec = write_spec(
        tmp_path,
        {
            "name": "owners",
            "tag": "t",
            "compressor": "none",
            "contents": [str(tree)],
            "uid": 70000,
            "gid": 2**31,
            "uname": uname,
            "gname": gname,
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    for members in view.layers:
        for m in members:
            assert (m.uid, m.gid, m.uname, m.gname) == (70000, 2**31, uname, gname), m.name
    listing = subprocess.run(
        ["tar", "-tvf", str(view.plain_paths[0])], capture_output=True, text=True, check=True
    ).stdout
    assert f"{uname}/{gname}" in listing, listing
