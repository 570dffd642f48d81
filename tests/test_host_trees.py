"""Host trees (issue 10): nothing outside a contents / copyToRoot tree gets into the image.

A hand-made Debian-like merged-/usr tree holds every kind of link a real rootfs or a buildEnv tree
has: directory links inside the tree (bin -> usr/bin), absolute links to the host (var/run -> /run, a
link to the builder's home with a private file), a relative link that climbs out (`../../..`), links
into a store directory, and hard links. Builds run as the unprivileged accounts; layers are read with
GNU tar, bsdtar and Python's tarfile, and one image is unpacked with umoci.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX, FakeStore, require_busybox
from support.users import UserTmpFactory, chown_tree, describe, run_as, run_nsbuild
from support.verifiers import bsdtar_list, image_layers, run_tool, umoci_unpack

USR_FILE_SIZE = 256 * 1024  # each of usr/bin/*, usr/lib/*: enough that a second copy shows in sizes
WARNING = re.compile(r"^nsbuild: warning: (\S+): (\d+) symlinks? leads? out of the tree \((.*)\); kept as", re.M)


@dataclass
class Trees:
    work: Path
    rootfs: Path  # the Debian-like tree
    home: Path  # "the builder's home": private, outside every tree
    canary: bytes  # the private file's content: must never reach an image
    store: FakeStore
    tool: Path  # a store path (a directory) the tree links into
    unique_bytes: int  # the rootfs's file data, each hard-linked file counted once


def _merged_usr_tree(work: Path) -> Trees:
    home = work / "home"
    canary = f"PRIVATE-{uuid.uuid4().hex}".encode()
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/id_ed25519").write_bytes(canary + b"\n")
    store = FakeStore(work / "store")
    tool = store.add("tool", {"bin/tool": "#!/bin/sh\necho tool\n"})
    script = store.add_file("script", "#!/bin/sh\necho script\n")

    r = work / "rootfs"
    files = {
        "usr/bin/coreutils": b"b",
        "usr/bin/ls": b"l",
        "usr/sbin/init": b"i",
        "usr/lib/libc.so.6": b"c",
        "usr/lib/os-release": b"o",
    }
    for rel, fill in files.items():
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_bytes(fill * USR_FILE_SIZE)
    os.link(r / "usr/bin/coreutils", r / "usr/bin/cat")  # hard links, one in another directory too
    os.link(r / "usr/bin/coreutils", r / "usr/sbin/nologin")
    for name, to in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib"), ("sbin", "usr/sbin")):
        (r / name).symlink_to(to)
    (r / "var").mkdir()
    (r / "var/run").symlink_to("/run")
    (r / "var/lock").symlink_to("/run/lock")
    (r / "etc").mkdir()
    (r / "etc/os-release").symlink_to("../usr/lib/os-release")
    (r / "etc/hostname").symlink_to("/etc/hostname")  # out, to a host file
    (r / "etc/x").symlink_to("../../..")  # climbs out of the tree: the work directory, home included
    (r / "myhome").symlink_to(home)
    (r / "opt").mkdir()
    (r / "opt/tool").symlink_to(tool / "bin")  # a buildEnv-style link into the store (a directory)
    (r / "opt/script").symlink_to(script)  # into the store, a file: a link
    return Trees(work, r, home, canary, store, tool, unique_bytes=4 * USR_FILE_SIZE + USR_FILE_SIZE)


@pytest.fixture
def trees(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> tuple[str | None, Trees]:
    work = user_tmp(unprivileged_user)
    t = _merged_usr_tree(work)
    chown_tree(unprivileged_user, t.home, t.store.dir, t.rootfs)
    return unprivileged_user, t


def nsbuild(user: str | None, work: Path, kind: str, spec: dict, out: Path, *args: str) -> subprocess.CompletedProcess:
    spec_path = work / f"{out.name}.json"
    spec_path.write_text(json.dumps(spec))
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    chown_tree(user, spec_path, tmp)
    return run_nsbuild([kind, spec_path, "-o", out, "--no-cache", *args], user=user, env={"TMPDIR": str(tmp)})


def members(layer: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(layer) as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


def gnu_listing(layer: Path, user: str | None) -> dict[str, str]:
    """name -> GNU tar's verbose line (type letter first; `-> target` / `link to name` at the end)."""
    lines = run_tool(["tar", "-tvf", layer], user).stdout.splitlines()
    out = {}
    for line in lines:
        name = line.split(" 1970-01-01 00:00 ", 1)[1]
        key = re.split(r" -> | link to ", name)[0].rstrip("/")
        out[key] = line
    return out


