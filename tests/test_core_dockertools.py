"""The daemon-free cases of nixpkgs' nixos/tests/docker-tools.nix, ported in spirit.

Store paths come from a fake store built per test (`<32 nix-base32 chars>-name` entries whose files
name each other's full paths, so the references are found by scanning, as Nix does) with storeDir
pointing at it. Images are read back with GNU tar / Python's tarfile and run with podman.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from datetime import datetime
from pathlib import Path

import pytest
from support import podman_store, run_nsbuild, skopeo_inspect, to_gzip_oci, umoci_unpack
from support.core import (
    BUSYBOX,
    DEFAULT_CREATED,
    DEFAULT_EPOCH,
    FakeStore,
    build,
    read_image,
    write_spec,
)

APPLETS = ["sh", "cat", "ls", "env", "test", "readlink", "stat", "id"]


def busybox_tree(root: Path) -> Path:
    """A root tree with a static busybox and a few applet links: enough to run checks in podman."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


@pytest.fixture
def store(tmp_path: Path) -> FakeStore:
    # Ends in nix/store like the real thing; the host's directory modes are deliberately not 0755.
    s = FakeStore(tmp_path / "nix" / "store")
    (tmp_path / "nix").chmod(0o775)
    s.dir.chmod(0o1775)
    return s


def closure_store(store: FakeStore) -> dict[str, Path]:
    """glibc <- {coreutils, bash}; bash <- hello; a lone `data` path: a small dependency graph."""
    p: dict[str, Path] = {}
    p["glibc"] = store.add(
        "glibc-2.37", {"lib/libc.so.6": b"\x7fELF" + b"c" * 5000, "lib/ld-linux.so.2": b"\x7fELF" + b"l" * 3000}
    )
    p["coreutils"] = store.add("coreutils-9.1", {"bin/ls": b"ls" * 4000, "bin/cat": b"cat" * 100}, refs=[p["glibc"]])
    p["bash"] = store.add("bash-5.2", {"bin/bash": b"bash" * 3000}, refs=[p["glibc"]])
    p["hello"] = store.add(
        "hello-2.12", {"bin/hello": b"hello" * 100, "share/man/man1/hello.1": "man"}, refs=[p["bash"]]
    )
    p["data"] = store.add("data-1", {"share/data/big": b"d" * 20000})
    return p


def test_stable_default_date(tmp_path: Path, store: FakeStore) -> None:
    paths = closure_store(store)
    spec = write_spec(
        tmp_path,
        {
            "name": "stable",
            "tag": "t",
            "contents": [str(paths["hello"])],
            "storeDir": str(store.dir),
            "extraCommands": "mkdir -p etc && echo x > etc/x",
        },
    )
    out = tmp_path / "img.tar"
    build(spec, out)
    view = read_image(out, tmp_path / "view")
    assert view.config["created"] == DEFAULT_CREATED
    assert {h["created"] for h in view.config["history"]} == {DEFAULT_CREATED}
    mtimes = {m.mtime for members in view.layers for m in members}
    assert mtimes == {DEFAULT_EPOCH}, "every entry of every new layer, the customisation layer included"


