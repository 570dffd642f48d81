"""A tarball is a layer (issue 16): `{"tar": FILE}` in contents / copyToRoot.

The tars are made by Python's tarfile (an exact member order: a hard link before the file it names),
GNU tar (from a real tree with owners, devices and capabilities, as root), mmdebstrap --mode=unshare
and podman export. nsbuild runs as the unprivileged accounts; the layers are read back by GNU tar,
umoci (rootless) and podman run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX, raw_members, require_busybox
from support.users import (
    UserTmpFactory,
    account,
    chown_tree,
    describe,
    is_root,
    popen_nsbuild,
    run_as,
    run_nsbuild,
)
from support.verifiers import (
    image_layers,
    podman_load_and_run,
    podman_store,
    run_tool,
    to_gzip_oci,
    umoci_unpack,
)

# cap_net_bind_service+ep, as `setcap` writes it (VFS_CAP_REVISION_2, effective, permitted bit 10)
CAP_NET_BIND = b"\x01\x00\x00\x02" + (1 << 10).to_bytes(4, "little") + b"\0" * 12
COMPRESSORS = {"none": None, "gz": ["gzip", "-n"], "zstd": ["zstd", "-q", "--rm"], "xz": ["xz"]}


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1234567890
    info.mode = 0o644 if kind == tarfile.REGTYPE else 0o755
    for key, value in attrs.items():
        setattr(info, key, value)
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def crafted_tar(path: Path, big_id: int = 3000000) -> None:
    """Root-owned and other owners, setuid/setgid/sticky, devices, a fifo, a hard link before its
    target, xattrs with a file capability, a PAX uid (`big_id`: more than ustar's 7 octal digits, and
    more than a subordinate range holds: podman needs a smaller one) and a long name; no entries for
    /usr and /usr/lib."""
    busybox = Path(HOST_BUSYBOX).read_bytes()
    root = {"uid": 0, "gid": 0, "uname": "root", "gname": "root"}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "./", tarfile.DIRTYPE, **root)
        _add(tf, "./bin/", tarfile.DIRTYPE, **root)
        _add(tf, "./bin/busybox", data=busybox, mode=0o755, **root)
        for applet in ("sh", "stat", "cat", "grep", "echo"):
            _add(tf, f"./bin/{applet}", tarfile.SYMTYPE, linkname="busybox", mode=0o777, **root)
        _add(tf, "./bin/zz-suid", data=busybox, mode=0o4755, **root)
        _add(tf, "./bin/aa-suid", tarfile.LNKTYPE, linkname="./bin/zz-suid", **root)
        _add(tf, "./cap/", tarfile.DIRTYPE, **root)
        caps = {"SCHILY.xattr.security.capability": CAP_NET_BIND.decode("latin-1"), "SCHILY.xattr.user.note": "hi"}
        _add(tf, "./cap/cat", data=busybox, mode=0o755, pax_headers=caps, **root)
        _add(tf, "./dev/", tarfile.DIRTYPE, **root)
        _add(tf, "./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666, **root)
        _add(tf, "./dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, uid=0, gid=6, gname="disk")
        _add(tf, "./fifo", tarfile.FIFOTYPE, mode=0o640, uid=1000, gid=1000, uname="alice", gname="alice")
        _add(tf, "./tmp/", tarfile.DIRTYPE, mode=0o1777, **root)
        _add(tf, "./home/", tarfile.DIRTYPE, **root)
        _add(tf, "./home/alice/", tarfile.DIRTYPE, mode=0o750, uid=1000, gid=1000, uname="alice", gname="alice")
        _add(tf, "./srv/", tarfile.DIRTYPE, mode=0o2775, uid=0, gid=50, gname="staff")
        _add(tf, "./etc/", tarfile.DIRTYPE, **root)
        _add(tf, "./etc/shadow", data=b"root:*:1::::::\n", mode=0o640, uid=0, gid=42, uname="root", gname="shadow")
        _add(tf, "./usr/lib/deep/file", data=b"deep\n", uid=big_id, gid=big_id)
        _add(tf, "./opt/" + "d" * 150, data=b"long\n", **root)


def compressed(plain: Path, kind: str) -> Path:
    tool = COMPRESSORS[kind]
    if tool is None:
        return plain
    out = plain.with_name(f"{plain.stem}-{kind}.bin")  # the name says nothing: the magic bytes decide
    shutil.copyfile(plain, out.with_suffix(".src"))
    subprocess.run([*tool, "-c", str(out.with_suffix(".src"))], check=True, stdout=out.open("wb"))
    out.with_suffix(".src").unlink()
    return out


def nsbuild(
    user: str | None,
    work: Path,
    kind: str,
    spec: dict,
    out: Path,
    *args: str,
    umask: int | None = None,
    tz: str = "UTC",
) -> subprocess.CompletedProcess:
    spec_path = work / f"{out.name}.json"
    spec_path.write_text(json.dumps(spec))
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    chown_tree(user, spec_path, tmp)
    cache = [] if "--cache-dir" in args else ["--no-cache"]
    return run_nsbuild(
        [kind, spec_path, "-o", out, *cache, *args], user=user, env={"TMPDIR": str(tmp)}, umask=umask, tz=tz
    )


def listing(layer: Path, user: str | None = None) -> dict[str, str]:
    """name -> GNU tar's verbose line without the name (type, mode, owner, size or device, date, link)."""
    out = {}
    for line in run_tool(["tar", "--numeric-owner", "-tvf", layer], user).stdout.splitlines():
        head, _, rest = line.partition(" 1970-01-01 00:00 ")
        name, sep, link = rest.partition(" link to ")
        if not sep:
            name, sep, link = rest.partition(" -> ")
        out[name.rstrip("/")] = " ".join(head.split()) + (f" {sep.strip()} {link}" if sep else "")
    return out


