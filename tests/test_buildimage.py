"""`nsbuild image` (buildImage, issue 4): copyToRoot, runAsRoot without KVM, limits, the nixpkgs cases.

Every build runs the installed nsbuild as an unprivileged account. Base images are built by nsbuild
itself from Debian's static busybox; layers are read back with Python's tarfile and images are run
with rootless podman where it says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX, require_busybox
from support.users import (
    UserTmpFactory,
    account,
    as_user_argv,
    chown_tree,
    describe,
    has_subids,
    nsbuild_cmd,
    processes_with,
    run_nsbuild,
    user_env,
)
from support.verifiers import image_layers, podman_load_and_run, umoci_unpack

APPLETS = "sh ls cat echo mkdir rm id whoami stat grep chown touch sleep head awk env printf test tr sort"
# Debian's busybox-static has no adduser applet: the base carries a small one, as a distribution would.
ADDUSER = r"""#!/bin/sh
[ "$1" = -D ] && shift
name=$1
uid=1000
while grep -q "^[^:]*:[^:]*:$uid:" /etc/passwd; do uid=$((uid+1)); done
echo "$name:x:$uid:$uid::/home/$name:/bin/sh" >> /etc/passwd
echo "$name:x:$uid:" >> /etc/group
mkdir -p "/home/$name" && chown "$uid:$uid" "/home/$name"
"""
BASE_EXTRA = (
    f"mkdir -p bin etc tmp home && for a in {APPLETS}; do ln -s busybox bin/$a; done\n"
    "printf 'root:x:0:0:root:/root:/bin/sh\\n' > etc/passwd\nprintf 'root:x:0:\\n' > etc/group\n"
    "echo 'Welcome' > etc/issue\n"
    f"cat > bin/adduser <<'EOF'\n{ADDUSER}EOF\nchmod 755 bin/adduser\n"
)
SCRIPT = "adduser -D app && mkdir -p /data && chown app:app /data && echo hi > /etc/motd && rm /etc/issue"


def nsbuild(
    user: str | None, work: Path, kind: str, spec: dict, out: Path, *args: str, name: str | None = None
) -> subprocess.CompletedProcess:
    spec_path = work / (name or f"{out.stem}.json")
    spec_path.write_text(json.dumps(spec))
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    chown_tree(user, spec_path, tmp)
    return run_nsbuild([kind, spec_path, "-o", out, *args], user=user, env={"TMPDIR": str(tmp)})


def busybox_base(user: str | None, work: Path, **extra: object) -> Path:
    """A small runnable image built by `nsbuild layered` from busybox-static."""
    out = work / "busybox-base.tar"
    if out.exists() and not extra:
        return out
    spec = {
        "name": "busybox-base",
        "tag": "latest",
        "compressor": "none",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": BASE_EXTRA,
        "config": {"Env": ["PATH=/bin"]},
    }
    spec.update(extra)
    proc = nsbuild(user, work, "layered", spec, out)
    assert proc.returncode == 0, describe(proc)
    return out


def listing(layer: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(layer) as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


def layer_file(layer: Path, name: str) -> bytes:
    with tarfile.open(layer) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


def image_config(image: Path) -> dict:
    with tarfile.open(image) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        return json.load(tf.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]


def flatten(image: Path, work: Path) -> dict[str, bytes | str | None]:
    """The image's file system as a runtime sees it: layers applied in order, whiteouts honoured
    (written here, independent of nsbuild's own unpacking)."""
    fs: dict[str, bytes | str | None] = {}
    for layer in image_layers(image, work / f"flat-{uuid.uuid4().hex[:8]}"):
        with tarfile.open(layer) as tf:
            members = tf.getmembers()
            for m in members:
                name = m.name.rstrip("/").removeprefix("./")
                d, _, base = name.rpartition("/")
                if base == ".wh..wh..opq":
                    for k in [k for k in fs if k.startswith(d + "/")]:
                        del fs[k]
                elif base.startswith(".wh."):
                    gone = (d + "/" if d else "") + base[4:]
                    for k in [k for k in fs if k == gone or k.startswith(gone + "/")]:
                        del fs[k]
            for m in members:
                name = m.name.rstrip("/").removeprefix("./")
                if name.rpartition("/")[2].startswith(".wh."):
                    continue
                if m.isfile():
                    fs[name] = tf.extractfile(m).read()  # type: ignore[union-attr]
                elif m.issym():
                    fs[name] = "-> " + m.linkname
                else:
                    fs[name] = None
    return fs


# --- the busybox case, in podman ---------------------------------------------------------------------


def test_busybox_run_as_root_in_podman(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """adduser/chown/echo/rm as namespace root in the image (userns backend) → podman run shows /data
    owned by app's uid, /etc/motd, no /etc/issue, and `User: app` works."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    base = busybox_base(user, work)
    out = work / "app.tar"
    spec = {
        "name": "app",
        "tag": "latest",
        "compressor": "none",
        "fromImage": str(base),
        "runAsRoot": SCRIPT,
        "config": {
            "User": "app",
            "Cmd": [
                "/bin/sh",
                "-c",
                "stat -c %u:%g /data; cat /etc/motd; test -e /etc/issue || echo issue-gone; whoami",
            ],
        },
    }
    proc = nsbuild(user, work, "image", spec, out, "--isolation", "userns")
    assert proc.returncode == 0, describe(proc)
    layers = image_layers(out, work / "unpacked")
    base_layers = image_layers(base, work / "unpacked-base")
    assert len(layers) == len(base_layers) + 1
    lst = listing(layers[-1])
    assert (lst["data"].uid, lst["data"].gid, lst["data"].uname) == (1000, 1000, "app")
    assert "etc/.wh.issue" in lst and "etc/motd" in lst
    assert not any(n.split("/")[0] in ("dev", "proc", "sys", "tmp") for n in lst), sorted(lst)
    caller = account(user)
    assert all(m.uid != caller.uid or caller.uid == 0 for m in lst.values())
    shown = podman_load_and_run(out, user=user).split()
    assert shown == ["1000:1000", "hi", "issue-gone", "app"], shown
    # The same build as a gzip OCI layout: umoci checks digests, sizes, diff_ids and reads the owners back.
    layout = work / "oci"
    proc = nsbuild(
        user,
        work,
        "image",
        {**spec, "compressor": "gz"},
        layout,
        "--isolation",
        "userns",
        "--format",
        "oci-dir",
        name="app-oci.json",
    )
    assert proc.returncode == 0, describe(proc)
    tree = umoci_unpack(layout, "latest", work / "bundle", user)
    assert (tree["data"].uid, tree["data"].gid) == (1000, 1000) and "etc/motd" in tree
    assert "etc/issue" not in tree and "etc/passwd" in tree


# --- every backend -------------------------------------------------------------------------------------


def _dynamic_rootfs(work: Path) -> Path:
    """bash and coreutils with their libraries: fakeroot (userns-fakeroot) cannot follow a static
    busybox, so that backend's ownership case uses dynamically linked tools."""
    r = work / "dyn-rootfs"
    for tool in ("bash", "sh", "mkdir", "chown", "rm", "cat", "echo", "ls"):
        path = shutil.which(tool, path="/usr/bin:/bin")
        assert path, tool
        dest = r / Path(path).relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(path).resolve(), dest)
        ldd = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        for lib in [w for w in ldd.split() if w.startswith("/")]:
            ld = r / Path(lib).relative_to("/")
            ld.parent.mkdir(parents=True, exist_ok=True)
            if not ld.exists():
                shutil.copy2(Path(lib).resolve(), ld)
    if Path("/bin").is_symlink() and not (r / "bin").exists():
        (r / "bin").symlink_to("usr/bin")
    (r / "etc").mkdir(exist_ok=True)
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (r / "etc/group").write_text("root:x:0:\n")
    (r / "etc/issue").write_text("Welcome\n")
    return r


DYN_SCRIPT = (
    "echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group && "
    "mkdir -p /data && chown app:app /data && echo hi > /etc/motd && rm /etc/issue"
)


def test_ownership_on_every_backend(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """The same runAsRoot on a dynamically linked base gives the same layer on every namespace backend;
    the fakeroot backend (no namespaces, no chroot) refuses runAsRoot with a clear error."""
    if shutil.which("fakeroot") is None:
        pytest.skip("fakeroot is not installed (`make deps`)")
    user = unprivileged_user
    work = user_tmp(user)
    rootfs = _dynamic_rootfs(work)
    chown_tree(user, rootfs)
    base = work / "dyn-base.tar"
    proc = nsbuild(
        user, work, "layered", {"name": "dyn", "tag": "t", "compressor": "none", "contents": ["dyn-rootfs"]}, base
    )
    assert proc.returncode == 0, describe(proc)
    spec = {"name": "dyn-app", "tag": "t", "compressor": "none", "fromImage": str(base), "runAsRoot": DYN_SCRIPT}
    backends = ["userns", "userns-fakeroot"] if has_subids(user) else ["userns-fakeroot"]
    layers = {}
    for backend in backends:
        out = work / f"dyn-{backend}.tar"
        proc = nsbuild(user, work, "image", spec, out, "--isolation", backend)
        assert proc.returncode == 0, describe(proc)
        layer = image_layers(out, work / f"u-{backend}")[-1]
        lst = listing(layer)
        assert (lst["data"].uid, lst["data"].gid, lst["data"].uname, lst["data"].gname) == (1000, 1000, "app", "app")
        assert "etc/.wh.issue" in lst and layer_file(layer, "etc/motd") == b"hi\n"
        layers[backend] = layer.read_bytes()
    assert len(set(layers.values())) == 1, "the backends wrote different layers"
    out = work / "dyn-fakeroot.tar"
    proc = nsbuild(user, work, "image", spec, out, "--isolation", "fakeroot")
    assert proc.returncode == 1, describe(proc)
    assert "runAsRoot needs a user namespace" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# --- the nixpkgs cases -----------------------------------------------------------------------------------


def test_nixpkgs_layers_order(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """Three images, each overwriting some of /tmp/layer1..3 in extraCommands: the later wins."""
    user = unprivileged_user
    work = user_tmp(user)
    scripts = [
        "mkdir -p tmp\necho layer1 > tmp/layer1\necho layer1 > tmp/layer2\necho layer1 > tmp/layer3",
        "mkdir -p tmp\necho layer2 > tmp/layer2\necho layer2 > tmp/layer3",
        "mkdir -p tmp\necho layer3 > tmp/layer3",
    ]
    parent = None
    for i, script in enumerate(scripts, 1):
        out = work / f"l{i}.tar"
        spec = {"name": f"l{i}", "tag": "latest", "compressor": "none", "extraCommands": script}
        if parent:
            spec["fromImage"] = str(parent)
        proc = nsbuild(user, work, "image", spec, out)
        assert proc.returncode == 0, describe(proc)
        parent = out
    assert parent is not None
    fs = flatten(parent, work)
    assert [fs[f"tmp/layer{i}"] for i in (1, 2, 3)] == [b"layer1\n", b"layer2\n", b"layer3\n"]
    assert len(image_layers(parent, work / "l3")) == 3


def test_nixpkgs_layers_unpack_order_and_env(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """a → b → c, each runAsRoot appending its name to /layer-order: the base layers are unpacked in
    order before runAsRoot runs → "abc" (in podman). Env: the parent's entries, then the child's
    (concatenated as dockerTools' buildImage does); the runtime sees the child's value last."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    parent = busybox_base(user, work, config={"Env": ["PATH=/bin", "FROM_PARENT=true", "LAST_OVERRIDE=parent"]})
    for name in "abc":
        out = work / f"order-{name}.tar"
        spec = {
            "name": f"layers-unpack-order-{name}",
            "tag": "latest",
            "compressor": "none",
            "fromImage": str(parent),
            "runAsRoot": f'#!/bin/sh\necho -n "{name}" >> /layer-order',
        }
        if name == "c":
            spec["config"] = {
                "Env": ["FROM_CHILD=true", "LAST_OVERRIDE=child"],
                "Cmd": ["/bin/sh", "-c", "cat /layer-order; echo; env | sort"],
            }
        proc = nsbuild(user, work, "image", spec, out)
        assert proc.returncode == 0, describe(proc)
        parent = out
    env = image_config(parent)["config"]["Env"]
    assert env == ["PATH=/bin", "FROM_PARENT=true", "LAST_OVERRIDE=parent", "FROM_CHILD=true", "LAST_OVERRIDE=child"]
    shown = podman_load_and_run(parent, user=user).splitlines()
    assert shown[0] == "abc", shown
    assert "FROM_PARENT=true" in shown and "FROM_CHILD=true" in shown and "LAST_OVERRIDE=child" in shown
    assert "LAST_OVERRIDE=parent" not in shown


def test_nixpkgs_repeated_base_layers(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """A base whose manifest lists the same layer twice: applied once before runAsRoot; the image
    keeps the base's layer list as it is."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    base = busybox_base(user, work)
    dup = work / "dup-base.tar"
    _duplicate_first_layer(base, dup, work / "dup")
    chown_tree(user, dup)
    out = work / "dup-app.tar"
    spec = {
        "name": "dup-app",
        "tag": "latest",
        "compressor": "none",
        "fromImage": str(dup),
        "runAsRoot": "ls /bin/busybox > /seen && cat /etc/issue >> /seen",
    }
    proc = nsbuild(user, work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    layers = image_layers(out, work / "dup-out")
    base_layers = image_layers(dup, work / "dup-in")
    assert [p.read_bytes() for p in layers[:-1]] == [p.read_bytes() for p in base_layers]
    assert layers[0].read_bytes() == layers[len(base_layers) - 1].read_bytes()
    assert layer_file(layers[-1], "seen") == b"/bin/busybox\nWelcome\n"


def _duplicate_first_layer(src: Path, dest: Path, tmp: Path) -> None:
    """Rewrite a docker-archive so its manifest (and config diff_ids/history) repeat layer 0 at the end."""
    import hashlib

    tmp.mkdir()
    with tarfile.open(src) as tf:
        tf.extractall(tmp)  # our own archive
    manifest = json.loads((tmp / "manifest.json").read_text())
    config = json.loads((tmp / manifest[0]["Config"]).read_text())
    manifest[0]["Layers"].append(manifest[0]["Layers"][0])
    config["rootfs"]["diff_ids"].append(config["rootfs"]["diff_ids"][0])
    config["history"].append(dict(config["history"][0]))
    data = json.dumps(config).encode()
    name = hashlib.sha256(data).hexdigest() + ".json"
    (tmp / name).write_bytes(data)
    manifest[0]["Config"] = name
    manifest[0]["RepoTags"] = ["dup-base:latest"]
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    with tarfile.open(dest, "w") as tf:
        for entry in ["manifest.json", name, *dict.fromkeys(manifest[0]["Layers"])]:
            tf.add(tmp / entry, entry)


def test_nixpkgs_parentheses_and_quotes(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """runAsRoot and extraCommands with parentheses and quotes; no fromImage: busybox from copyToRoot.
    extraCommands sees only the new layer's files (cwd = the layer's root)."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    tree = work / "bb"
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(HOST_BUSYBOX, tree / "bin/busybox")
    for a in ("sh", "echo", "ls"):
        (tree / "bin" / a).symlink_to("busybox")
    chown_tree(user, tree)
    out = work / "paren.tar"
    spec = {
        "name": "runasrootextracommands",
        "tag": "latest",
        "compressor": "none",
        "copyToRoot": ["bb"],
        "runAsRoot": 'echo "(runAsRoot)" > runAsRoot',
        "extraCommands": 'echo "(extraCommand)" > extraCommands && ls > seen-by-extra',
    }
    proc = nsbuild(user, work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    (layer,) = image_layers(out, work / "paren")
    assert layer_file(layer, "runAsRoot") == b"(runAsRoot)\n"
    assert layer_file(layer, "extraCommands") == b"(extraCommand)\n"
    seen = layer_file(layer, "seen-by-extra").decode().split()
    assert "bin" in seen and "runAsRoot" in seen and "dev" not in seen and "proc" not in seen


def test_on_top_of_layered_architecture_and_now(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """buildImage on a layered image keeps its layers byte for byte and adds one; architecture and
    created "now" reach the config; entries of the new layer are owned by uid/gid without runAsRoot."""
    require_busybox()
    user = unprivileged_user
    work = user_tmp(user)
    base = busybox_base(user, work)
    (work / "add/etc").mkdir(parents=True)
    (work / "add/etc/hello").write_text("hello\n")
    chown_tree(user, work / "add")
    out = work / "arm.tar"
    spec = {
        "name": "arm",
        "tag": "latest",
        "compressor": "none",
        "fromImage": str(base),
        "copyToRoot": ["add"],
        "architecture": "arm64",
        "created": "now",
        "uid": 1234,
        "gid": 4321,
        "extraCommands": "echo x > made-by-extra",
    }
    proc = nsbuild(user, work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    config = image_config(out)
    assert config["architecture"] == "arm64"
    year = time.gmtime().tm_year
    assert config["created"].startswith((str(year), str(year - 1))), config["created"]
    layers = image_layers(out, work / "arm")
    base_layers = image_layers(base, work / "arm-base")
    assert [p.read_bytes() for p in layers[:-1]] == [p.read_bytes() for p in base_layers]
    lst = listing(layers[-1])
    assert set(lst) >= {"etc", "etc/hello", "made-by-extra"}
    assert all((m.uid, m.gid, m.uname, m.gname) == (1234, 4321, "", "") for m in lst.values())


# --- copyToRoot --------------------------------------------------------------------------------------------


def test_copy_to_root_dirlinks_and_merging(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """A symlink to a directory inside the tree stays a symlink, keepContentsDirlinks or not (issue
    10; tests/test_host_trees.py has the store and host cases); a directory copied where the base has
    a symlink to a directory is merged into its target (and said so); where the symlink leads nowhere,
    or a symlink would replace a base directory: a clear error."""
    user = unprivileged_user
    work = user_tmp(user)
    base_tree = work / "base-tree"
    (base_tree / "usr/lib").mkdir(parents=True)
    (base_tree / "usr/lib/base-file").write_text("b\n")
    (base_tree / "lib").symlink_to("usr/lib")
    (base_tree / "opt").symlink_to("/nowhere")
    (base_tree / "home").mkdir()
    chown_tree(user, base_tree)
    base = work / "links-base.tar"
    proc = nsbuild(
        user, work, "layered", {"name": "links", "tag": "t", "compressor": "none", "contents": ["base-tree"]}, base
    )
    assert proc.returncode == 0, describe(proc)

    src = work / "ctr"
    (src / "realdata").mkdir(parents=True)
    (src / "realdata/f").write_text("f\n")
    (src / "data").symlink_to("realdata")
    (src / "lib/extra").mkdir(parents=True)
    (src / "lib/extra/x").write_text("x\n")
    chown_tree(user, src)

    def go(name: str, **extra: object) -> tuple[subprocess.CompletedProcess, Path]:
        out = work / f"{name}.tar"
        spec = {"name": name, "tag": "t", "compressor": "none", "fromImage": str(base), "copyToRoot": ["ctr"]}
        spec.update(extra)
        return nsbuild(user, work, "image", spec, out), out

    proc, out = go("nokeep")
    assert proc.returncode == 0, describe(proc)
    lst = listing(image_layers(out, work / "nokeep")[-1])
    assert lst["data"].issym() and lst["data"].linkname == "realdata" and lst["realdata/f"].isfile()
    assert "lib" not in lst and lst["usr/lib/extra/x"].isfile()
    assert "/lib is a symlink" in proc.stderr and "/usr/lib" in proc.stderr
    fs = flatten(out, work)
    assert fs["lib"] == "-> usr/lib" and fs["usr/lib/base-file"] == b"b\n" and fs["usr/lib/extra/x"] == b"x\n"

    proc, out = go("keep", keepContentsDirlinks=True)
    assert proc.returncode == 0, describe(proc)
    lst = listing(image_layers(out, work / "keep")[-1])
    assert lst["data"].issym() and lst["data"].linkname == "realdata"

    (src / "opt/sub").mkdir(parents=True)
    proc, out = go("dangling")
    assert proc.returncode == 1, describe(proc)
    assert "copyToRoot[0]: /opt is a symlink to '/nowhere'" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    shutil.rmtree(src / "opt")

    (src / "home").symlink_to("/nonexistent-home")
    proc, out = go("dir-by-link", keepContentsDirlinks=True)
    assert proc.returncode == 1, describe(proc)
    assert "/home is a directory in the image" in proc.stderr and "symlink" in proc.stderr
    assert not out.exists()


def test_from_image_name_and_tag_and_nixdb(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """fromImageName/fromImageTag choose one image of a multi-image docker-archive (its own layers);
    includeNixDB without a Nix store in the image: exit 2 naming includeNixDB."""
    user = unprivileged_user
    work = user_tmp(user)
    images = {}
    for name in ("first", "second"):
        tree = work / f"t-{name}"
        tree.mkdir()
        (tree / name).write_text(name)
        chown_tree(user, tree)
        out = work / f"{name}.tar"
        proc = nsbuild(
            user, work, "layered", {"name": name, "tag": "v1", "compressor": "none", "contents": [tree.name]}, out
        )
        assert proc.returncode == 0, describe(proc)
        images[name] = out
    multi = work / "multi"
    multi.mkdir()
    manifest = []
    for out in images.values():
        with tarfile.open(out) as tf:
            tf.extractall(multi)  # our own archive
            manifest += json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
    (multi / "manifest.json").write_text(json.dumps(manifest))
    archive = work / "multi.tar"
    with tarfile.open(archive, "w") as tf:
        for p in sorted(multi.iterdir()):
            tf.add(p, p.name)
    chown_tree(user, archive)
    out = work / "chosen.tar"
    spec = {
        "name": "chosen",
        "tag": "t",
        "compressor": "none",
        "fromImage": str(archive),
        "fromImageName": "second",
        "fromImageTag": "v1",
    }
    proc = nsbuild(user, work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    fs = flatten(out, work)
    assert fs.get("second") == b"second" and "first" not in fs
    proc = nsbuild(user, work, "image", {**spec, "fromImageName": None, "fromImageTag": None}, out)
    assert proc.returncode == 1 and "fromImageName" in proc.stderr, describe(proc)
    proc = nsbuild(user, work, "image", {**spec, "includeNixDB": True}, work / "nixdb.tar")
    assert proc.returncode == 2 and "includeNixDB" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)


# --- limits, failures, Ctrl-C ------------------------------------------------------------------------------


def test_limits_and_failure(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """diskSize and buildVMMemorySize hit on purpose name themselves; a failing runAsRoot exits 1 with
    its output; nothing is written."""
    require_busybox()
    user = unprivileged_user
    work = user_tmp(user)
    base = busybox_base(user, work)
    backend = "userns" if has_subids(user) else "userns-fakeroot"
    cases = [
        ({"runAsRoot": "head -c 12000000 /dev/zero > /big", "diskSize": 8}, "diskSize"),
        ({"runAsRoot": "head -c 12000000 /dev/zero > /tmp/big", "diskSize": 8}, "diskSize"),
        ({"runAsRoot": "awk 'BEGIN { s = \"x\"; while (1) s = s s }'", "buildVMMemorySize": 32}, "buildVMMemorySize"),
        ({"runAsRoot": "echo marker-$((6*7)) ; echo err-marker >&2; false"}, "marker-42"),
    ]
    for extra, needle in cases:
        out = work / "limited.tar"
        spec = {"name": "limited", "tag": "t", "compressor": "none", "fromImage": str(base), **extra}
        proc = nsbuild(user, work, "image", spec, out, "--isolation", backend)
        assert proc.returncode == 1, (extra, describe(proc))
        error = [ln for ln in proc.stderr.splitlines() if ln.startswith("nsbuild: error:")]
        assert error and needle in proc.stderr[proc.stderr.index(error[0]) :], (extra, describe(proc))
        assert "Traceback" not in proc.stderr and not out.exists()
    assert "err-marker" in proc.stderr
    # Within the limits the same writes succeed.
    spec = {
        "name": "limited",
        "tag": "t",
        "compressor": "none",
        "fromImage": str(base),
        "diskSize": 64,
        "runAsRoot": "head -c 12000000 /dev/zero > /tmp/big && head -c 1000 /dev/zero > /small",
    }
    proc = nsbuild(user, work, "image", spec, work / "ok.tar", "--isolation", backend)
    assert proc.returncode == 0, describe(proc)
    assert os.listdir(work / "tmp") == []


def test_ctrl_c_leaves_nothing(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    require_busybox()
    user = unprivileged_user
    work = user_tmp(user)
    base = busybox_base(user, work)
    marker = f"{3000 + uuid.uuid4().int % 100000}"
    spec = {
        "name": "int",
        "tag": "t",
        "compressor": "none",
        "fromImage": str(base),
        "runAsRoot": ("mkdir /owned && chown 4000:4000 /owned\n" if has_subids(user) else "") + f"sleep {marker}",
    }
    spec_path = work / "int.json"
    spec_path.write_text(json.dumps(spec))
    chown_tree(user, spec_path)
    out = work / "int.tar"
    argv = as_user_argv([*nsbuild_cmd(), "image", str(spec_path), "-o", str(out)], user)
    env = user_env(user, {"TMPDIR": str(work / "tmp")})
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # hang guard only
        while not processes_with(f"sleep {marker}"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "runAsRoot never started"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err.decode(errors="replace")
    assert not processes_with(f"sleep {marker}")
    assert os.listdir(work / "tmp") == []
    assert not out.exists()


def test_store_paths_bring_their_closure_and_nix_db(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """A store path in copyToRoot: its content at /, its closure at the store location (references
    found by scanning, as Nix does), and with includeNixDB both registered in /nix/var/nix/db."""
    import sqlite3

    user = unprivileged_user
    work = user_tmp(user)
    store = work / "store"
    hello, lib = store / ("a" * 31 + "b-hello"), store / ("c" * 31 + "d-lib")
    (hello / "bin").mkdir(parents=True)
    (lib / "lib").mkdir(parents=True)
    (lib / "lib/x").write_text("lib\n")
    (hello / "bin/hello").write_text(f"#!/bin/sh\ncat {lib}/lib/x\n")
    chown_tree(user, store)
    out = work / "nix.tar"
    spec = {
        "name": "nix",
        "tag": "t",
        "compressor": "none",
        "storeDir": str(store),
        "copyToRoot": [f"store/{hello.name}"],
        "includeNixDB": True,
    }
    proc = nsbuild(user, work, "image", spec, out)
    assert proc.returncode == 0, describe(proc)
    (layer,) = image_layers(out, work / "nix")
    lst = listing(layer)
    rel = str(store).lstrip("/")
    assert {"bin/hello", f"{rel}/{hello.name}/bin/hello", f"{rel}/{lib.name}/lib/x"} <= set(lst)
    db = work / "db.sqlite"
    db.write_bytes(layer_file(layer, "nix/var/nix/db/db.sqlite"))
    with sqlite3.connect(db) as conn:
        paths = {row[0] for row in conn.execute("SELECT path FROM ValidPaths")}
    assert paths == {str(hello), str(lib)}


def test_unreadable_copy_to_root_entry_is_one_line_error(
    unprivileged_user: str | None, user_tmp: UserTmpFactory
) -> None:
    """A file the caller cannot read fails the build with one line naming the entry (root reads
    everything, so only an unprivileged caller shows it)."""
    user = unprivileged_user
    work = user_tmp(user)
    src = work / "src"
    (src / "sub").mkdir(parents=True)
    secret = src / "sub" / "secret"
    secret.write_text("x")
    chown_tree(user, src)
    secret.chmod(0)
    out = work / "o.tar"
    proc = nsbuild(user, work, "image", {"name": "u", "tag": "t", "copyToRoot": [str(src)]}, out)
    assert proc.returncode == 1, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"nsbuild: error: copyToRoot[0]: cannot copy {secret}: Permission denied"
    ), describe(proc)
    assert not out.exists()