def warnings_of(proc: subprocess.CompletedProcess) -> list[tuple[str, int, str]]:
    return [(m[0], int(m[1]), m[2]) for m in WARNING.findall(proc.stderr)]


def _check_links_kept(t: Trees, layer: Path, user: str | None) -> dict[str, tarfile.TarInfo]:
    """What every kind of build must give for the rootfs at /: links kept, nothing of the host."""
    m = members(layer)
    gnu = gnu_listing(layer, user)
    bsd = {n.rstrip("/") for n in bsdtar_list(layer, user)}
    assert set(gnu) == bsd == set(m), (sorted(gnu), sorted(bsd))
    for name, to in (
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib"),
        ("sbin", "usr/sbin"),
        ("var/run", "/run"),
        ("var/lock", "/run/lock"),
        ("etc/x", "../../.."),
        ("myhome", str(t.home)),
        ("etc/os-release", "../usr/lib/os-release"),
    ):
        assert m[name].issym() and m[name].linkname == to, (name, m.get(name))
        assert gnu[name].startswith("l") and gnu[name].endswith(f"{name} -> {to}"), gnu[name]
    # Nothing below a link (no copy of the host's /run, the home, the work directory, usr twice).
    for name in ("bin", "lib", "lib64", "sbin", "var/run", "var/lock", "etc/x", "myhome"):
        assert not [n for n in m if n.startswith(name + "/")], name
    assert not [n for n in m if n == "run" or n.startswith("run/") or "id_ed25519" in n]
    assert t.canary not in layer.read_bytes()
    # Hard links stay hard links: one copy of the data, GNU tar sees `link to`.
    first = [n for n in ("usr/bin/coreutils", "usr/bin/cat", "usr/sbin/nologin") if m[n].isfile()]
    assert len(first) == 1, [(n, m[n].type) for n in ("usr/bin/coreutils", "usr/bin/cat", "usr/sbin/nologin")]
    for n in {"usr/bin/coreutils", "usr/bin/cat", "usr/sbin/nologin"} - set(first):
        assert m[n].islnk() and m[n].linkname == first[0], (n, m[n].type, m[n].linkname)
        assert gnu[n].startswith("h") and gnu[n].endswith(f"link to {first[0]}"), gnu[n]
    return m


def _check_warning(proc: subprocess.CompletedProcess, field: str, t: Trees) -> None:
    """One warning line for the entry, naming the links that lead out (and only those)."""
    found = warnings_of(proc)
    assert len(found) == 1 and found[0][0] == field, proc.stderr
    _, count, named = found[0]
    assert count == 5, proc.stderr  # never bin -> usr/bin, etc/os-release, or opt/* (into the store)
    for shown in (
        "/etc/hostname -> /etc/hostname",
        "/etc/x -> ../../..",
        f"/myhome -> {t.home}",
        "/var/run -> /run",
        "/var/lock -> /run/lock",
    ):
        assert shown in named, proc.stderr
    assert "usr/bin" not in named and "opt/" not in named, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "out of the tree" in line]) == 1, proc.stderr


# --- copyToRoot ------------------------------------------------------------------------------------------


def test_copy_to_root_keeps_links_and_never_reads_the_host(trees: tuple[str | None, Trees]) -> None:
    """buildImage's copyToRoot: links inside the tree and links out of it stay links (one warning line
    naming those leading out), a buildEnv-style link into storeDir becomes its directory, hard links
    stay hard links; nothing of the host's /run or the builder's home is read into the layer."""
    user, t = trees
    out = t.work / "ctr.tar"
    proc = nsbuild(
        user,
        t.work,
        "image",
        {"name": "ctr", "tag": "t", "compressor": "none", "storeDir": str(t.store.dir), "copyToRoot": ["rootfs"]},
        out,
    )
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr
    _check_warning(proc, "copyToRoot[0]", t)
    layer = image_layers(out, t.work / "ctr")[-1]
    m = _check_links_kept(t, layer, user)
    # storeDir: a link to a store directory is copied as it (dockerTools' copy of buildEnv trees); a link
    # to a store file stays a link.
    assert m["opt/tool"].isdir() and m["opt/tool/tool"].isfile(), m.get("opt/tool")
    assert m["opt/script"].issym() and m["opt/script"].linkname.startswith(str(t.store.dir))
    # Each file's data once: merged /usr is not copied again under bin/, lib/, lib64/, sbin/.
    data = sum(x.size for x in m.values() if x.isfile())
    assert data == t.unique_bytes + len(b"#!/bin/sh\necho tool\n"), data