def new_layer(out: Path, work: Path, index: int = 0) -> Path:
    layers = image_layers(out, work)
    return layers[index]


def _leftovers(tmp: Path) -> list[str]:
    return [str(p) for p in tmp.rglob("*")]


EXPECTED = {
    "bin/aa-suid": "-rwsr-xr-x 0/0",
    "bin/zz-suid": "hrwsr-xr-x 0/0 0 link to bin/aa-suid",
    "bin/sh": "lrwxrwxrwx 0/0 0 -> busybox",
    "dev/null": "crw-rw-rw- 0/0 1,3",
    "dev/sda": "brw-rw---- 0/6 8,0",
    "fifo": "prw-r----- 1000/1000 0",
    "tmp": "drwxrwxrwt 0/0 0",
    "home/alice": "drwxr-x--- 1000/1000 0",
    "srv": "drwxrwsr-x 0/50 0",
    "etc/shadow": "-rw-r----- 0/42 15",
    "usr": "drwxr-xr-x 0/0 0",  # not in the tar: added as for trees
    "usr/lib/deep/file": "-rw-r--r-- 3000000/3000000 5",
}


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_tar_entry_keeps_owners_modes_devices_and_xattrs(
    unprivileged_user: str | None, user_tmp: UserTmpFactory, kind: str
) -> None:
    """Each compression (found by magic bytes, not the name) gives the same layer: owners, modes,
    devices, the fifo, names from the tar, a hard link re-pointed at the first name in layer order,
    the capability xattr; parents the tar omits are added, and nothing is left in TMPDIR."""
    require_busybox()
    user = unprivileged_user
    work = user_tmp(user)
    plain = work / "root.tar"
    crafted_tar(plain)
    src = compressed(plain, kind)
    chown_tree(user, src)
    out = work / "img.tar"
    spec = {"name": "tarlayer", "tag": "t", "compressor": "none", "contents": [{"tar": src.name}]}
    proc = nsbuild(user, work, "layered", spec, out)
    assert proc.returncode == 0, describe(proc)
    assert not _leftovers(work / "tmp")
    layer = new_layer(out, work / "read")
    lst = listing(layer, user)
    for name, want in EXPECTED.items():
        assert lst[name].startswith(want), (name, lst[name], want)
    raw = {m.name: m for m in raw_members(layer)}
    assert raw[b"cap/cat"].pax[b"SCHILY.xattr.security.capability"] == CAP_NET_BIND
    assert raw[b"cap/cat"].pax[b"SCHILY.xattr.user.note"] == b"hi"
    assert raw[b"etc/shadow"].uname == b"root" and raw[b"etc/shadow"].gname == b"shadow"
    assert raw[b"fifo"].uname == b"alice"
    assert {m.mtime for m in raw.values()} == {1}  # the spec's mtime, not the tar's
    # PAX records only where ustar cannot hold the value: the capability, the long name, the big ids.
    assert sorted(n for n, m in raw.items() if m.pax) == sorted(
        [b"cap/cat", b"opt/" + b"d" * 150, b"usr/lib/deep/file"]
    )
    config = json.loads(run_tool(["tar", "-xOf", out, "manifest.json"]).stdout)
    assert len(config[0]["Layers"]) == 2  # the tar's layer and the customisation layer


def test_compressions_and_accounts_give_the_same_bytes(user_tmp: UserTmpFactory) -> None:
    """One layer whatever the compression of the input, and the same image for two accounts with
    different umasks and time zones."""
    if not is_root():
        pytest.skip("comparing accounts needs root (to run as nsbuild-test and nsbuild-nosub)")
    require_busybox()
    digests = set()
    for user, kind, umask, tz in (("test", "none", 0o022, "UTC"), ("nosub", "xz", 0o077, "Asia/Tokyo")):
        work = user_tmp(user)
        plain = work / "root.tar"
        crafted_tar(plain)
        src = compressed(plain, kind).rename(work / "rootfs.bin")  # the history names the file
        chown_tree(user, src)
        out = work / "img.tar"
        spec = {"name": "tarlayer", "tag": "t", "compressor": "gz", "contents": [{"tar": src.name}]}
        proc = nsbuild(user, work, "layered", spec, out, "--format", "oci-archive", umask=umask, tz=tz)
        assert proc.returncode == 0, describe(proc)
        digests.add(run_tool(["sha256sum", out]).stdout.split()[0])
    assert len(digests) == 1, digests


