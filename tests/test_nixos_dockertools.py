"""nixpkgs' NixOS test `docker-tools` (nixos/tests/docker-tools.nix), ported subtest by subtest.

Each test is named after one subtest of that test and checks what it checks, on the image its example
(pkgs/build-support/docker/examples.nix) describes, re-expressed as an nsbuild spec over a fake store
(tests/support/dockertools_examples.py: `<hash>-name` paths, static busybox for bash/coreutils).
Everything runs as the unprivileged account nsbuild-test: the builds, and podman (rootless, one
throw-away store for the module) loading and running every image. Images are built once per module.

Subtests not ported, and why, are listed in NOT_PORTED at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import describe, make_user_tmp, remove_tree, run_nsbuild, skopeo_copy
from support.core import read_image, write_spec
from support.dockertools_examples import HELLO_OUTPUT, ExampleStore, Exe
from support.registry import remove_registry, start_registry
from support.verifiers import PodmanStore, podman_store

USER = "test"  # nsbuild-test: has subordinate ids, so rootless podman can hold images of several owners
RUN_QUIRKS = ("--pull=never", "--network=none", "--runtime", "runc")
FOREIGN_ARCH = "arm64"  # the suite runs on amd64 (the NixOS test picks the other architecture too)


@dataclass
class Built:
    archive: Path
    result: dict[str, Any] | None  # nsbuild's --json result (None for `nsbuild stream`)
    spec: dict[str, Any]


class Examples:
    """Builds the examples on demand (each once) as nsbuild-test and loads them into one podman store."""

    def __init__(self, work: Path, store: ExampleStore, podman: PodmanStore) -> None:
        self.work = work
        self.store = store
        self.podman = podman
        self.extra: dict[str, Any] = {}  # module-level fixtures the examples need (the registry)
        self._built: dict[str, Built] = {}
        self._loaded: dict[str, str] = {}

    def build(self, key: str) -> Built:
        if key not in self._built:
            kind, spec = EXAMPLES[key](self)
            self._built[key] = self._build(key, kind, spec)
        return self._built[key]

    def _build(self, key: str, kind: str, spec: dict[str, Any], user: str = USER, out_dir: Path | None = None) -> Built:
        spec_path = write_spec(self.work, spec, f"{key}.json")
        out = (out_dir or self.work) / f"{key}.tar"
        if kind == "stream":
            proc = run_nsbuild(["stream", spec_path, "-q", "--no-cache"], user, text=False)
            if proc.returncode != 0:
                raise AssertionError(describe(proc))
            out.write_bytes(proc.stdout)
            return Built(out, None, spec)
        proc = run_nsbuild([kind, spec_path, "-o", out, "-q", "--no-cache", "--json"], user)
        if proc.returncode != 0:
            raise AssertionError(describe(proc))
        return Built(out, json.loads(proc.stdout), spec)

    def rebuild_as(self, key: str, user: str, out_dir: Path) -> Built:
        """The example built again, by another account, into out_dir (which that account owns)."""
        self.build(key)
        kind, spec = EXAMPLES[key](self)
        return self._build(key, kind, spec, user, out_dir)

    def load(self, key: str) -> str:
        """The podman image id of the example, loaded into the module's store. (An id, not the name:
        several examples share a name, as in the NixOS test, and a later load takes the name over.)"""
        if key not in self._loaded:
            name = self.podman.load(self.build(key).archive)
            self._loaded[key] = self.podman.podman("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
        return self._loaded[key]

    def run(
        self, key: str, cmd: Sequence[str] = (), run_args: Sequence[str] = (), check: bool = True
    ) -> subprocess.CompletedProcess:
        proc = self.podman.podman("run", "--rm", *RUN_QUIRKS, *run_args, self.load(key), *cmd, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(describe(proc))
        return proc

    def inspect(self, key: str) -> dict[str, Any]:
        return json.loads(self.podman.podman("image", "inspect", self.load(key)).stdout)[0]

    def flat_names(self, key: str) -> list[str]:
        """The image's file system as one tree (`podman export` of a container made from it)."""
        ctr = self.podman.podman("create", "--pull=never", "--network=none", self.load(key), "/none").stdout.strip()
        try:
            exported = self.work / f"{key}.export.tar"
            self.podman.podman("export", "-o", exported, ctr)
            with tarfile.open(exported) as tar:
                return tar.getnames()
        finally:
            self.podman.podman("rm", "-f", ctr, check=False)


@pytest.fixture(scope="module")
def ex() -> Any:
    work = make_user_tmp(USER, prefix="nsbuild-nixos-")
    try:
        store = ExampleStore(work / "fake")
        with podman_store(USER) as podman:
            yield Examples(work, store, podman)
    finally:
        remove_tree(work, USER)


@pytest.fixture(scope="module")
def registry_host(ex: Examples) -> Any:
    reg = start_registry()
    try:
        ex.extra["registry"] = reg.host
        yield reg.host
    finally:
        remove_registry(reg)


def env_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return proc.stdout.splitlines()


# --- the examples, as nsbuild specs ----------------------------------------------------------------------
# Each returns (nsbuild command, spec). `s` is the fake store; paths are absolute host paths.

Spec = tuple[str, dict[str, Any]]


