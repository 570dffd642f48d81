"""What chrooted scripts see (issue 12): the store read-only at its own path, the host's shell and tools
where the image has none, runAsRoot's /tmp = the image's /tmp; none of the host view reaches the layer.

Every build runs the installed nsbuild as an unprivileged account, on each backend that can chroot:
userns as nsbuild-test (subordinate ids), userns-fakeroot as nsbuild-nosub (none). The store is a fake
one (`<hash>-name` entries, static busybox for the shell) in the account's own directory under /tmp:
storeDir below /tmp is one of the cases the issue names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX, require_busybox
from support.users import UserTmpFactory, account, describe, is_root, remove_tree, run_nsbuild
from support.verifiers import image_layers

CASES = [
    pytest.param(("userns", "test"), id="userns-test"),
    pytest.param(("userns-fakeroot", "nosub"), id="userns-fakeroot-nosub"),
]


class Store:
    def __init__(self, root: Path) -> None:
        self.dir = root / "store"
        self.dir.mkdir()
        self.busybox = self._entry("busybox")
        (self.busybox / "bin").mkdir()
        shutil.copy(HOST_BUSYBOX, self.busybox / "bin/busybox")
        os.symlink("busybox", self.busybox / "bin/sh")
        self.tool = self._entry("tool")
        (self.tool / "bin").mkdir()
        t = self.tool / "bin/tool"
        t.write_text(f"#!{self.busybox}/bin/sh\necho tool-ran\n")
        t.chmod(0o755)
        self.data = self._entry("data")  # no bin/: an image made of it has no /bin at all
        (self.data / "share").mkdir()
        (self.data / "share/greeting").write_text("hello\n")

    def _entry(self, name: str) -> Path:
        h = hashlib.sha256(name.encode()).hexdigest()[:32]
        h = h.translate(str.maketrans("eotu", "abcd"))  # nix-base32 has no e, o, t, u
        p = self.dir / f"{h}-{name}"
        p.mkdir()
        return p


@pytest.fixture
def setup(request: pytest.FixtureRequest, user_tmp: UserTmpFactory) -> Iterator[tuple[str, str, Path, Store]]:
    backend, user = request.param
    require_busybox()
    work = user_tmp(user)
    # The store below /tmp (runAsRoot's /tmp used to hide it); the rest of the test's files elsewhere.
    store_root = Path(tempfile.mkdtemp(prefix="nsbuild-store-", dir="/tmp"))
    store_root.chmod(0o755)
    store = Store(store_root)
    if is_root():
        acc = account(user)
        for top in (work, store_root):
            for dirpath, dirs, files in os.walk(top):
                for n in [dirpath, *[os.path.join(dirpath, x) for x in dirs + files]]:
                    os.lchown(n, acc.uid, acc.gid)
    yield backend, user, work, store
    remove_tree(store_root, user)


def _build(setup: tuple, kind: str, spec: dict, name: str) -> tuple[object, Path]:
    backend, user, work, _ = setup
    spec_path = work / f"{name}.json"
    spec_path.write_text(json.dumps({"name": name, "tag": "latest", "compressor": "none", **spec}))
    out = work / f"{name}.tar"
    if is_root():
        acc = account(user)
        os.lchown(spec_path, acc.uid, acc.gid)
    proc = run_nsbuild([kind, spec_path, "-o", out, "--no-cache", "--isolation", backend], user)
    return proc, out


def _last_layer(setup: tuple, image: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    layers = image_layers(image, setup[2] / f"unpack-{image.stem}")
    out = {}
    with tarfile.open(layers[-1]) as tf:
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isfile() else None
            out[m.name.rstrip("/").removeprefix("./")] = (m, f.read() if f else None)
    return out


def _assert_no_host_view(layer: dict, store: Store) -> None:
    # The store's mount point and the directories made for it (below the image's own /tmp here).
    store_top = str(store.dir.parent).lstrip("/")
    for name in layer:
        assert not name.startswith(".nsbuild-host"), name
        assert name != store_top and not name.startswith(store_top + "/"), name
        assert not name.startswith("lib64"), name  # the host's loader, bound where the image has none


@pytest.mark.parametrize("setup", CASES, indirect=True)
def test_run_as_root_in_an_image_without_a_shell(setup: tuple) -> None:
    """No /bin/sh in the image: runAsRoot runs with the host's bash and tools; it calls a store path
    that is not in the image; the base image's /tmp is its /tmp and what it leaves there stays."""
    _, _, work, store = setup
    base_proc, base = _build(setup, "image", {"extraCommands": "mkdir -p tmp\necho base > tmp/base-file\n"}, "base")
    assert base_proc.returncode == 0, describe(base_proc)
    script = (
        "mkdir -p /data\n"
        f"{store.tool}/bin/tool > /data/tool-out\n"
        "cat /tmp/base-file > /data/seen-tmp\n"
        "echo left > /tmp/left\n"
        'echo "$BASH" > /data/shell\n'
        "chown 12:34 /data/tool-out\n"
        # Namespace root may try to make the store writable again: the host's own files must stay as they are.
        f"mount -o remount,rw {store.dir} 2>/dev/null || mount -o remount,bind,rw {store.dir} 2>/dev/null || :\n"
        f"if touch {store.dir}/new 2>/dev/null; then echo ESCAPE store; fi\n"
        "if touch /.nsbuild-host/usr/new 2>/dev/null; then echo ESCAPE host; fi\n"
        f"if mkdir {store.tool}/x 2>/dev/null; then echo ESCAPE entry; fi\n"
    )
    proc, out = _build(setup, "image", {"fromImage": str(base), "storeDir": str(store.dir), "runAsRoot": script}, "ras")
    assert proc.returncode == 0, describe(proc)
    assert "ESCAPE" not in proc.stdout + proc.stderr, describe(proc)
    assert "setlocale" not in proc.stderr, describe(proc)  # the host shell finds the host's locales
    layer = _last_layer(setup, out)
    assert layer["data/tool-out"][1] == b"tool-ran\n"
    assert (layer["data/tool-out"][0].uid, layer["data/tool-out"][0].gid) == (12, 34)
    assert layer["data/seen-tmp"][1] == b"base\n"
    assert layer["tmp/left"][1] == b"left\n"
    assert layer["data/shell"][1].decode().startswith("/.nsbuild-host/")
    _assert_no_host_view(layer, store)
    assert sorted(p.name for p in store.dir.iterdir()) == sorted([store.busybox.name, store.tool.name, store.data.name])