def test_podman_runs_the_tar_layer(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """podman (rootless) runs the image: the owners, the setuid and sticky bits are in effect, and as
    uid 1000 the capability of /cap/cat is its effective set."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    crafted_tar(work / "root.tar", big_id=60000)
    chown_tree(user, work / "root.tar")
    check = "stat -c '%u:%g %a %F %n' /bin/aa-suid /bin/zz-suid /fifo /etc/shadow /srv /tmp /home/alice"
    spec = {
        "name": "tarlayer",
        "tag": "t",
        "compressor": "none",
        "contents": [{"tar": "root.tar"}],
        "config": {"Cmd": ["/bin/sh", "-c", check]},
    }
    out = work / "img.tar"
    proc = nsbuild(user, work, "layered", spec, out)
    assert proc.returncode == 0, describe(proc)
    shown = podman_load_and_run(out, user=user)
    for want in (
        "0:0 4755 regular file /bin/aa-suid",
        "0:0 4755 regular file /bin/zz-suid",
        "1000:1000 640 fifo /fifo",
        "0:42 640 regular file /etc/shadow",
        "0:50 2775 directory /srv",
        "0:0 1777 directory /tmp",
        "1000:1000 750 directory /home/alice",
    ):
        assert want in shown, (want, shown)
    status = podman_load_and_run(out, ["/cap/cat", "/proc/self/status"], user=user, run_args=["--user", "1000"])
    line = next(ln for ln in status.splitlines() if ln.startswith("CapEff"))
    assert int(line.split()[1], 16) == 1 << 10, line


def test_umoci_unpacks_the_tar_layer(user_without_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """umoci --rootless (no subordinate ids at all) unpacks the OCI layout: the owners it records are
    the tar's, and so are the modes and the hard link."""
    require_busybox()
    user = user_without_subids
    work = user_tmp(user)
    crafted_tar(work / "root.tar")
    chown_tree(user, work / "root.tar")
    out = work / "oci"
    spec = {"name": "tarlayer", "tag": "t", "contents": [{"tar": "root.tar"}]}
    proc = nsbuild(user, work, "layered", spec, out, "--format", "oci-dir")
    assert proc.returncode == 0, describe(proc)
    gz = to_gzip_oci(f"oci:{out}:t", work / "gz", "t", user=user)
    tree = umoci_unpack(gz, "t", work / "bundle", user=user)
    assert (tree["etc/shadow"].uid, tree["etc/shadow"].gid, tree["etc/shadow"].mode) == (0, 42, 0o640)
    assert (tree["home/alice"].uid, tree["home/alice"].mode) == (1000, 0o750)
    assert tree["bin/aa-suid"].mode == 0o4755 and tree["bin/aa-suid"].nlink == 2
    assert tree["srv"].mode == 0o2775 and tree["tmp"].mode == 0o1777
    assert tree["usr/lib/deep/file"].uid == 3000000


def test_target_keep_mtime_cache_and_depfile(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """`target` places the tar's root (the `./` entry's mode and owner land there); keepMtime keeps the
    tar's mtimes; a second build takes the layer from the cache; the depfile names the tar."""
    require_busybox()
    user = unprivileged_user
    work = user_tmp(user)
    crafted_tar(work / "root.tar")
    chown_tree(user, work / "root.tar")
    cache = work / "cache"
    cache.mkdir()
    chown_tree(user, cache)
    spec = {
        "name": "tarlayer",
        "tag": "t",
        "compressor": "none",
        "uid": 7,
        "gid": 8,
        "contents": [{"tar": "root.tar", "target": "/srv/root", "keepMtime": True}],
    }
    outs = []
    for i in range(2):
        out = work / f"img{i}.tar"
        proc = nsbuild(user, work, "layered", spec, out, "--cache-dir", str(cache), "--json", "--depfile", f"{out}.d")
        assert proc.returncode == 0, describe(proc)
        outs.append(out.read_bytes())
        sources = [layer["source"] for layer in json.loads(proc.stdout)["layers"]]
        assert sources[0] == ("built" if i == 0 else "cache"), sources
    assert outs[0] == outs[1]
    assert str(work / "root.tar") in (work / "img1.tar.d").read_text()
    raw = {m.name.rstrip(b"/"): m for m in raw_members(new_layer(work / "img1.tar", work / "read"))}
    assert raw[b"srv/root/etc/shadow"].mtime == 1234567890
    assert raw[b"srv"].uid == 7 and raw[b"srv"].mtime == 1  # a parent nsbuild made: the spec's owner
    assert raw[b"srv/root"].uid == 0 and raw[b"srv/root"].mtime == 1234567890  # the tar's ./ entry


def _hostile(path: Path, build: object) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        build(tf)  # type: ignore[operator]


HOSTILE = {
    "dotdot": (lambda tf: _add(tf, "./a/../../etc/passwd", data=b"x"), "'..'"),
    "absolute": (lambda tf: _add(tf, "/etc/passwd", data=b"x"), "absolute name"),
    "through-symlink": (
        lambda tf: (
            _add(tf, "./esc", tarfile.SYMTYPE, linkname="/etc"),
            _add(tf, "./esc/passwd", data=b"x"),
        ),
        "writes through the symlink /esc",
    ),
    "hardlink-out": (lambda tf: _add(tf, "./h", tarfile.LNKTYPE, linkname="../../etc/shadow"), "'..'"),
    "hardlink-missing": (lambda tf: _add(tf, "./h", tarfile.LNKTYPE, linkname="./nothing"), "hard link"),
    "hardlink-later": (
        lambda tf: (
            _add(tf, "./h", tarfile.LNKTYPE, linkname="./later"),
            _add(tf, "./later", data=b"x"),
        ),
        "nothing before it",
    ),
    "dir-and-file": (
        lambda tf: (_add(tf, "./d", tarfile.DIRTYPE), _add(tf, "./d", data=b"x")),
        "once as a directory",
    ),
    "whiteout": (lambda tf: _add(tf, "./etc/.wh.passwd", data=b""), "whiteout"),
    "overlay-xattr": (
        lambda tf: _add(tf, "./d", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        "overlayfs attribute",
    ),
}


@pytest.mark.parametrize("case", [*HOSTILE, "truncated", "bad-checksum", "garbage-after-header"])
def test_hostile_tar_is_refused(unprivileged_user: str | None, user_tmp: UserTmpFactory, case: str) -> None:
    """Each hostile tar: exit 1, one line naming the contents field (and the member where there is
    one), no traceback, no output, nothing left in TMPDIR."""
    user = unprivileged_user
    work = user_tmp(user)
    src = work / "bad.tar"
    if case in HOSTILE:
        _hostile(src, HOSTILE[case][0])
        want = HOSTILE[case][1]
    else:
        _hostile(src, lambda tf: (_add(tf, "./a", data=b"a" * 3000), _add(tf, "./b", data=b"b")))
        data = bytearray(src.read_bytes())
        if case == "truncated":
            data = data[:2048]
            want = "truncated"
        elif case == "bad-checksum":
            data[512 * 9 + 10] ^= 1  # inside the header of ./b (after ./a's pax header, header, 6 data blocks)
            want = "checksum"
        else:
            with tarfile.open(src) as tf:
                last = tf.getmembers()[-1]
            end = last.offset_data + -(-last.size // 512) * 512
            data[end + 512 + 5] = 0x41  # the second block of the end marker: entries some readers see
            want = "end-of-archive"
        src.write_bytes(bytes(data))
    chown_tree(user, src)
    out = work / "img.tar"
    spec = {
        "name": "bad",
        "tag": "t",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}, {"tar": "bad.tar"}],
    }
    proc = nsbuild(user, work, "layered", spec, out)
    assert proc.returncode == 1, describe(proc)
    assert "contents[1]" in proc.stderr and want in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not _leftovers(work / "tmp")


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ({"tar": "missing.tar"}, "contents[0].tar", "no such file"),
        ({"tar": "notatar.tar"}, "contents[0].tar", "not a tar archive"),
        ({"tar": "empty.tar.gz"}, "contents[0].tar", "not a tar archive"),
        ({"tar": "ok.tar", "mode": 1}, "contents[0]", "unknown key 'mode'"),
        ({"tar": "ok.tar", "keepMtime": "yes"}, "contents[0].keepMtime", "true or false"),
        ({"tar": "ok.tar", "target": "rel"}, "contents[0].target", "absolute"),
        ({"tar": 3}, "contents[0].tar", "expected a path"),
    ],
)
def test_bad_tar_entry_is_a_spec_error(tmp_path: Path, entry: dict, field: str, message: str) -> None:
    (tmp_path / "notatar.tar").write_bytes(b"hello world\n" * 100)
    subprocess.run(["gzip", "-n"], input=b"", stdout=(tmp_path / "empty.tar.gz").open("wb"), check=True)
    _hostile(tmp_path / "ok.tar", lambda tf: _add(tf, "./a", data=b"a"))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": "bad", "contents": [entry]}))
    proc = run_nsbuild(["layered", spec, "-o", tmp_path / "out.tar", "--no-cache"])
    assert proc.returncode == 2, describe(proc)
    assert field in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_tar_needs_a_layer_and_comes_first_with_fake_root(tmp_path: Path) -> None:
    _hostile(tmp_path / "ok.tar", lambda tf: _add(tf, "./a", data=b"a"))
    (tmp_path / "tree").mkdir()
    for spec, field in (
        ({"contents": ["tree", {"tar": "ok.tar"}], "fakeRootCommands": "true"}, "contents[1].tar"),
        ({"contents": ["tree", {"tar": "ok.tar"}, "tree"], "maxLayers": 3}, "maxLayers"),
    ):
        path = tmp_path / "spec.json"
        path.write_text(json.dumps({"name": "x", **spec}))
        proc = run_nsbuild(["layered", path, "-o", tmp_path / "out.tar", "--no-cache"])
        assert proc.returncode == 2 and field in proc.stderr, describe(proc)