def _hello_on_root(e: Examples, **extra: Any) -> Spec:
    s = e.store
    root = s.once("hello-root", lambda: s.env("hello-root", [s.hello], links=("bin", "share")))
    return "stream", {
        "name": "hello",
        "tag": "latest",
        "storeDir": str(s.dir),
        "contents": [str(root)],
        "config": {"Cmd": ["hello"]},
        **extra,
    }


def _bash_image(e: Examples, name: str, tag: str | None = "latest") -> Spec:
    s = e.store
    root = s.once("image-root-bash", lambda: s.env("image-root", [s.bash]))
    spec: dict[str, Any] = {"name": name, "storeDir": str(s.dir), "copyToRoot": [str(root)]}
    if tag is not None:
        spec["tag"] = tag
    return "image", spec


def _coreutils_root(s: ExampleStore) -> str:
    return str(s.once("image-root-coreutils", lambda: s.env("image-root", [s.coreutils])))


def _nix_env(s: ExampleStore) -> dict[str, Any]:
    return {"storeDir": str(s.dir), "config": {"Env": ["NIX_PAGER=cat", "USER=nobody"]}}


def _nix_image(e: Examples) -> Spec:
    s = e.store
    root = s.once("image-root-nix", lambda: s.env("image-root", [s.coreutils, s.nix, s.bash]))
    return "image", {"name": "nix", "tag": "latest", "copyToRoot": [str(root)], "includeNixDB": True, **_nix_env(s)}


def _nix_layered(e: Examples) -> Spec:
    s = e.store
    return "layered", {
        "name": "nix-layered",
        "tag": "latest",
        "includeNixDB": True,
        "contents": [str(s.coreutils), str(s.nix), str(s.bash)],
        **_nix_env(s),
    }


def _layered_image(e: Examples) -> Spec:
    s = e.store
    return "layered", {
        "name": "layered-image",
        "tag": "latest",
        "storeDir": str(s.dir),
        "config": {"Cmd": [f"{s.hello}/bin/hello"]},
        "contents": [str(s.hello), str(s.bash), str(s.coreutils)],
        "extraCommands": 'echo "(extraCommand)" > extraCommands',
    }


def _on_top_of_layered(e: Examples, kind: str, name: str) -> Spec:
    s = e.store
    return kind, {
        "name": name,
        "tag": "latest",
        "storeDir": str(s.dir),
        "fromImage": str(e.build("layered-image").archive),
        "extraCommands": "mkdir ./example-output\nchmod 777 ./example-output",
        "config": {
            "Env": [f"PATH={s.coreutils}/bin/"],
            "WorkingDir": "/example-output",
            "Cmd": [f"{s.bash}/bin/bash", "-c", "echo hello > foo; cat foo"],
        },
    }


def _layers_order(e: Examples, n: int) -> Spec:
    """l1 writes tmp/layer1..3, l2 (on l1) rewrites tmp/layer2..3, l3 (on l2) rewrites tmp/layer3."""
    writes = "".join(f"echo layer{n} > tmp/layer{i}\n" for i in range(n, 4))
    spec: dict[str, Any] = {"name": f"l{n}", "tag": "latest", "extraCommands": "mkdir -p tmp\n" + writes}
    if n > 1:
        spec["fromImage"] = str(e.build(f"layers-order-{n - 1}").archive)
    if n == 3:
        spec.update(storeDir=str(e.store.dir), copyToRoot=[_coreutils_root(e.store)])
    return "image", spec


def _unpack_order(e: Examples, letter: str) -> Spec:
    s = e.store
    spec: dict[str, Any] = {
        "name": f"layers-unpack-order-{letter}",
        "tag": "latest",
        "storeDir": str(s.dir),
        "copyToRoot": [_coreutils_root(s)],
        "runAsRoot": f'#!{s.bash}/bin/bash\necho -n "{letter}" >> /layer-order\n',
    }
    if letter != "a":
        spec["fromImage"] = str(e.build(f"layers-unpack-order-{chr(ord(letter) - 1)}").archive)
    return "image", spec


def _repeated_layer_base(e: Examples) -> Spec:
    """An empty image on top of an empty image: its two layers are the same (empty) tar."""
    return "image", {
        "name": "empty-twice",
        "tag": "latest",
        "compressor": "none",
        "fromImage": str(e.build("empty").archive),
    }


def _env_child(e: Examples, kind: str) -> Spec:
    s = e.store
    spec: dict[str, Any] = {
        "name": "child",
        "tag": "latest",
        "storeDir": str(s.dir),
        "fromImage": str(e.build("env-parent").archive),
        "config": {"Env": ["FROM_CHILD=true", "LAST_LAYER=child"]},
    }
    if kind == "image":
        spec["copyToRoot"] = [_coreutils_root(s)]
    else:
        spec["contents"] = [str(s.coreutils)]
    return kind, spec


def _two_layered(e: Examples) -> Spec:
    s = e.store
    return "layered", {
        "name": "two-layered-image",
        "tag": "latest",
        "storeDir": str(s.dir),
        "maxLayers": 2,
        "config": {"Cmd": [f"{s.hello}/bin/hello"]},
        "contents": [str(s.bash), str(s.hello)],
    }