def test_copy_to_root_oci_read_by_umoci(trees: tuple[str | None, Trees]) -> None:
    """The same tree in an OCI layout, unpacked by umoci: /bin is a link into /usr, the hard links
    share an inode, /myhome and /var/run are links that lead nowhere on the host's side."""
    user, t = trees
    out = t.work / "ctr-oci"
    proc = nsbuild(
        user,
        t.work,
        "image",
        {"name": "ctr", "tag": "t", "storeDir": str(t.store.dir), "copyToRoot": ["rootfs"]},
        Path(f"oci:{out}"),
    )
    assert proc.returncode == 0, describe(proc)
    bundle = t.work / "bundle"
    mtree = umoci_unpack(out, "t", bundle, user)
    rootfs = bundle / "rootfs"
    assert os.readlink(rootfs / "bin") == "usr/bin" and os.readlink(rootfs / "var/run") == "/run"
    assert os.readlink(rootfs / "myhome") == str(t.home) and os.readlink(rootfs / "etc/x") == "../../.."
    assert os.lstat(rootfs / "usr/bin/cat").st_ino == os.lstat(rootfs / "usr/sbin/nologin").st_ino
    assert os.lstat(rootfs / "usr/bin/cat").st_nlink == 3
    assert not [k for k in mtree if k.startswith(("run", "myhome/", "bin/", "var/run/"))], sorted(mtree)