@pytest.mark.parametrize("setup", CASES, indirect=True)
def test_fakechroot_sees_the_whole_store_beside_the_images_own(setup: tuple) -> None:
    """A layered image without /bin whose store layer (one entry) is in the lower tree: the script
    (host shell and tools) sees that entry and the host store's others; its own work is in the
    layer, the store is not."""
    _, _, _, store = setup
    script = (
        "mkdir /bin\n"
        f"ln -s {store.busybox}/bin/busybox /bin/sh\n"
        f"{store.tool}/bin/tool > /out\n"
        f"ls {store.dir} > /store-list\n"
        "cat /share/greeting > /greeting\n"
        "chown 12345:12345 /out\n"
        f"mount -o remount,rw {store.dir} 2>/dev/null || :\n"
        f"for p in {store.data}/x {store.tool}/x {store.dir}/x; do\n"
        "  if touch $p 2>/dev/null; then echo ESCAPE $p; fi\n"
        "done\n"
    )
    spec = {"storeDir": str(store.dir), "contents": [str(store.data)], "enableFakechroot": True}
    proc, out = _build(setup, "layered", {**spec, "fakeRootCommands": script}, "fc")
    assert proc.returncode == 0, describe(proc)
    assert "ESCAPE" not in proc.stdout + proc.stderr, describe(proc)
    layer = _last_layer(setup, out)
    assert layer["out"][1] == b"tool-ran\n"
    assert (layer["out"][0].uid, layer["out"][0].gid) == (12345, 12345)
    assert layer["store-list"][1].decode().split() == sorted([store.busybox.name, store.tool.name, store.data.name])
    assert layer["greeting"][1] == b"hello\n"
    assert layer["bin/sh"][0].linkname == f"{store.busybox}/bin/busybox"
    _assert_no_host_view(layer, store)
    assert not any(os.path.lexists(p / "x") for p in (store.dir, store.data, store.tool))


@pytest.mark.parametrize("setup", CASES, indirect=True)
def test_a_run_as_root_failure_names_run_as_root(setup: tuple) -> None:
    _, _, work, store = setup
    proc, out = _build(setup, "image", {"storeDir": str(store.dir), "runAsRoot": "echo before\nexit 3\n"}, "fail")
    assert proc.returncode == 1, describe(proc)
    assert "runAsRoot" in proc.stderr and "exit status 3" in proc.stderr, describe(proc)
    assert "enableFakechroot" not in proc.stderr and "fakeRootCommands" not in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("setup", CASES, indirect=True)
def test_the_images_own_shell_comes_first(setup: tuple) -> None:
    """An image with a /bin/sh of its own (static busybox) runs the script with it; the host's tools
    only come after its own on PATH, and its programs get no host library path."""
    _, _, _, store = setup
    script = (
        'echo "${BASH:-no-bash}" > /shell\n'
        'echo "$PATH" > /path\n'
        'echo "${LD_LIBRARY_PATH:-}" > /libs\n'
        f"{store.tool}/bin/tool > /out\n"
    )
    spec = {"storeDir": str(store.dir), "contents": [str(store.busybox)], "enableFakechroot": True}
    proc, out = _build(setup, "layered", {**spec, "fakeRootCommands": script}, "own")
    assert proc.returncode == 0, describe(proc)
    layer = _last_layer(setup, out)
    assert layer["shell"][1] == b"no-bash\n"
    path = layer["path"][1].decode().strip().split(":")
    host = [i for i, d in enumerate(path) if d.startswith("/.nsbuild-host/")]
    assert host and path.index("/bin") < min(host), path
    assert "nsbuild-host" not in layer["libs"][1].decode()
    assert layer["out"][1] == b"tool-ran\n"
    _assert_no_host_view(layer, store)


@pytest.mark.parametrize("setup", CASES, indirect=True)
def test_a_base_image_cannot_place_the_host_view(setup: tuple) -> None:
    """A base image that brings its own /.nsbuild-host (a symlink to /, a directory with files) would
    decide where the host's tools are mounted: refused in one line, nothing written, nothing mounted."""
    _, _, work, store = setup
    for name, make in (
        ("hostlink", "ln -s / .nsbuild-host"),
        ("hostdir", "mkdir .nsbuild-host && echo x > .nsbuild-host/f"),
    ):
        base_proc, base = _build(setup, "image", {"extraCommands": make}, f"base-{name}")
        assert base_proc.returncode == 0, describe(base_proc)
        proc, out = _build(setup, "image", {"fromImage": str(base), "runAsRoot": "echo ran > /ran"}, f"ras-{name}")
        assert proc.returncode == 1, describe(proc)
        assert ".nsbuild-host" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
        assert not out.exists()