def _bulk(e: Examples, base: bool) -> Spec:
    s = e.store
    spec: dict[str, Any] = {
        "name": "layered-bulk-layer" if base else "bulk-layer",
        "tag": "latest",
        "storeDir": str(s.dir),
        "contents": [str(s.coreutils), str(s.hello)],
        "maxLayers": 4 if base else 2,
    }
    if base:
        spec["fromImage"] = str(e.build("two-layered-image").archive)
    return "layered", spec


def _no_store_paths(e: Examples) -> Spec:
    s = e.store
    # Copies busybox's tree into / (its applet links name its store path), and runs a program from the
    # store while building: a build-time dependency only.
    return "layered", {
        "name": "no-store-paths",
        "tag": "latest",
        "storeDir": str(s.dir),
        "extraCommands": f"cp -r {s.busybox}/* .\nchmod -R u+w .\n{s.hello}/bin/hello\n",
    }


def _files_in_store(e: Examples) -> Spec:
    s = e.store
    data = s.once("somefile", lambda: s.add_text("somefile", "some data"))
    script = s.once("myscript", lambda: s.add("myscript", {"bin/myscript": Exe(f"#!{s.bash}/bin/bash\ncat {data}\n")}))
    return "layered", {
        "name": "file-in-store",
        "tag": "latest",
        "storeDir": str(s.dir),
        "includeNixDB": True,
        "contents": [str(s.coreutils), str(s.nix), str(script)],
        "config": {"Cmd": ["myscript"], "Env": ["USER=root"]},
    }


def _cross(e: Examples) -> Spec:
    s = e.store
    root = s.once("image-root-hello", lambda: s.env("image-root", [s.hello]))
    return "image", {
        "name": "hello-cross",
        "tag": "latest",
        "storeDir": str(s.dir),
        "copyToRoot": [str(root)],
        "architecture": FOREIGN_ARCH,
    }


def _store_symlink(e: Examples) -> Spec:
    s = e.store
    target = s.text_dir("target", "dir/target", "Content doesn't matter.")
    link = s.once("symlink", lambda: s.add_link("symlink", target))
    return "layered", {
        "name": "layeredstoresymlink",
        "tag": "latest",
        "storeDir": str(s.dir),
        "contents": [str(s.bash), str(link)],
    }


def _prefixed(e: Examples, kind: str) -> Spec:
    s = e.store
    name = "registry-1.docker.io/image" if kind == "image" else "registry-1.docker.io/layered-image"
    return kind, {"name": name, "tag": "latest", "storeDir": str(s.dir), "config": {"Cmd": [f"{s.hello}/bin/hello"]}}


def _fake_root_commands(e: Examples) -> Spec:
    s = e.store
    # A hello of its own, named nowhere else, so that only the script's symlink can bring it in.
    unique = s.hello_named("hello-fakeroot-2.12.1", "layeredImageWithFakeRootCommands-hello")
    return "layered", {
        "name": "layered-image-with-fake-root-commands",
        "tag": "latest",
        "storeDir": str(s.dir),
        "contents": [str(s.busybox)],
        "fakeRootCommands": f"mkdir -p ./home/alice\nchown 1000 ./home/alice\nln -s {unique} ./hello\n",
    }


def _via_fakechroot(e: Examples) -> Spec:
    s = e.store
    return "stream", {
        "name": "image-via-fake-chroot",
        "tag": "latest",
        "storeDir": str(s.dir),
        "config": {"Cmd": ["hello"]},
        "enableFakechroot": True,
        "fakeRootCommands": f"mkdir /bin\nln -s {s.hello}/bin/hello /bin/hello\n",
    }


def _dummy_tree(e: Examples) -> str:
    d = e.work / "test-dummy"
    if not d.exists():
        d.mkdir()
        (d / "hello.txt").write_text("Hello there!\n")
        (d / "hello.txt").chmod(0o644)
    return str(d)


def _with_path(e: Examples, kind: str, arch: str | None = None) -> Spec:
    s = e.store
    base = {"image": "build-image", "stream": "layered-image"}[kind]
    name = f"{base}-with-architecture" if arch else f"{base}-with-path"
    key = "copyToRoot" if kind == "image" else "contents"
    spec: dict[str, Any] = {"name": name, "tag": "latest", "storeDir": str(s.dir), key: [str(s.bash), _dummy_tree(e)]}
    if arch:
        spec["architecture"] = arch
    return kind, spec


def _etc(e: Examples) -> Spec:
    """NixOS's /etc activation in miniature: /etc/static -> a store tree, /etc/FILE -> /etc/static/FILE."""
    s = e.store
    tree = s.text_dir("etc", "etc/some-config-file", "127.0.0.1 localhost\n::1 localhost\n")
    activate = s.once(
        "etc-activate",
        lambda: s.add_script(
            "etc-activate",
            f"#!{s.sh}\n{s.busybox}/bin/ln -s {tree}/etc /etc/static\n"
            f"{s.busybox}/bin/ln -s /etc/static/some-config-file /etc/\n",
        ),
    )
    cmd = s.once("etc-cmd", lambda: s.add_script("etc-cmd", f"#!{s.sh}\n{s.busybox}/bin/cat /etc/some-config-file\n"))
    return "stream", {
        "name": "etc",
        "tag": "latest",
        "storeDir": str(s.dir),
        "config": {"Cmd": [str(cmd)]},
        "enableFakechroot": True,
        "fakeRootCommands": f"mkdir -p /etc\n{activate}\n",
    }