def test_copy_to_root_link_out_where_the_base_has_a_directory(trees: tuple[str | None, Trees]) -> None:
    """A link leading out of the tree cannot replace a directory of the base image and is never
    followed to merge what it points at: exit 1, one line naming the entry and the path, no output.
    A link inside the tree there has its directory's content merged (and says so)."""
    user, t = trees
    base_tree = t.work / "base-tree"
    (base_tree / "var/run").mkdir(parents=True)
    (base_tree / "lib64").mkdir()
    (base_tree / "lib64/ld.so").write_text("ld\n")
    chown_tree(user, base_tree)
    base = t.work / "base.tar"
    proc = nsbuild(
        user, t.work, "layered", {"name": "base", "tag": "t", "compressor": "none", "contents": ["base-tree"]}, base
    )
    assert proc.returncode == 0, describe(proc)
    out = t.work / "over.tar"
    spec = {
        "name": "over",
        "tag": "t",
        "compressor": "none",
        "fromImage": str(base),
        "storeDir": str(t.store.dir),
        "copyToRoot": ["rootfs"],
    }
    proc = nsbuild(user, t.work, "image", spec, out)
    assert proc.returncode == 1, describe(proc)
    lines = [x for x in proc.stderr.splitlines() if "error" in x]
    assert len(lines) == 1 and "copyToRoot[0]" in lines[0] and "/var/run" in lines[0], proc.stderr
    assert "leads out of the tree" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()

    (t.rootfs / "var/run").unlink()
    proc = nsbuild(user, t.work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    assert "/lib64 is a directory in the image; merging the content of the symlink" in proc.stderr
    m = members(image_layers(out, t.work / "over")[-1])
    assert m["lib64"].isdir() and m["lib64/libc.so.6"].isfile() and m["lib"].issym()


def test_keep_contents_dirlinks(trees: tuple[str | None, Trees]) -> None:
    """keepContentsDirlinks: a link into the store stays a link too, and a directory of copyToRoot
    that arrives where the base image has a link to a directory goes through it (the base's link
    stays), as rsync --keep-dirlinks in dockerTools."""
    user, t = trees
    base_tree = t.work / "base-tree"
    (base_tree / "usr/bin").mkdir(parents=True)
    (base_tree / "usr/bin/busybox").write_text("bb\n")
    (base_tree / "bin").symlink_to("usr/bin")
    chown_tree(user, base_tree)
    base = t.work / "base.tar"
    proc = nsbuild(
        user, t.work, "layered", {"name": "base", "tag": "t", "compressor": "none", "contents": ["base-tree"]}, base
    )
    assert proc.returncode == 0, describe(proc)
    extra = t.work / "extra"
    (extra / "bin").mkdir(parents=True)
    (extra / "bin/extra-tool").write_text("x\n")
    chown_tree(user, extra)
    out = t.work / "keep.tar"
    proc = nsbuild(
        user,
        t.work,
        "image",
        {
            "name": "keep",
            "tag": "t",
            "compressor": "none",
            "fromImage": str(base),
            "storeDir": str(t.store.dir),
            "keepContentsDirlinks": True,
            "copyToRoot": ["extra", "rootfs"],
        },
        out,
    )
    assert proc.returncode == 0, describe(proc)
    m = members(image_layers(out, t.work / "keep")[-1])
    assert m["opt/tool"].issym() and m["opt/tool"].linkname == str(t.tool / "bin")
    assert m["usr/bin/extra-tool"].isfile() and m["bin"].issym() and m["bin"].linkname == "usr/bin"
    _check_links_kept(t, image_layers(out, t.work / "keep")[-1], user)


def test_copy_to_root_with_run_as_root(trees: tuple[str | None, Trees]) -> None:
    """With runAsRoot the tree goes through the sandbox (chroot into base + copyToRoot): the script
    sees the links as links, and the layer still has them as links and the hard links as hard links."""
    require_busybox()
    user, t = trees
    (t.rootfs / "bin").unlink()  # the base's /bin is a directory of busybox links
    base = t.work / "busybox.tar"
    proc = nsbuild(
        user,
        t.work,
        "layered",
        {
            "name": "busybox",
            "tag": "t",
            "compressor": "none",
            "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
            "extraCommands": "mkdir -p bin tmp && ln -s busybox bin/sh",
        },
        base,
    )
    assert proc.returncode == 0, describe(proc)
    script = "/bin/busybox test -L /var/run && /bin/busybox test -L /myhome && /bin/busybox touch /made"
    out = t.work / "rar.tar"
    spec = {
        "name": "rar",
        "tag": "t",
        "compressor": "none",
        "fromImage": str(base),
        "storeDir": str(t.store.dir),
        "copyToRoot": ["rootfs"],
        "runAsRoot": script,
    }
    proc = nsbuild(user, t.work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    layer = image_layers(out, t.work / "rar")[-1]
    m = members(layer)
    gnu = gnu_listing(layer, user)
    assert "made" in m and m["var/run"].issym() and m["myhome"].issym() and m["etc/x"].issym()
    assert not [n for n in m if n.startswith(("myhome/", "var/run/", "etc/x/", "run/"))]
    assert t.canary not in layer.read_bytes()
    names = ("usr/bin/coreutils", "usr/bin/cat", "usr/sbin/nologin")
    files = [n for n in names if m[n].isfile()]
    assert len(files) == 1, [(n, m[n].type) for n in names]
    for n in set(names) - set(files):
        assert m[n].islnk() and m[n].linkname == files[0] and gnu[n].startswith("h"), (n, gnu[n])


# --- contents (nsbuild layered) ---------------------------------------------------------------------------


@pytest.mark.parametrize("scripted", [False, True], ids=["plain", "fakeRootCommands"])
def test_contents_keeps_links_and_hardlinks(trees: tuple[str | None, Trees], scripted: bool) -> None:
    """contents root trees: links kept (one warning line naming those leading out), hard links kept,
    the host never read; also when the tree is folded into the customisation layer and
    fakeRootCommands runs over it (the sandbox's own copy of the tree)."""
    user, t = trees
    spec: dict = {"name": "lay", "tag": "t", "compressor": "none", "storeDir": str(t.store.dir), "contents": ["rootfs"]}
    if scripted:
        base_tree = t.work / "b"
        base_tree.mkdir()
        (base_tree / "b").write_text("b\n")
        chown_tree(user, base_tree)
        base = t.work / "b.tar"
        proc = nsbuild(
            user, t.work, "layered", {"name": "b", "tag": "t", "compressor": "none", "contents": ["b"]}, base
        )
        assert proc.returncode == 0, describe(proc)
        # Two base layers and maxLayers 3: the tree joins the customisation layer, built in the sandbox.
        spec.update(fromImage=str(base), maxLayers=3, fakeRootCommands="touch made-by-script")
    out = t.work / "lay.tar"
    proc = nsbuild(user, t.work, "layered", spec, out)
    assert proc.returncode == 0, describe(proc)
    _check_warning(proc, "contents[0]", t)
    layers = image_layers(out, t.work / "lay")
    layer = layers[-1] if scripted else layers[0]
    m = _check_links_kept(t, layer, user)
    assert m["opt/tool"].issym() and m["opt/script"].issym()  # contents never follow, store or not
    if scripted:
        assert "made-by-script" in m


# --- the entry itself --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "layered"])
def test_an_entry_that_is_a_symlink_is_followed(trees: tuple[str | None, Trees], kind: str) -> None:
    """The entry the spec names is followed when it is a symlink (the user chose it: `./result`), to
    a directory or a file, with a target or without, whatever keepContentsDirlinks says; the links
    below it keep the rules (the warning judges them against the tree the entry leads to)."""
    user, t = trees
    (t.work / "link-to-rootfs").symlink_to("rootfs")
    (t.work / "conf").write_text("setting=1\n")
    (t.work / "link-to-conf").symlink_to(t.work / "conf")
    chown_tree(user, t.work / "link-to-rootfs", t.work / "conf", t.work / "link-to-conf")
    field = "copyToRoot" if kind == "image" else "contents"
    spec: dict = {
        "name": "ent",
        "tag": "t",
        "compressor": "none",
        "storeDir": str(t.store.dir),
        field: ["link-to-rootfs", {"path": "link-to-conf", "target": "/etc/app.conf"}],
    }
    if kind == "image":
        spec["keepContentsDirlinks"] = True
    out = t.work / f"ent-{kind}.tar"
    proc = nsbuild(user, t.work, kind, spec, out)
    assert proc.returncode == 0, describe(proc)
    _check_warning(proc, f"{field}[0]", t)
    layers = image_layers(out, t.work / f"ent-{kind}")
    if kind == "image":
        m = _check_links_kept(t, layers[-1], user)
        conf = m["etc/app.conf"]
    else:
        _check_links_kept(t, layers[0], user)
        conf = members(layers[1])["etc/app.conf"]
    assert conf.isfile() and conf.size == len("setting=1\n"), conf.type


# --- size -------------------------------------------------------------------------------------------------


def test_merged_usr_rootfs_is_copied_once(trees: tuple[str | None, Trees]) -> None:
    """A merged-/usr rootfs is as large in the image as on disk (bin, lib, lib64, sbin are links into
    /usr, not second and third copies of it), for copyToRoot and contents alike."""
    user, t = trees
    for kind, field in (("image", "copyToRoot"), ("layered", "contents")):
        out = t.work / f"size-{kind}.tar"
        proc = nsbuild(
            user,
            t.work,
            kind,
            {"name": "size", "tag": "t", "compressor": "none", "storeDir": str(t.store.dir), field: ["rootfs"]},
            out,
        )
        assert proc.returncode == 0, describe(proc)
        layer = image_layers(out, t.work / f"size-{kind}")[0 if kind == "layered" else -1]
        # Headers and the store tool's few bytes aside, the layer is the tree's unique data.
        assert t.unique_bytes < layer.stat().st_size < t.unique_bytes + 64 * 1024, (kind, layer.stat().st_size)


# --- a real Debian rootfs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_mmdebstrap_rootfs(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """A real merged-/usr Debian rootfs made by `mmdebstrap --mode=unshare` as the test account:
    copyToRoot keeps /bin, /lib, /sbin, /var/run as links, the layer holds each file once, and the
    builder's home (linked from the tree) never gets in."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (apt-get install mmdebstrap)")
    user = user_with_subids
    work = user_tmp(user)
    rootfs = work / "rootfs.tar"
    proc = run_as(
        [
            "mmdebstrap",
            "--mode=unshare",
            "--variant=essential",
            "--format=tar",
            # This machine's clock may be past the mirror's Valid-Until: the rootfs is what matters.
            "--aptopt=Acquire::Check-Valid-Until false",
            "stable",
            str(rootfs),
        ],
        user,
        timeout=1200,
    )
    if proc.returncode != 0:
        pytest.skip(f"mmdebstrap could not make a rootfs here (no mirror?): {proc.stderr[-300:]}")
    tree = work / "debian"
    tree.mkdir()
    chown_tree(user, tree)
    # Unpacked by the test account itself: ids it cannot map become its own, as a rootless user's would.
    run_tool(["tar", "--no-same-owner", "--exclude=./dev/*", "-xf", rootfs, "-C", tree], user)
    home = work / "home"
    home.mkdir()
    (home / "secret").write_text("PRIVATE-mmdebstrap\n")
    (tree / "builder-home").symlink_to(home)
    chown_tree(user, home, tree / "builder-home")
    out = work / "debian.tar"
    proc = nsbuild(
        user, work, "image", {"name": "debian", "tag": "t", "compressor": "none", "copyToRoot": ["debian"]}, out
    )
    assert proc.returncode == 0, describe(proc)
    m = members(image_layers(out, work / "debian-img")[-1])
    for name in ("bin", "lib", "sbin", "var/run", "builder-home"):
        assert m[name].issym(), (name, m[name].type)
    assert not [n for n in m if n.startswith(("bin/", "lib/", "builder-home/"))]
    data = sum(x.size for x in m.values() if x.isfile())
    on_disk = sum(
        os.lstat(os.path.join(d, f)).st_size
        for d, _, fs in os.walk(tree)
        for f in fs
        if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
    )
    assert data <= on_disk, (data, on_disk)