def test_gnu_tar_of_a_real_tree(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """GNU tar --xattrs of a tree root made (chown, mknod, setcap, hard links): the layer lists as
    the tree does (GNU tar -tv), capability included."""
    if not is_root() or shutil.which("setcap") is None:
        pytest.skip("making the tree needs root (chown, mknod) and setcap")
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    tree = work / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy(HOST_BUSYBOX, tree / "bin" / "ping")
    subprocess.run(["setcap", "cap_net_bind_service+ep", str(tree / "bin" / "ping")], check=True)
    os.link(tree / "bin" / "ping", tree / "bin" / "a-ping")
    os.mknod(tree / "console", 0o620 | 0o020000, os.makedev(5, 1))
    os.chmod(tree / "console", 0o620)  # not the umask's
    os.mkfifo(tree / "pipe", 0o600)
    (tree / "shadow").write_text("x\n")
    os.chown(tree / "shadow", 0, 42)
    os.chmod(tree / "shadow", 0o640)
    os.chown(tree / "pipe", 1000, 1000)
    src = work / "tree.tar.zst"
    run_tool(["tar", "--xattrs", "--xattrs-include=*", "--zstd", "-cf", src, "-C", tree, "."])
    chown_tree(user, src)
    out = work / "img.tar"
    proc = nsbuild(
        user, work, "layered", {"name": "g", "tag": "t", "compressor": "none", "contents": [{"tar": src.name}]}, out
    )
    assert proc.returncode == 0, describe(proc)
    lst = listing(new_layer(out, work / "read"), user)
    assert lst["console"].startswith("crw--w---- 0/0 5,1"), lst["console"]
    assert lst["pipe"].startswith("prw------- 1000/1000"), lst["pipe"]
    assert lst["shadow"].startswith("-rw-r----- 0/42"), lst["shadow"]
    assert lst["bin/ping"].startswith("hrwxr-xr-x 0/0 0 link to bin/a-ping"), lst["bin/ping"]
    raw = {m.name: m for m in raw_members(new_layer(out, work / "read"))}
    assert raw[b"bin/a-ping"].pax[b"SCHILY.xattr.security.capability"] == CAP_NET_BIND


def test_copy_to_root_tar_with_run_as_root(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """nsbuild image: the tar is its own layer below the buildImage layer, keeping its owners; a tree
    entry merges into it (its /lib symlink followed), and runAsRoot sees the tar's files."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    src = work / "root.tar"
    busybox = Path(HOST_BUSYBOX).read_bytes()
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "./usr/bin/busybox", data=busybox, mode=0o755)
        _add(tf, "./bin", tarfile.SYMTYPE, linkname="usr/bin")
        _add(tf, "./usr/bin/sh", tarfile.SYMTYPE, linkname="busybox")
        _add(tf, "./etc/owned", data=b"from the tar\n", uid=1000, gid=1000)
    tree = work / "tree" / "bin"
    tree.mkdir(parents=True)
    (tree / "added").write_text("tree\n")
    chown_tree(user, src, work / "tree")
    spec = {
        "name": "img",
        "tag": "t",
        "compressor": "none",
        "copyToRoot": [{"tar": "root.tar"}, "tree"],
        "runAsRoot": "cat /etc/owned > /seen && stat -c %u /etc/owned >> /seen",
    }
    out = work / "img.tar"
    proc = nsbuild(user, work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    layers = image_layers(out, work / "read")
    assert len(layers) == 2
    tar_layer, new = listing(layers[0], user), listing(layers[1], user)
    assert tar_layer["etc/owned"].startswith("-rw-r--r-- 1000/1000"), tar_layer
    assert "usr/bin/added" in new and "bin/added" not in new, new  # merged through the tar's /bin link
    with tarfile.open(layers[1]) as tf:
        seen = tf.extractfile("seen")
        assert seen is not None and seen.read() == b"from the tar\n1000\n"


def _gnu_entries(path: Path, user: str | None) -> dict[str, str]:
    """name -> type, mode, owner, device and symlink target of every member GNU tar lists (any
    compression); a hard link counts as a file (which name of a group carries the data may differ)."""
    out = {}
    for line in run_tool(["tar", "--numeric-owner", "-tvf", path], user).stdout.splitlines():
        mode, owner, size, _date, _time, rest = line.split(None, 5)
        name, _, link = rest.partition(" -> ")
        name = name.partition(" link to ")[0].removeprefix("./").rstrip("/")
        if name in ("", "."):
            continue
        kind = "-" if mode[0] == "h" else mode[0]
        out[name] = f"{kind}{mode[1:]} {owner} {size if kind in 'cb' else ''} {link}"
    return out


@pytest.mark.slow
def test_mmdebstrap_rootfs_tar_is_a_layer(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """mmdebstrap --mode=unshare's tar as contents, as the test account, no namespace involved: every
    member of the rootfs is in the layer with its owner and mode (GNU tar lists both the same). Then
    as copyToRoot of nsbuild image, with runAsRoot chrooted into it."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed")
    user = user_with_subids
    work = user_tmp(user)
    rootfs = work / "rootfs.tar.zst"
    argv = ["mmdebstrap", "--mode=unshare", "--variant=essential", "--format=tar"]
    argv += ["--aptopt=Acquire::Check-Valid-Until false"]
    proc = run_as([*argv, "stable", str(work / "rootfs.tar")], user, timeout=1200)
    if proc.returncode != 0:
        pytest.skip(f"mmdebstrap could not make a rootfs here (no mirror?): {proc.stderr[-300:]}")
    run_tool(["zstd", "-q", work / "rootfs.tar", "-o", rootfs], user)
    out = work / "debian.tar"
    spec = {"name": "debian", "tag": "t", "compressor": "zstd", "contents": [{"tar": rootfs.name}]}
    proc = nsbuild(user, work, "layered", spec, out)
    assert proc.returncode == 0, describe(proc)
    layer = new_layer(out, work / "read")
    want, got = _gnu_entries(rootfs, user), _gnu_entries(layer, user)
    assert want == got, sorted(set(want.items()) ^ set(got.items()))[:10]
    assert got["usr/bin/su"].startswith("-rwsr-xr-x 0/0"), got["usr/bin/su"]
    assert got["usr/sbin/unix_chkpwd"].startswith("-rwxr-sr-x 0/42"), got["usr/sbin/unix_chkpwd"]
    assert got["var/mail"].startswith("drwxrwsr-x 0/8"), got["var/mail"]
    assert got["dev/null"].startswith("crw-rw-rw- 0/0 1,3"), got["dev/null"]
    # nsbuild image: runAsRoot chrooted into the rootfs tar (its device nodes left out, as runAsRoot
    # takes none from a tar), as the test account
    run_tool(["tar", "--delete", "-f", work / "rootfs.tar", "--wildcards", "./dev/?*"], user)
    script = "echo hi > /etc/motd && chown 100:100 /etc/motd && stat -c %U:%G:%a /usr/bin/su > /seen"
    spec = {
        "name": "debian",
        "tag": "t",
        "compressor": "none",
        "copyToRoot": [{"tar": "rootfs.tar"}],
        "runAsRoot": script,
    }
    out = work / "debian-image.tar"
    proc = nsbuild(user, work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    layers = image_layers(out, work / "read-image")
    new = listing(layers[1], user)
    assert new["etc/motd"].startswith("-rw-r--r-- 100/100"), new
    with tarfile.open(layers[1]) as tf:
        seen = tf.extractfile("seen")
        assert seen is not None and seen.read() == b"root:root:4755\n"


def test_podman_export_is_a_layer(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """A container's `podman export` (rootless, as the test account) re-used as a layer: it runs."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    crafted_tar(work / "root.tar", big_id=60000)
    chown_tree(user, work / "root.tar")
    base = work / "base.tar"
    spec = {"name": "base", "tag": "t", "compressor": "none", "contents": [{"tar": "root.tar"}]}
    assert nsbuild(user, work, "layered", spec, base).returncode == 0
    export = work / "export.tar"
    with podman_store(user) as store:
        image = store.load(base)
        store.podman("create", "--name", "c", image, "/bin/sh")
        store.podman("export", "-o", export, "c")
    chown_tree(user, export)
    again = work / "again.tar"
    spec2 = {
        "name": "again",
        "tag": "t",
        "compressor": "none",
        "contents": [{"tar": "export.tar"}],
        "config": {"Cmd": ["/bin/sh", "-c", "stat -c '%u:%g %a %n' /etc/shadow /bin/aa-suid"]},
    }
    proc = nsbuild(user, work, "layered", spec2, again)
    assert proc.returncode == 0, describe(proc)
    shown = podman_load_and_run(again, user=user)
    assert "0:42 640 /etc/shadow" in shown and "0:0 4755 /bin/aa-suid" in shown, shown
    assert account(user).uid  # the test account, never root


def test_schema_describes_the_tar_entry() -> None:
    import jsonschema

    for kind, key in (("layered", "contents"), ("image", "copyToRoot")):
        doc = json.loads(run_nsbuild(["schema", "--kind", kind]).stdout)
        ok = {"name": "x", key: [{"tar": "r.tar", "target": "/srv", "keepMtime": True}, "tree"]}
        jsonschema.validate(ok, doc)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "x", key: [{"tar": "r.tar", "path": "tree"}]}, doc)


def test_interrupt_while_a_huge_tar_is_read(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """Ctrl-C while the plain copy of a 16 GiB tar (one member of holes) is made: exit 130, and the
    copy, the output and the workspace are gone."""
    user = unprivileged_user
    work = user_tmp(user)
    src = work / "huge.tar"
    size = 16 << 30
    header = tarfile.TarInfo("huge")
    header.size = size
    with open(src, "wb") as f:
        f.write(header.tobuf(tarfile.GNU_FORMAT))
        f.truncate(512 + size + 1024)  # the data and the end marker: holes, read as zeros
    chown_tree(user, src)
    spec = work / "spec.json"
    spec.write_text(json.dumps({"name": "huge", "tag": "t", "compressor": "none", "contents": [{"tar": "huge.tar"}]}))
    scratch = work / "scratch"
    scratch.mkdir()
    chown_tree(user, spec, scratch)
    out = work / "out.tar"
    proc = popen_nsbuild(["layered", spec, "-o", out, "--no-cache"], user, env={"TMPDIR": str(scratch)})
    try:
        time.sleep(2)
        assert proc.poll() is None, "the build ended before it was interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    assert not out.exists()
    assert list(scratch.iterdir()) == []


def test_duplicates_and_links_follow_the_extraction(tmp_path: Path) -> None:
    """A name given twice keeps the later member; a hard link made before its target was replaced
    keeps the data it linked to (as an extraction would), and the first name in layer order carries it."""
    from nsbuild.tar.tarinput import TarInput, load_tar_layer

    src = tmp_path / "dup.tar"

    def build(tf: tarfile.TarFile) -> None:
        _add(tf, "./f", data=b"old")
        _add(tf, "./z-link", tarfile.LNKTYPE, linkname="f")
        _add(tf, "./f", data=b"new", mode=0o600)
        _add(tf, "./d/", tarfile.DIRTYPE, mode=0o700)
        _add(tf, "./d/", tarfile.DIRTYPE, mode=0o750)
        _add(tf, "./s", tarfile.SYMTYPE, linkname="a")
        _add(tf, "./s", tarfile.SYMTYPE, linkname="b")

    _hostile(src, build)
    layer = load_tar_layer(TarInput(src, "/", False, "contents[0]"), tmp_path / "work")
    try:
        entries = {e.name: e for e in layer.entries}
        assert list(entries) == [b"d", b"f", b"s", b"z-link"]
        assert entries[b"d"].mode == 0o750 and entries[b"s"].linkname == b"b"
        assert entries[b"f"].kind == "file" and entries[b"f"].mode == 0o600
        data = layer.plain.read_bytes()
        f, z = entries[b"f"], entries[b"z-link"]
        assert data[f.offset : f.offset + f.size] == b"new"
        assert z.kind == "file" and data[z.offset : z.offset + z.size] == b"old"  # its own inode now
    finally:
        layer.plain.unlink()
    assert list((tmp_path / "work").iterdir()) == []


def test_fake_root_commands_see_the_tar(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """fakeRootCommands sees the tar's files with their owners below it (each backend); what it
    changes is in the customisation layer, what it leaves alone is not."""
    user = unprivileged_user
    work = user_tmp(user)
    src = work / "root.tar"
    with tarfile.open(src, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "./etc/owned", data=b"from the tar\n", uid=1000, gid=1000)
        _add(tf, "./etc/kept", data=b"kept\n", uid=0, gid=42)
    tree = work / "tree"
    tree.mkdir()
    (tree / "app").write_text("app\n")
    chown_tree(user, src, tree)
    spec = {
        "name": "img",
        "tag": "t",
        "compressor": "none",
        "contents": [{"tar": "root.tar"}, "tree"],
        "fakeRootCommands": "stat -c %u:%g etc/owned etc/kept > seen && cat etc/owned >> seen && chown 2000 etc/owned",
    }
    out = work / "img.tar"
    proc = nsbuild(user, work, "layered", spec, out)
    assert proc.returncode == 0, describe(proc)
    layers = image_layers(out, work / "read")
    assert len(layers) == 3
    custom = listing(layers[2], user)
    assert custom["etc/owned"].startswith("-rw-r--r-- 2000/1000"), custom
    assert "etc/kept" not in custom and "app" not in custom, custom
    with tarfile.open(layers[2]) as tf:
        seen = tf.extractfile("seen")
        assert seen is not None and seen.read() == b"1000:1000\n0:42\nfrom the tar\n"


def test_gnu_and_pax_headers_give_the_same_layer(tmp_path: Path) -> None:
    """GNU long names and base-256 ids, or PAX records, or a member order of its own: one layer
    (GNU tar headers hold 32 bytes of a user name: the only thing they cannot say here)."""
    from nsbuild.tar.owners import Owner, OwnerPolicy
    from nsbuild.tar.tarinput import TarInput, load_tar_layer
    from nsbuild.tar.tarwriter import write_entries

    members = [
        ("./opt/" + "n" * 150, {"uid": 3000000, "gid": 5, "uname": "u" * 32}),
        ("./a/b/c", {"mode": 0o4711}),
        ("./a/b/" + "é" * 60, {}),
    ]
    layers = []
    for fmt, order in ((tarfile.GNU_FORMAT, 1), (tarfile.PAX_FORMAT, -1)):
        src = tmp_path / f"{fmt}.tar"
        with tarfile.open(src, "w", format=fmt) as tf:
            for name, attrs in members[::order]:
                _add(tf, name, data=name.encode(), **attrs)
        layer = load_tar_layer(TarInput(src, "/", False, "contents[0]"), tmp_path / "work")
        out = io.BytesIO()
        owner = OwnerPolicy.fixed_owner(Owner(0, 0, "root", "root"))
        write_entries(iter(layer.entries), out, mtime=1, owner=owner)
        layer.plain.unlink()
        layers.append(out.getvalue())
    assert layers[0] == layers[1]
    with tarfile.open(fileobj=io.BytesIO(layers[0])) as tf:
        got = {m.name: m for m in tf.getmembers()}
    assert got["opt/" + "n" * 150].uid == 3000000 and got["opt/" + "n" * 150].uname == "u" * 32
    assert [m.name for m in got.values()][:3] == ["a", "a/b", "a/b/c"]


def test_run_as_root_refuses_devices_of_a_tar(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    user = unprivileged_user
    work = user_tmp(user)
    _hostile(work / "dev.tar", lambda tf: _add(tf, "./dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3))
    chown_tree(user, work / "dev.tar")
    spec = {"name": "d", "tag": "t", "copyToRoot": [{"tar": "dev.tar"}], "runAsRoot": "true"}
    proc = nsbuild(user, work, "image", spec, work / "out.tar")
    assert proc.returncode == 1, describe(proc)
    assert "copyToRoot[0].tar: 'dev/null' is a device node (1:3)" in proc.stderr, proc.stderr
    assert "--skip=output/dev" in proc.stderr and "Traceback" not in proc.stderr
    assert not (work / "out.tar").exists() and not _leftovers(work / "tmp")
    spec.pop("runAsRoot")
    assert nsbuild(user, work, "image", spec, work / "out.tar").returncode == 0  # without it: kept


@pytest.mark.parametrize("kind", ["layered", "image"])
def test_perms_rules_reach_the_tar_members(unprivileged_user: str | None, user_tmp: UserTmpFactory, kind: str) -> None:
    """The spec's perms rules apply to a tar's members as to any entry: a path rule and a regex rule
    change what they set, and what they leave unset keeps the tar's values (names included)."""
    require_busybox()
    user = unprivileged_user
    work = user_tmp(user)
    plain = work / "root.tar"
    crafted_tar(plain)
    chown_tree(user, plain)
    out = work / "img.tar"
    entries = "contents" if kind == "layered" else "copyToRoot"
    perms = [
        {"path": "/home/alice", "uid": 2000, "uname": "bob"},
        {"regex": "/etc/shad.*", "mode": "0600"},
        {"path": "/bin/aa-suid", "mode": "0755"},
    ]
    spec = {"name": "tarperms", "tag": "t", "compressor": "none", entries: [{"tar": plain.name}], "perms": perms}
    proc = nsbuild(user, work, kind, spec, out)
    assert proc.returncode == 0, describe(proc)
    layer = new_layer(out, work / "read")
    lst = listing(layer, user)
    assert lst["home/alice"].startswith("drwxr-x--- 2000/1000 0"), lst["home/alice"]
    assert lst["etc/shadow"].startswith("-rw------- 0/42 15"), lst["etc/shadow"]
    # The name that carries the data (first in layer order) and its hard link are one file: both
    # get the rule's mode.
    assert lst["bin/aa-suid"].startswith("-rwxr-xr-x 0/0"), lst["bin/aa-suid"]
    assert lst["bin/zz-suid"].startswith("hrwxr-xr-x 0/0"), lst["bin/zz-suid"]
    raw = {m.name.rstrip(b"/"): m for m in raw_members(layer)}
    assert raw[b"home/alice"].uname == b"bob" and raw[b"home/alice"].gname == b"alice"
    assert raw[b"etc/shadow"].uname == b"root" and raw[b"etc/shadow"].gname == b"shadow"
    assert raw[b"dev/null"].mode == 0o666  # no rule matched: the tar's own