def _certs(e: Examples) -> Spec:
    s = e.store
    root = s.once(
        "certs-root", lambda: s.env("image-with-certs-root", [s.coreutils, s.ca_certificates], links=("bin", "etc"))
    )
    return "image", {"name": "image-with-certs", "tag": "latest", "storeDir": str(s.dir), "copyToRoot": [str(root)]}


def _chown_test(e: Examples) -> Spec:
    s = e.store
    return "stream", {
        "name": "chown-test",
        "tag": "latest",
        "storeDir": str(s.dir),
        "enableFakechroot": True,
        "fakeRootCommands": "touch /testfile\nchown 12345:12345 /testfile\n",
        "config": {"Cmd": [f"{s.coreutils}/bin/stat", "-c", "%u:%g", "/testfile"]},
    }


def _non_root(e: Examples) -> Spec:
    s = e.store
    # User is numeric here: the example names "user", which no /etc/passwd of the image defines.
    return "stream", {
        "name": "non-root-test",
        "tag": "latest",
        "storeDir": str(s.dir),
        "uid": 1000,
        "gid": 1000,
        "uname": "user",
        "gname": "user",
        "config": {"User": "1000:1000", "Cmd": [f"{s.coreutils}/bin/stat", "-c", "%u:%g", f"{s.coreutils}/bin/stat"]},
    }


def _nginx(e: Examples) -> Spec:
    s = e.store
    webroot = s.text_dir("index.html", "index.html", "<html><body><h1>Hello from NGINX</h1></body></html>\n")
    nginx, conf = s.nginx(webroot)
    return "layered", {
        "name": "nginx-container",
        "tag": "latest",
        "storeDir": str(s.dir),
        "contents": [str(nginx), *map(str, s.shadow_setup("nginx", 999))],
        "extraCommands": "mkdir -p tmp/nginx_client_body\nmkdir -p var/log/nginx\n",
        "config": {"Cmd": ["nginx", "-c", str(conf)], "ExposedPorts": {"80/tcp": {}}},
    }


EXAMPLES: dict[str, Callable[[Examples], Spec]] = {
    "hello-on-root": _hello_on_root,
    "hello-on-root-no-store": lambda e: _hello_on_root(e, includeStorePaths=False),
    "hello-on-root-no-store-fakechroot": lambda e: _hello_on_root(e, includeStorePaths=False, enableFakechroot=True),
    "bash": lambda e: _bash_image(e, "bash"),
    "bash-no-tag": lambda e: (
        "image",
        {"name": "bash-no-tag", "storeDir": str(e.store.dir), "copyToRoot": [str(e.store.bash)]},
    ),
    "bash-no-tag-layered": lambda e: (
        "layered",
        {"name": "bash-no-tag-layered", "storeDir": str(e.store.dir), "contents": [str(e.store.bash)]},
    ),
    "bash-no-tag-stream-layered": lambda e: (
        "stream",
        {"name": "bash-no-tag-stream-layered", "storeDir": str(e.store.dir), "contents": [str(e.store.bash)]},
    ),
    "bash-layered-with-user": lambda e: (
        "layered",
        {
            "name": "bash-layered-with-user",
            "tag": "latest",
            "storeDir": str(e.store.dir),
            "contents": [str(e.store.bash), str(e.store.coreutils), *map(str, e.store.shadow_setup("somebody", 999))],
        },
    ),
    "nix": _nix_image,
    "nix-layered": _nix_layered,
    "nginx": _nginx,
    "on-top-of-pulled-image": lambda e: (
        "image",
        {
            "name": "ontopofpulledimage",
            "tag": "latest",
            "storeDir": str(e.store.dir),
            "fromImage": str(pulled_archive(e)),
            "copyToRoot": [str(e.store.once("image-root-hello", lambda: e.store.env("image-root", [e.store.hello])))],
        },
    ),
    "run-as-root-extra-commands": lambda e: (
        "image",
        {
            "name": "runasrootextracommands",
            "tag": "latest",
            "storeDir": str(e.store.dir),
            "copyToRoot": [_coreutils_root(e.store)],
            "runAsRoot": 'echo "(runAsRoot)" > runAsRoot',
            "extraCommands": 'echo "(extraCommand)" > extraCommands',
        },
    ),
    "unstable-date": lambda e: (
        "image",
        {
            "name": "unstable-date",
            "tag": "latest",
            "storeDir": str(e.store.dir),
            "copyToRoot": [_coreutils_root(e.store)],
            "created": "now",
        },
    ),
    "unstable-date-layered": lambda e: (
        "layered",
        {
            "name": "unstable-date-layered",
            "tag": "latest",
            "storeDir": str(e.store.dir),
            "contents": [str(e.store.coreutils)],
            "created": "now",
        },
    ),
    "layered-image": _layered_image,
    "layered-on-top": lambda e: _on_top_of_layered(e, "image", "layered-on-top"),
    "layered-on-top-layered": lambda e: _on_top_of_layered(e, "layered", "layered-on-top-layered"),
    "another-layered-image": lambda e: (
        "layered",
        {
            "name": "another-layered-image",
            "tag": "latest",
            "storeDir": str(e.store.dir),
            "config": {"Cmd": [f"{e.store.hello}/bin/hello"]},
        },
    ),
    "layers-order-1": lambda e: _layers_order(e, 1),
    "layers-order-2": lambda e: _layers_order(e, 2),
    "layers-order-3": lambda e: _layers_order(e, 3),
    "layers-unpack-order-a": lambda e: _unpack_order(e, "a"),
    "layers-unpack-order-b": lambda e: _unpack_order(e, "b"),
    "layers-unpack-order-c": lambda e: _unpack_order(e, "c"),
    "empty": lambda e: ("image", {"name": "empty", "tag": "latest", "compressor": "none"}),
    "empty-twice": _repeated_layer_base,
    "repeated-layer-test": lambda e: (
        "image",
        {
            "name": "repeated-layer-test",
            "tag": "latest",
            "storeDir": str(e.store.dir),
            "fromImage": str(repeated_layer_archive(e)),
            "copyToRoot": [str(e.store.bash)],
            "runAsRoot": "echo 'runAsRoot has run.'",
        },
    ),
    "env-parent": lambda e: (
        "image",
        {"name": "parent", "tag": "latest", "config": {"Env": ["FROM_PARENT=true", "LAST_LAYER=parent"]}},
    ),
    "env-child": lambda e: _env_child(e, "image"),
    "env-child-layered": lambda e: _env_child(e, "layered"),
    "two-layered-image": _two_layered,
    "bulk-layer": lambda e: _bulk(e, base=False),
    "layered-bulk-layer": lambda e: _bulk(e, base=True),
    "no-store-paths": _no_store_paths,
    "file-in-store": _files_in_store,
    "cross": _cross,
    "layered-store-symlink": _store_symlink,
    "prefixed-image": lambda e: _prefixed(e, "image"),
    "prefixed-layered-image": lambda e: _prefixed(e, "layered"),
    "fake-root-commands": _fake_root_commands,
    "image-via-fake-chroot": _via_fakechroot,
    "build-image-with-path": lambda e: _with_path(e, "image"),
    "layered-image-with-path": lambda e: _with_path(e, "stream"),
    "build-image-with-architecture": lambda e: _with_path(e, "image", FOREIGN_ARCH),
    "layered-image-with-architecture": lambda e: _with_path(e, "stream", FOREIGN_ARCH),
    "etc": _etc,
    "image-with-certs": _certs,
    "chown-test": _chown_test,
    "non-root-test": _non_root,
}