def test_unstable_date_now(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("x\n")
    spec = write_spec(
        tmp_path,
        {
            "name": "now",
            "tag": "t",
            "contents": [str(tree)],
            "created": "now",
            "mtime": "now",
            "extraCommands": "echo y > made",
        },
    )
    before = int(time.time())
    build(spec, tmp_path / "img.tar")
    after = int(time.time()) + 1
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    created = datetime.fromisoformat(view.config["created"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert before <= created.timestamp() <= after
    for members in view.layers:
        for m in members:
            assert before <= m.mtime <= after, (m.name, m.mtime)


def test_source_date_epoch_fills_created_and_mtime(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("f")
    spec = write_spec(tmp_path, {"name": "sde", "tag": "t", "contents": [str(tree)]})
    build(spec, tmp_path / "img.tar", env={"SOURCE_DATE_EPOCH": "1700000000"})
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert view.config["created"] == "2023-11-14T22:13:20Z"
    assert {m.mtime for members in view.layers for m in members} == {1700000000}


def test_nix_and_store_dirs_are_0755_in_store_layers(tmp_path: Path, store: FakeStore) -> None:
    paths = closure_store(store)
    spec = write_spec(
        tmp_path,
        {
            "name": "modes",
            "tag": "t",
            "contents": [str(paths["hello"]), str(paths["data"])],
            "storeDir": str(store.dir),
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    store_rel = str(store.dir).lstrip("/")
    nix_rel = str(store.dir.parent).lstrip("/")
    store_layers = [i for i in range(len(view.layers)) if any(n.startswith(store_rel + "/") for n in view.names(i))]
    assert len(store_layers) >= 2
    for i in store_layers:
        by_name = {m.name.rstrip("/"): m for m in view.layers[i]}
        for d in (nix_rel, store_rel):
            assert d in by_name, f"layer {i} lacks the parent directory {d}"
            assert by_name[d].isdir() and by_name[d].mode == 0o755, (i, d, oct(by_name[d].mode))


def test_extra_commands_output_present(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "bb")
    spec = write_spec(
        tmp_path,
        {
            "name": "extra",
            "tag": "t",
            "contents": [str(tree)],
            "extraCommands": 'mkdir -p etc tmp data && echo "hello $SOURCE_DATE_EPOCH $(pwd -P | wc -c)" > etc/extra\n'
            "chmod 1777 tmp\nmkdir empty-dir",
            "config": {"Cmd": ["/bin/cat", "/etc/extra"]},
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    last = {m.name.rstrip("/"): m for m in view.layers[-1]}
    for name in ("etc/extra", "tmp", "data", "empty-dir"):
        assert name in last, f"{name} made by extraCommands is missing from the customisation layer"
    assert last["tmp"].mode == 0o1777
    with podman_store() as ps:
        image = ps.load(tmp_path / "img.tar")
        assert ps.run(image).startswith("hello 1 ")


def test_env_inherited_from_base_one_entry_per_key(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "bb")
    base_spec = write_spec(
        tmp_path,
        {
            "name": "parent",
            "tag": "base",
            "contents": [str(tree)],
            "config": {"Env": ["FROM_PARENT=true", "LAST_LAYER=parent", "PATH=/bin", "KEEP=a=b"], "User": "0:0"},
        },
        "base.json",
    )
    build(base_spec, tmp_path / "base.tar")
    child_spec = write_spec(
        tmp_path,
        {
            "name": "child",
            "tag": "t",
            "fromImage": str(tmp_path / "base.tar"),
            "extraCommands": "echo child > child",
            "config": {"Env": ["LAST_LAYER=child", "NEW=1", "PATH=/bin:/usr/bin"], "Cmd": ["/bin/env"]},
        },
        "child.json",
    )
    build(child_spec, tmp_path / "child.tar")
    view = read_image(tmp_path / "child.tar", tmp_path / "view")
    env = view.config["config"]["Env"]
    keys = [e.split("=", 1)[0] for e in env]
    assert sorted(keys) == sorted(set(keys)), f"a key appears twice: {env}"
    assert dict(e.split("=", 1) for e in env) == {
        "FROM_PARENT": "true",
        "LAST_LAYER": "child",
        "PATH": "/bin:/usr/bin",
        "KEEP": "a=b",
        "NEW": "1",
    }
    assert view.config["config"]["User"] == "0:0", "other base config keys are inherited too"
    with podman_store() as ps:
        out = ps.run(ps.load(tmp_path / "child.tar"))
    lines = out.splitlines()
    assert "FROM_PARENT=true" in lines and "LAST_LAYER=child" in lines
    assert sum(1 for line in lines if line.startswith("LAST_LAYER=")) == 1


def _store_and_busybox_spec(tmp_path: Path, store: FakeStore, paths: dict[str, Path], **extra: object) -> Path:
    tree = busybox_tree(tmp_path / "bb")
    return write_spec(
        tmp_path,
        {
            "name": "layers",
            "tag": "t",
            "storeDir": str(store.dir),
            "contents": [str(tree), str(paths["hello"]), str(paths["coreutils"]), str(paths["data"])],
            "config": {"Cmd": ["/bin/sh", "-c", f"cat {paths['hello']}/share/man/man1/hello.1; ls /bin/hello"]},
            **extra,
        },
    )


def test_two_layer_image_loads(tmp_path: Path, store: FakeStore) -> None:
    paths = closure_store(store)
    spec = _store_and_busybox_spec(tmp_path, store, paths, maxLayers=2)
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert len(view.layers) == 2
    assert len(view.config["rootfs"]["diff_ids"]) == 2
    assert len(view.config["history"]) == 2
    _assert_closure_complete(view, paths.values())
    with podman_store() as ps:
        assert ps.run(ps.load(tmp_path / "img.tar")) == "man/bin/hello\n"


def _assert_closure_complete(view, tops) -> None:  # type: ignore[no-untyped-def]
    have = view.all_names()
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            for n in [*dirnames, *filenames, ""]:
                rel = os.path.join(dirpath, n).rstrip("/").lstrip("/")
                assert rel in have, f"{rel} is in no layer"


@pytest.mark.parametrize("max_layers", [3, 4, 5, 100])
def test_bulk_layer_misses_nothing(tmp_path: Path, store: FakeStore, max_layers: int) -> None:
    """Many store paths, few layers: the leftovers share a bulk layer and every file of every path of
    the closure is in some layer, exactly once."""
    deps = [store.add(f"dep{i:02d}", {f"lib/libdep{i}.so": b"x" * (100 * (i + 1))}) for i in range(14)]
    mids = [store.add(f"mid{i}", {f"bin/mid{i}": b"m" * 50}, refs=deps[i::3]) for i in range(3)]
    top = store.add("top", {"bin/top": "top"}, refs=mids)
    spec = write_spec(
        tmp_path,
        {"name": "bulk", "tag": "t", "contents": [str(top)], "storeDir": str(store.dir), "maxLayers": max_layers},
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    total = 1 + len(deps) + len(mids) + 1  # each store path could have its own layer, + customisation
    assert len(view.layers) == min(max_layers, total)
    _assert_closure_complete(view, [*deps, *mids, top])
    store_rel = str(store.dir).lstrip("/")
    files = [m.name for members in view.layers for m in members if m.name.startswith(store_rel + "/") and not m.isdir()]
    assert len(files) == len(set(files)), "a store file is in two layers"
    # The customisation layer links the top path's contents into /.
    last = {m.name: m for m in view.layers[-1]}
    assert last["bin/top"].issym() and last["bin/top"].linkname == f"{top}/bin/top"


@pytest.mark.parametrize("max_layers", [4, 5, 7])
def test_bulk_layer_with_base_respects_max_layers(tmp_path: Path, store: FakeStore, max_layers: int) -> None:
    tree = busybox_tree(tmp_path / "bb")
    etc = tmp_path / "etc-tree" / "etc"
    etc.mkdir(parents=True)
    (etc / "motd").write_text("base\n")
    base = write_spec(tmp_path, {"name": "base", "tag": "b", "contents": [str(tree), str(etc.parent)]}, "base.json")
    build(base, tmp_path / "base.tar")
    assert len(read_image(tmp_path / "base.tar", tmp_path / "bview").layers) == 3  # 2 trees + customisation
    paths = closure_store(store)
    spec = write_spec(
        tmp_path,
        {
            "name": "onbase",
            "tag": "t",
            "fromImage": str(tmp_path / "base.tar"),
            "storeDir": str(store.dir),
            "maxLayers": max_layers,
            "contents": [str(paths["hello"]), str(paths["coreutils"]), str(paths["data"])],
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert len(view.layers) == max_layers
    _assert_closure_complete(view, paths.values())


def test_too_few_layers_for_the_base_is_a_spec_error(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "bb")
    base = write_spec(tmp_path, {"name": "base", "tag": "b", "contents": [str(tree)]}, "base.json")
    build(base, tmp_path / "base.tar")  # 2 layers
    spec = write_spec(tmp_path, {"name": "x", "fromImage": str(tmp_path / "base.tar"), "maxLayers": 2})
    proc = build(spec, tmp_path / "img.tar", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "maxLayers" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "img.tar").exists()
    # Exactly base + customisation layer fits.
    spec3 = write_spec(
        tmp_path,
        {"name": "x", "fromImage": str(tmp_path / "base.tar"), "maxLayers": 3, "contents": [str(tmp_path / "bb")]},
        "three.json",
    )
    build(spec3, tmp_path / "img3.tar")
    view = read_image(tmp_path / "img3.tar", tmp_path / "view")
    assert len(view.layers) == 3
    assert "bin/busybox" in view.names(2)


def test_store_symlink_is_not_dereferenced(tmp_path: Path, store: FakeStore) -> None:
    target = store.add("target", {"dir/target": "Content doesn't matter.\n"})
    link = store.add_symlink("symlink", target)
    tree = busybox_tree(tmp_path / "bb")
    spec = write_spec(
        tmp_path,
        {
            "name": "storesymlink",
            "tag": "t",
            "storeDir": str(store.dir),
            "contents": [str(tree), str(link)],
            "config": {"Cmd": ["/bin/sh", "-c", f"test -L {link} && readlink {link} && cat {link}/dir/target"]},
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    [(_, member)] = view.find(str(link))
    assert member.issym() and member.linkname == str(target)
    assert view.find(f"{target}/dir/target"), "the symlink's target is part of the closure"
    with podman_store() as ps:
        assert ps.run(ps.load(tmp_path / "img.tar")) == f"{target}\nContent doesn't matter.\n"


def test_symlink_inside_content_is_kept(tmp_path: Path, store: FakeStore) -> None:
    """A symlink inside a content tree pointing out of it stays a symlink (never followed)."""
    secret = tmp_path / "outside-secret"
    secret.write_text("must not be copied\n")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "leak").symlink_to(secret)
    (tree / "etc" / "dirlink").symlink_to(tmp_path)
    spec = write_spec(tmp_path, {"name": "links", "tag": "t", "contents": [str(tree)]})
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    [(_, leak)] = view.find("etc/leak")
    assert leak.issym() and leak.linkname == str(secret)
    [(_, dlink)] = view.find("etc/dirlink")
    assert dlink.issym()
    assert not any(n.endswith("outside-secret") for n in view.all_names())


def test_registry_prefixed_name(tmp_path: Path) -> None:
    tree = busybox_tree(tmp_path / "bb")
    spec = write_spec(
        tmp_path,
        {
            "name": "Registry.Example.com:5000/Team/App",
            "tag": "v1.2",
            "contents": [str(tree)],
            "config": {"Cmd": ["/bin/id", "-u"]},
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert view.manifest[0]["RepoTags"] == ["Registry.Example.com:5000/team/app:v1.2"]
    with podman_store() as ps:
        image = ps.load(tmp_path / "img.tar")
        assert image.lower() == "registry.example.com:5000/team/app:v1.2"
        assert ps.run(image) == "0\n"


def test_architecture_arm64(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("hi\n")
    spec = write_spec(
        tmp_path, {"name": "arm", "tag": "t", "contents": [str(tree)], "architecture": "arm64", "compressor": "none"}
    )  # skopeo 1.9 cannot read compressed archives
    build(spec, tmp_path / "img.tar")
    info = skopeo_inspect(f"docker-archive:{tmp_path / 'img.tar'}", "--override-arch", "arm64")
    assert info["Architecture"] == "arm64" and info["Os"] == "linux"
    build(spec, f"oci:{tmp_path / 'layout'}:t")
    info = skopeo_inspect(f"oci:{tmp_path / 'layout'}:t", "--config")
    assert info["architecture"] == "arm64"


def test_bare_paths_in_contents(tmp_path: Path, store: FakeStore) -> None:
    """contents mixing a store path and a plain directory relative to the spec (dockerTools' ./test-dir),
    and a single path given without a list."""
    paths = closure_store(store)
    (tmp_path / "test-dir").mkdir()
    (tmp_path / "test-dir" / "hello.txt").write_text("hello\n")
    spec = write_spec(
        tmp_path,
        {"name": "bare", "tag": "t", "storeDir": str(store.dir), "contents": ["./test-dir", str(paths["hello"])]},
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert view.find("hello.txt") and view.find("bin/hello")
    single = write_spec(tmp_path, {"name": "bare", "tag": "t", "contents": "test-dir"}, "single.json")
    build(single, tmp_path / "single.tar")
    assert read_image(tmp_path / "single.tar", tmp_path / "view2").find("hello.txt")


def test_no_store_paths(tmp_path: Path, store: FakeStore) -> None:
    paths = closure_store(store)
    tree = busybox_tree(tmp_path / "bb")
    spec = write_spec(
        tmp_path,
        {
            "name": "nostore",
            "tag": "t",
            "storeDir": str(store.dir),
            "contents": [str(tree), str(paths["hello"])],
            "includeStorePaths": False,
            "config": {"Cmd": ["/bin/ls", "/"]},
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    store_rel = str(store.dir).lstrip("/")
    assert not [n for n in view.all_names() if n.startswith(store_rel)], "store paths left in"
    assert len(view.layers) == 2


def test_store_paths_named_in_config_are_pulled_in(tmp_path: Path, store: FakeStore) -> None:
    paths = closure_store(store)
    spec = write_spec(
        tmp_path,
        {
            "name": "cfg",
            "tag": "t",
            "storeDir": str(store.dir),
            "config": {"Entrypoint": [f"{paths['hello']}/bin/hello"], "Env": [f"BASH={paths['coreutils']}/bin/ls"]},
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    _assert_closure_complete(view, [paths[k] for k in ("hello", "bash", "glibc", "coreutils")])
    assert not view.find(str(paths["data"]))


def test_layered_image_json_result_matches_archive(tmp_path: Path, store: FakeStore) -> None:
    paths = closure_store(store)
    spec = _store_and_busybox_spec(tmp_path, store, paths)
    proc = run_nsbuild(["layered", str(spec), "-o", str(tmp_path / "img.tar"), "--no-cache", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert [entry["diff_id"] for entry in result["layers"]] == view.config["rootfs"]["diff_ids"]
    assert result["name"] == "layers" and result["tag"] == "t"
    assert result["image_digest"].startswith("sha256:") and result["config_digest"].startswith("sha256:")


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("2020-01-01T00:00:00+02:00", "2019-12-31T22:00:00Z"),
        ("2020-01-01", "2020-01-01T00:00:00Z"),
        ("2020-06-01T12:30:00.75Z", "2020-06-01T12:30:00Z"),
        ("2020-06-01T12:30:00", "2020-06-01T12:30:00Z"),  # no zone: UTC, whatever TZ says
    ],
)
def test_date_forms_do_not_depend_on_tz(tmp_path: Path, written: str, expected: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("f")
    spec = write_spec(
        tmp_path, {"name": "dates", "tag": "t", "contents": [str(tree)], "created": written, "mtime": written}
    )
    epoch = int(datetime.fromisoformat(expected.replace("Z", "+00:00")).timestamp())
    for tz in ("Asia/Tokyo", "America/Los_Angeles"):
        build(spec, tmp_path / f"{tz.replace('/', '-')}.tar", tz=tz)
        view = read_image(tmp_path / f"{tz.replace('/', '-')}.tar", tmp_path / f"view-{tz.replace('/', '-')}")
        assert view.config["created"] == expected
        assert {m.mtime for members in view.layers for m in members} == {epoch}


def test_many_store_paths_fill_max_layers(tmp_path: Path, store: FakeStore) -> None:
    """More paths than the layer limit: exactly maxLayers (125, the most Docker/overlay take) layers, all
    of them unpacked by umoci."""
    paths = [store.add(f"pkg{i:03d}", {f"share/pkg{i}": b"p" * (i + 1)}) for i in range(140)]
    tree = busybox_tree(tmp_path / "bb")
    spec = write_spec(
        tmp_path,
        {
            "name": "many",
            "tag": "t",
            "storeDir": str(store.dir),
            "maxLayers": 125,
            "contents": [str(tree), *map(str, paths)],
            "config": {"Cmd": ["/bin/sh", "-c", "ls /share | wc -l"]},
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert len(view.layers) == 125
    _assert_closure_complete(view, paths)
    # skopeo + umoci rather than podman: a vfs store copies the whole tree once per layer (~15 s here).
    layout = to_gzip_oci(f"docker-archive:{tmp_path / 'img.tar'}", tmp_path / "layout", "t")
    umoci_unpack(layout, "t", tmp_path / "bundle")
    assert len(list((tmp_path / "bundle" / "rootfs" / "share").iterdir())) == 140


def test_image_with_nothing_in_it(tmp_path: Path) -> None:
    """Only a name: one (empty) customisation layer; the clients still take it."""
    spec = write_spec(tmp_path, {"name": "empty"})
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert len(view.layers) == 1 and view.layers[0] == []
    layout = to_gzip_oci(f"docker-archive:{tmp_path / 'img.tar'}", tmp_path / "layout", "t")
    umoci_unpack(layout, "t", tmp_path / "bundle")
    with podman_store() as ps:
        ps.load(tmp_path / "img.tar")


def test_extra_commands_environment(unprivileged_user: str | None, user_tmp) -> None:  # type: ignore[no-untyped-def]
    """extraCommands: bash -e as the calling user, cwd = the customisation layer's root, a clean
    environment (nothing of the caller's leaks in), SOURCE_DATE_EPOCH = mtime."""
    from support import account

    work = user_tmp(unprivileged_user)
    spec = write_spec(
        work,
        {
            "name": "env",
            "tag": "t",
            "mtime": "2001-02-03T04:05:06Z",
            "extraCommands": "mkdir -p out\nenv | sort > out/env\nid -u > out/uid\n"
            "test -z \"$(ls -A | grep -v '^out$')\" && echo empty > out/cwd\n"
            "echo $- > out/flags",
        },
    )
    build(
        spec,
        work / "img.tar",
        user=unprivileged_user,
        env={"NSBUILD_LEAK_CHECK": "leaked", "HOME": "/nonexistent-home", "LC_ALL": "de_DE.UTF-8"},
    )
    view = read_image(work / "img.tar", work / "view")
    with tarfile.open(view.plain_paths[-1]) as tar:

        def text(name: str) -> str:
            f = tar.extractfile(name)
            assert f is not None
            return f.read().decode()

        env = dict(line.split("=", 1) for line in text("out/env").splitlines() if "=" in line)
        assert text("out/uid").strip() == str(account(unprivileged_user).uid)
        assert text("out/cwd").strip() == "empty"
        assert "e" in text("out/flags")
    assert "NSBUILD_LEAK_CHECK" not in env
    assert env["HOME"] != "/nonexistent-home" and env.get("LC_ALL") != "de_DE.UTF-8"
    assert env["SOURCE_DATE_EPOCH"] == "981173106"