def pulled_archive(e: Examples) -> Path:
    """What pullImage gives: the registry's image as a docker-archive named nix:2.2.1."""
    out = e.work / "pulled-nix.tar"
    if not out.exists():
        host = e.extra["registry"]
        skopeo_copy(
            f"docker-archive:{e.build('nix').archive}",
            f"docker://{host}/nixos/nix:2.2.1",
            "--dest-tls-verify=false",
            user=USER,
        )
        skopeo_copy(
            f"docker://{host}/nixos/nix:2.2.1", f"docker-archive:{out}:nix:2.2.1", "--src-tls-verify=false", user=USER
        )
    return out


def repeated_layer_archive(e: Examples) -> Path:
    """A base whose manifest names one layer tar twice (as Docker can write, and dockerTools cannot)."""
    built = e.build("empty-twice").archive
    with tarfile.open(built) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    layers = manifest[0]["Layers"]
    assert len(layers) == 2 and layers[0] == layers[1], f"expected one layer file listed twice: {layers}"
    return built


# --- includeStorePath ------------------------------------------------------------------------------------


def test_includeStorePath_assumption(ex: Examples) -> None:
    """With the store paths in the image, the env's /bin/hello runs."""
    assert HELLO_OUTPUT in ex.run("hello-on-root").stdout


@pytest.mark.parametrize(
    "key", ["hello-on-root-no-store", "hello-on-root-no-store-fakechroot"], ids=["plain", "fakechroot"]
)
def test_includeStorePath_false_breaks_example(ex: Examples, key: str) -> None:
    """Without the store paths, /bin/hello is a link to nothing and the container fails."""
    proc = ex.run(key, check=False)
    assert proc.returncode != 0 and HELLO_OUTPUT not in proc.stdout, describe(proc)


@pytest.mark.parametrize(
    "key", ["hello-on-root-no-store", "hello-on-root-no-store-fakechroot"], ids=["plain", "fakechroot"]
)
def test_ensure_zero_paths_are_added_to_the_store(ex: Examples, key: str) -> None:
    store_rel = str(ex.store.dir).lstrip("/") + "/"
    names = ex.flat_names(key)
    assert any(n.lstrip("./").startswith("bin/hello") for n in names), names
    inside = [n for n in names if n.lstrip("./").startswith(store_rel)]
    assert inside == [], f"store entries in an image built with includeStorePaths false: {inside[:10]}"


@pytest.mark.parametrize(
    "key", ["hello-on-root-no-store", "hello-on-root-no-store-fakechroot"], ids=["plain", "fakechroot"]
)
def test_includeStorePath_false_works_with_mounted_store(ex: Examples, key: str) -> None:
    store = str(ex.store.dir)
    assert HELLO_OUTPUT in ex.run(key, run_args=["--volume", f"{store}:{store}:ro"]).stdout


# --- dates and tags --------------------------------------------------------------------------------------


def test_ensure_docker_images_use_a_stable_date_by_default(ex: Examples) -> None:
    assert ex.inspect("bash")["Created"].startswith("1970-01-01T00:00:01")
    # The same test then runs the image's bash and checks the tag the image was loaded under.
    assert "GNU bash" in ex.run("bash", ["bash", "--version"]).stdout
    assert "localhost/bash:latest" in ex.inspect("bash")["RepoTags"]


@pytest.mark.parametrize("key", ["bash-no-tag", "bash-no-tag-layered", "bash-no-tag-stream-layered", "nix-layered"])
def test_ensure_imageTag_attribute_matches_image(ex: Examples, key: str) -> None:
    """The tag an image is loaded under is the one the build reports (derived from the content when
    the spec has none: the first 32 hex digits of the config digest)."""
    built = ex.build(key)
    ex.load(key)
    with tarfile.open(built.archive) as tar:
        config_name = json.load(tar.extractfile("manifest.json"))[0]["Config"]  # type: ignore[arg-type]
    expected = built.spec.get("tag") or config_name.removesuffix(".json").removeprefix("sha256:")[:32]
    if built.result is not None:
        assert built.result["tag"] == expected
    tags = ex.podman.podman("images", "--format", "{{.Repository}} {{.Tag}}").stdout.splitlines()
    assert any(line.endswith(f"/{built.spec['name']} {expected}") for line in tags), (expected, tags)


def test_ensure_docker_images_can_use_an_unstable_date(ex: Examples) -> None:
    assert not ex.inspect("unstable-date")["Created"].startswith("1970-01-01T00:00:01")


def test_ensure_layered_docker_images_can_use_an_unstable_date(ex: Examples) -> None:
    assert not ex.inspect("unstable-date-layered")["Created"].startswith("1970-01-01T00:00:01")


# --- the Nix store in the image --------------------------------------------------------------------------


def test_layered_nix_store_has_correct_permissions_and_runs_as_non_root(ex: Examples) -> None:
    """Ensure (layered) nix store has correct permissions and that the container starts when its
    process does not have uid 0: the store and its parent are 0755, seen by `somebody` (uid 999)."""
    nix_dir, store = ex.store.dir.parent, ex.store.dir
    script = f'test 755 = "$(stat -c %a {nix_dir})" && test 755 = "$(stat -c %a {store})" && id -u'
    out = ex.run("bash-layered-with-user", [f"{ex.store.bash}/bin/bash", "-c", script], ["-u", "somebody"]).stdout
    assert out.strip() == "999"


@pytest.mark.parametrize("key", ["nix", "nix-layered"], ids=["image", "layered"])
def test_the_nix_binary_symlinks_are_intact(ex: Examples, key: str) -> None:
    """(The second case is the subtest "... when the image is layered".)"""
    nix = ex.store.nix
    script = f'test nix = "$(readlink {nix}/bin/nix-daemon)"'
    ex.run(key, [f"{ex.store.bash}/bin/bash", "-c", script])


def test_the_pullImage_tool_works(ex: Examples, registry_host: str) -> None:
    """An image that went through a registry and came back as pullImage's archive runs."""
    image = ex.podman.load(pulled_archive(ex))
    assert image.endswith("nix:2.2.1"), image
    out = ex.podman.podman("run", "--rm", *RUN_QUIRKS, image, "nix-store", "--version").stdout
    assert "nix (Nix)" in out


def test_a_pulled_image_can_be_used_as_base_image(ex: Examples, registry_host: str) -> None:
    assert HELLO_OUTPUT in ex.run("on-top-of-pulled-image", ["hello"]).stdout


# --- scripts ---------------------------------------------------------------------------------------------


def test_runAsRoot_and_entry_point_work(ex: Examples) -> None:
    """The nginx example (today a buildLayeredImage with its users from store paths): its entry point
    serves the page, as the nginx user. Checked from inside the container (no port publishing here)."""
    wget = f"{ex.store.busybox}/bin/wget"
    ctr = ex.podman.podman("run", "-d", *RUN_QUIRKS, ex.load("nginx")).stdout.strip()
    try:
        deadline = time.monotonic() + 60  # hang guard: the server is normally up at once
        while True:
            proc = ex.podman.podman("exec", ctr, wget, "-q", "-O-", "http://127.0.0.1:80/", check=False)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        logs = ex.podman.podman("logs", ctr, check=False)
        assert "Hello from NGINX" in proc.stdout, describe(proc) + "\n" + describe(logs)
        ps = ex.podman.podman("top", ctr, "user", "args", check=False).stdout
        assert re.search(r"^(nginx|999)\s+.*httpd", ps, re.M), ps
    finally:
        ex.podman.podman("rm", "-f", ctr, check=False)


def test_regression_test_for_issue_34779(ex: Examples) -> None:
    """Scripts with quotes and parentheses run as written, runAsRoot's and extraCommands' alike."""
    assert ex.run("run-as-root-extra-commands", ["cat", "extraCommands"]).stdout == "(extraCommand)\n"
    assert ex.run("run-as-root-extra-commands", ["cat", "runAsRoot"]).stdout == "(runAsRoot)\n"


def test_buildLayeredImage_supports_running_chown_with_fakeRootCommands(ex: Examples) -> None:
    assert ex.run("fake-root-commands", ["sh", "-c", "stat -c %u /home/alice"]).stdout.strip() == "1000"


def test_the_image_contains_store_paths_referenced_by_the_fakeRootCommands_output(ex: Examples) -> None:
    out = ex.run("fake-root-commands", ["/hello/bin/layeredImageWithFakeRootCommands-hello"]).stdout
    assert HELLO_OUTPUT in out


def test_layered_image_fakeRootCommands_with_fakechroot_works(ex: Examples) -> None:
    assert HELLO_OUTPUT in ex.run("image-via-fake-chroot").stdout


def test_etc(ex: Examples) -> None:
    assert "localhost" in ex.run("etc").stdout


def test_streamLayeredImage_chown_is_persistent_in_fakeRootCommands(ex: Examples) -> None:
    assert ex.run("chown-test").stdout == "12345:12345\n"


def test_streamLayeredImage_with_non_root_user(ex: Examples) -> None:
    """uid/gid own the image's entries, the store's included (the NixOS test runs the chown image
    here by mistake; this checks what the example sets up)."""
    assert ex.run("non-root-test").stdout == "1000:1000\n"


# --- layered images and their bases ----------------------------------------------------------------------


def test_ensure_layered_docker_images_work(ex: Examples) -> None:
    assert HELLO_OUTPUT in ex.run("layered-image").stdout
    assert ex.run("layered-image", ["cat", "extraCommands"]).stdout == "(extraCommand)\n"


def test_ensure_images_built_on_top_of_layered_docker_images_work(ex: Examples) -> None:
    assert ex.run("layered-on-top").stdout == "hello\n"


def test_ensure_layered_images_built_on_top_of_layered_docker_images_work(ex: Examples) -> None:
    assert ex.run("layered-on-top-layered").stdout == "hello\n"


def test_ensure_layers_are_shared_between_images(ex: Examples) -> None:
    one = set(ex.inspect("layered-image")["RootFS"]["Layers"])
    two = set(ex.inspect("another-layered-image")["RootFS"]["Layers"])
    assert one & two, (one, two)


def test_ensure_order_of_layers_is_correct(ex: Examples) -> None:
    for i in (1, 2, 3):
        assert ex.run("layers-order-3", ["cat", f"/tmp/layer{i}"]).stdout == f"layer{i}\n"


def test_ensure_layers_unpacked_in_correct_order_before_runAsRoot_runs(ex: Examples) -> None:
    assert ex.run("layers-unpack-order-c", ["cat", "/layer-order"]).stdout == "abc"


def test_ensure_repeated_base_layers_handled_by_buildImage(ex: Examples) -> None:
    ex.run("repeated-layer-test", ["/bin/bash", "-c", "exit 0"])


@pytest.mark.parametrize("key", ["env-child", "env-child-layered"], ids=["image", "layered"])
def test_ensure_environment_variables_are_correctly_inherited(ex: Examples, key: str) -> None:
    """(The second case is the subtest "... of layered images are correctly inherited".)"""
    env = env_lines(ex.run(key, ["env"]))
    assert "FROM_PARENT=true" in env, env
    assert "FROM_CHILD=true" in env, env
    assert "LAST_LAYER=child" in env, env


def test_ensure_inherited_environment_variables_of_layered_images_are_correctly_resolved(ex: Examples) -> None:
    view = read_image(ex.build("env-child-layered").archive, ex.work / "env-child-layered-view")
    env = view.config["config"]["Env"]
    assert sum(1 for e in env if e.startswith("LAST_LAYER=")) == 1, env


def test_ensure_image_with_only_2_layers_can_be_loaded(ex: Examples) -> None:
    assert len(ex.inspect("two-layered-image")["RootFS"]["Layers"]) == 2
    assert HELLO_OUTPUT in ex.run("two-layered-image").stdout


def test_ensure_the_bulk_layer_does_not_miss_store_paths(ex: Examples) -> None:
    """Regression test for nixpkgs#78744: both contents (ls and hello) are there with 2 layers."""
    assert ex.run("bulk-layer", ["ls", "/bin/hello"]).stdout.strip() == "/bin/hello"


def test_ensure_the_bulk_layer_with_a_base_image_respects_the_number_of_maxLayers(ex: Examples) -> None:
    assert ex.run("layered-bulk-layer", ["ls", "/bin/hello"]).stdout.strip() == "/bin/hello"
    assert len(ex.inspect("layered-bulk-layer")["RootFS"]["Layers"]) == 4


def test_ensure_only_minimal_paths_are_added_to_the_store(ex: Examples) -> None:
    """busybox copied into / refers to its own store path, which is then the image's only store path;
    the program the script ran (hello) is a build-time dependency and stays out."""
    ex.run("no-store-paths", ["ls", "/"])
    listing = ex.run("no-store-paths", ["ls", str(ex.store.dir)], check=False)
    assert listing.returncode == 0 and listing.stdout.split() == [ex.store.busybox.name], describe(listing)


def test_ensure_buildLayeredImage_does_not_change_store_path_contents(ex: Examples) -> None:
    """Nix in the container (the host's, see host_nix) finds every registered path's contents as
    registered; the store files are the host's byte for byte; the script reads its data file."""
    s = ex.store
    proc = ex.run("file-in-store", ["/usr/bin/nix-store", "--verify", "--check-contents"], host_nix(s.dir))
    assert "corrupt" not in proc.stderr and "modified" not in proc.stderr, describe(proc)
    # --verify passes on an empty database too: each path of the closure must be registered and intact.
    closure = [s.path_of("myscript"), s.path_of("somefile"), s.bash, s.busybox, s.coreutils, s.nix]
    ex.run("file-in-store", ["/usr/bin/nix-store", "--verify-path", *map(str, closure)], host_nix(s.dir))
    files = [s.path_of("somefile"), s.busybox / "bin" / "busybox", s.nix / "bin" / "nix"]
    out = ex.run("file-in-store", ["sha256sum", *map(str, files)]).stdout
    want = subprocess.run(["sha256sum", *map(str, files)], capture_output=True, text=True, check=True).stdout
    assert out == want
    assert "some data" in ex.run("file-in-store").stdout


def test_ensure_cross_compiled_image_can_be_loaded_and_has_correct_arch(ex: Examples) -> None:
    assert ex.inspect("cross")["Architecture"] == FOREIGN_ARCH


def test_buildLayeredImage_does_not_dereference_store_symlink_layers(ex: Examples) -> None:
    link = ex.store.path_of("symlink")
    ex.build("layered-store-symlink")
    ex.run("layered-store-symlink", ["bash", "-c", f"test -L {link} && test -f {link}/dir/target"])


@pytest.mark.parametrize("key", ["prefixed-image", "prefixed-layered-image"], ids=["buildImage", "buildLayeredImage"])
def test_supports_registry_prefix_in_image_name(ex: Examples, key: str) -> None:
    """buildImage / buildLayeredImage supports registry/ prefix in image name."""
    name = ex.build(key).spec["name"]
    ex.load(key)
    repos = ex.podman.podman("images", "--format", "{{.Repository}}").stdout.splitlines()
    assert name in repos, repos


@pytest.mark.parametrize(
    "key", ["build-image-with-path", "layered-image-with-path"], ids=["buildImage", "streamLayeredImage"]
)
def test_ensure_bare_paths_in_contents_are_loaded_correctly(ex: Examples, key: str) -> None:
    ex.run(key, ["bash", "-c", "test -e /hello.txt"])


@pytest.mark.parametrize(
    "key",
    ["build-image-with-architecture", "layered-image-with-architecture"],
    ids=["buildImage", "streamLayeredImage"],
)
def test_ensure_correct_architecture_is_present_in_manifests(ex: Examples, key: str) -> None:
    assert ex.inspect(key)["Architecture"] == FOREIGN_ARCH


def test_image_with_certs(ex: Examples) -> None:
    for path in (
        "/etc/ssl/certs/ca-bundle.crt",
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ):
        ex.run("image-with-certs", ["test", "-r", path])


def host_nix(store_dir: Path) -> list[str]:
    """podman run arguments lending the container the host's Nix (Debian's nix-bin, read-only, with
    the libraries it links) and pointing it at the image's store, which is not /nix/store here."""
    if not Path("/usr/bin/nix-store").exists():
        pytest.skip("nix-store is not installed (Debian's nix-bin; `make deps`)")
    mounts = ["--volume", "/usr:/usr:ro"]
    for d in ("/lib", "/lib64"):
        if Path(d).exists():
            mounts += ["--volume", f"{d}:{d}:ro"]
    return [*mounts, "--env", f"NIX_STORE_DIR={store_dir}", "--env", "NIX_STATE_DIR=/nix/var/nix"]


def test_check_nix_store_is_correctly_initialized_by_listing_dependencies_of_nix(ex: Examples) -> None:
    """Check if the nix store is correctly initialized by listing dependencies of the installed Nix
    binary. The image has no Nix of its own (our `nix` is a stand-in), so Nix comes from the host."""
    s = ex.store
    out = ex.run("nix", ["/usr/bin/nix-store", "-qR", str(s.nix)], host_nix(s.dir)).stdout
    assert sorted(out.split()) == sorted([str(s.nix), str(s.busybox)])


# Subtests of nixos/tests/docker-tools.nix that have no port here, and why.
NOT_PORTED = [
    ("Ensure docker load on merged images loads all of the constituent images", "nsbuild has no mergeImages"),
    (
        "Ensure docker load on merged images loads all of the constituent images (missing tags)",
        "nsbuild has no mergeImages",
    ),
    ("mergeImages preserves owners of the original images", "nsbuild has no mergeImages"),
    ("exportImage produces a valid tarball", "nsbuild has no exportImage"),
    ("buildNixShellImage: (all nine)", "nsbuild has no buildNixShellImage: it needs a derivation and Nix's stdenv"),
]


@pytest.mark.parametrize(
    "key",
    [
        "layered-image",
        "fake-root-commands",
        "nginx",
        "env-child",
        "non-root-test",
        "repeated-layer-test",
        "hello-on-root",
    ],
)
def test_examples_built_without_subordinate_ids_are_the_same_images(ex: Examples, key: str) -> None:
    """Not a subtest of the NixOS test: nsbuild-nosub (no subordinate ids, so another fakeRootCommands
    backend) builds the same bytes, so what podman showed above holds for that account too. (Rootless
    podman cannot hold these images as nsbuild-nosub: they have owners other than root.)"""
    out_dir = make_user_tmp("nosub", prefix="nsbuild-nixos-nosub-")
    try:
        again = ex.rebuild_as(key, "nosub", out_dir)
        assert again.archive.read_bytes() == ex.build(key).archive.read_bytes()
    finally:
        remove_tree(out_dir, "nosub")
