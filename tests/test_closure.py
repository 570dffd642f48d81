"""The image's store paths are the closure Nix computes (issue 12, "Closure exactly as Nix computes it").

A real Nix store is made once by Debian's nix-bin (as root, offline, builders are the static busybox,
no sandbox) in a directory of its own: `local?store=S/nix/store&state=S/nix/var/nix`, the layout
nsbuild looks for (the database beside the store directory). `nix-store -qR` is the oracle; nsbuild
itself runs as the unprivileged test accounts, which cannot write the database's directory (so the
database is read as an immutable file, the WAL being empty).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.core import read_image, write_spec
from support.users import describe, run_nsbuild
from support.verifiers import image_layers, podman_store

from nsbuild.errors import BuildError
from nsbuild.plan.closure import closure as store_closure
from nsbuild.plan.store import Store

NIX_STORE = shutil.which("nix-store")
pytestmark = pytest.mark.skipif(
    NIX_STORE is None or shutil.which("nix-build") is None,
    reason="nix-store/nix-build are not installed (Debian package nix-bin)",
)
BUSYBOX = "/bin/busybox"

# Each derivation runs `busybox sh -c SCRIPT`. Outputs refer to each other only through their inputs
# (what Nix scans for); `note` names `other` and `app` names lib's .drv without depending on them.
DERIVATIONS = r"""
let
  mk = name: script: env: derivation ({
    inherit name; system = builtins.currentSystem; builder = "@BUSYBOX@";
    args = [ "sh" "-c" ("export PATH=@BBDIR@; " + script) ];
  } // env);
  lib = mk "lib" "mkdir -p $out/lib; echo lib > $out/lib/libx" {};
  other = mk "other" "echo other > $out" {};
  note = mk "note" "echo $o > $out" { o = builtins.unsafeDiscardStringContext (toString other); };
  app = mk "app" ''
    mkdir -p $out/bin; echo "#!/bin/sh" > $out/bin/app; chmod +x $out/bin/app
    echo $lib/lib > $out/lib-path; ln -s $lib/lib $out/libdir; echo $d > $out/drv-note
  '' { inherit lib; d = builtins.unsafeDiscardStringContext lib.drvPath; };
  selfref = mk "selfref" "mkdir $out; echo $out > $out/me" {};
  hello = mk "hello" "mkdir -p $out/bin; echo $lib > $out/bin/hello" { inherit lib; };
  linkpkg = mk "linkpkg" "ln -s $app $out" { inherit app; };
  filepkg = mk "filepkg" "echo just-a-file > $out" {};
in { inherit lib other note app selfref hello linkpkg filepkg; }
"""
NAMES = ("lib", "other", "note", "app", "selfref", "hello", "linkpkg", "filepkg")


class NixStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "nix" / "store"
        self.uri = f"local?store={self.dir}&state={root}/nix/var/nix&log={root}/nix/var/log/nix"
        self.paths: dict[str, Path] = {}
        conf = root / "etc-nix"
        conf.mkdir()
        (conf / "nix.conf").write_text("build-users-group =\nsandbox = false\nsubstituters =\n")
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "NIX_CONF_DIR": str(conf), "USER": "root"}

    def nix(self, tool: str, *args: str, uri: str | None = None) -> str:
        proc = subprocess.run(
            [tool, "--store", uri or self.uri, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, describe(proc)
        return proc.stdout

    def closure(self, *names: str) -> set[str]:
        """`nix-store -qR`: the oracle, as entry names."""
        out = self.nix("nix-store", "-qR", *(str(self.paths[n]) for n in names))
        return {os.path.basename(p) for p in out.split()}

    def references(self, path: str, uri: str | None = None) -> set[str]:
        return {os.path.basename(p) for p in self.nix("nix-store", "-q", "--references", path, uri=uri).split()}


def _remove(path: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def nixstore() -> Iterator[NixStore]:
    root = Path(tempfile.mkdtemp(prefix="nsbuild-nixstore-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    try:
        store = NixStore(root)
        expr = root / "d.nix"
        expr.write_text(DERIVATIONS.replace("@BUSYBOX@", BUSYBOX).replace("@BBDIR@", str(root / "bb")))
        (root / "bb").mkdir()
        subprocess.run([BUSYBOX, "--install", "-s", str(root / "bb")], check=True)
        for name in NAMES:
            out = store.nix("nix-build", str(expr), "-A", name, "--no-out-link").split()
            store.paths[name] = Path(out[-1])
        yield store
    finally:
        _remove(root)


def _entries(store: NixStore, *names: str) -> list[str]:
    return [str(store.paths[n]) for n in names]


# --- the closure itself ------------------------------------------------------------------------------


def test_closure_equals_nix_store_qR(nixstore: NixStore) -> None:
    s = Store(str(nixstore.dir))
    for roots in (("app",), ("note",), ("selfref",), ("linkpkg",), ("hello",), ("app", "note", "hello")):
        got = store_closure(s, [nixstore.paths[n] for n in roots])
        assert set(got) == nixstore.closure(*roots), roots
    # What a scan would have added: the unrelated path named in a text, lib's .drv named in app.
    assert nixstore.paths["other"].name not in store_closure(s, [nixstore.paths["note"]])
    assert not any(n.endswith(".drv") for n in store_closure(s, [nixstore.paths["app"]]))
    assert any(n.endswith("-lib.drv") for n in os.listdir(nixstore.dir))  # the .drv is there to be found
    sp = store_closure(s, [nixstore.paths["selfref"]])[nixstore.paths["selfref"].name]
    assert sp.self_reference and not sp.references


def test_without_a_database_scanning_never_pulls_drv_files(nixstore: NixStore, tmp_path: Path) -> None:
    copy = tmp_path / "plain" / "store"  # the same entries, no database beside them
    copy.parent.mkdir()
    shutil.copytree(nixstore.dir, copy, symlinks=True)
    s = Store(str(copy))
    got = store_closure(s, [copy / nixstore.paths["app"].name])
    assert set(got) == nixstore.closure("app")  # the .drv named in app's drv-note is left out
    # A scan cannot tell a mention from a reference: the path named in note's text comes with it.
    assert set(store_closure(s, [copy / nixstore.paths["note"].name])) == {
        nixstore.paths["note"].name,
        nixstore.paths["other"].name,
    }


def _image_store_paths(image: Path, work: Path, store_dir: Path) -> dict[str, int]:
    """Store entries in the image → index of the layer holding them."""
    found = {}
    prefix = str(store_dir).strip("/") + "/"
    for i, layer in enumerate(image_layers(image, work)):
        with tarfile.open(layer) as tf:
            for m in tf:
                name = m.name.removeprefix("./")
                if name.startswith(prefix) and name[len(prefix) :]:
                    found.setdefault(name[len(prefix) :].split("/", 1)[0], i)
    return found


def test_layered_image_holds_exactly_the_nix_closure(nixstore: NixStore, unprivileged_user, user_tmp) -> None:
    work = user_tmp(unprivileged_user)
    spec = write_spec(
        work,
        {
            "name": "closure",
            "tag": "t",
            "storeDir": str(nixstore.dir),
            "contents": _entries(nixstore, "app", "note"),
            "config": {"Cmd": [f"{nixstore.paths['selfref']}/me"]},
        },
    )
    proc = run_nsbuild(["layered", spec, "-o", work / "img.tar", "--no-cache"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    got = _image_store_paths(work / "img.tar", work / "x", nixstore.dir)
    assert set(got) == nixstore.closure("app", "note", "selfref")


def test_include_nix_db_is_verified_by_nix_and_has_its_references(
    nixstore: NixStore, unprivileged_user, user_tmp
) -> None:
    work = user_tmp(unprivileged_user)
    spec = write_spec(
        work,
        {
            "name": "db",
            "tag": "t",
            "storeDir": str(nixstore.dir),
            "includeNixDB": True,
            "compressor": "none",
            "contents": _entries(nixstore, "app", "note", "selfref"),
        },
    )
    proc = run_nsbuild(["layered", spec, "-o", work / "img.tar", "--no-cache"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    rootfs = work / "rootfs"
    rootfs.mkdir()
    for layer in image_layers(work / "img.tar", work / "x"):
        subprocess.run(["tar", "-xf", layer, "-C", rootfs], check=True)
    uri = (
        f"local?store={nixstore.dir}&real={rootfs}{nixstore.dir}&state={rootfs}/nix/var/nix"
        f"&log={rootfs}/nix/var/log/nix"
    )
    proc = subprocess.run(
        [NIX_STORE, "--store", uri, "--verify", "--check-contents"],
        env=nixstore.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "checking store hashes" in proc.stderr, describe(proc)
    assert "was modified" not in proc.stderr and "invalid" not in proc.stderr, describe(proc)
    con = sqlite3.connect(f"file:{rootfs}/nix/var/nix/db/db.sqlite?mode=ro", uri=True)
    registered = sorted(os.path.basename(r[0]) for r in con.execute("select path from ValidPaths"))
    con.close()
    assert set(registered) == nixstore.closure("app", "note", "selfref")
    for name in registered:
        path = f"{nixstore.dir}/{name}"
        assert nixstore.references(path, uri) == nixstore.references(path), name
    assert nixstore.references(str(nixstore.paths["note"]), uri) == set()  # Nix's, not a scan's
    assert nixstore.references(str(nixstore.paths["selfref"]), uri) == {nixstore.paths["selfref"].name}


def test_unregistered_store_entry_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    (root / "nix" / "store").mkdir(parents=True)
    store = NixStore(root)
    f = tmp_path / "greeting"
    f.write_text("hi\n")
    added = Path(store.nix("nix-store", "--add", str(f)).strip())
    fake = store.dir / "0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r-handmade"
    fake.mkdir()
    (fake / "x").write_text(f"{added}\n")
    spec = write_spec(tmp_path, {"name": "x", "storeDir": str(store.dir), "contents": [str(fake)]})
    proc = run_nsbuild(["layered", spec, "-o", tmp_path / "img.tar", "--no-cache"])
    assert proc.returncode == 1, describe(proc)
    assert "not a valid path in the Nix database" in proc.stderr and str(fake) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "img.tar").exists()
    ok = write_spec(tmp_path, {"name": "x", "storeDir": str(store.dir), "contents": [str(added)]}, "ok.json")
    proc = run_nsbuild(["layered", ok, "-o", tmp_path / "ok.tar", "--no-cache"])
    assert proc.returncode == 0, describe(proc)


# --- what the scripts' output refers to ----------------------------------------------------------------


def test_store_paths_the_scripts_refer_to_are_in_the_image(nixstore: NixStore, unprivileged_user, user_tmp) -> None:
    work = user_tmp(unprivileged_user)
    hello, other = nixstore.paths["hello"], nixstore.paths["other"]
    spec = write_spec(
        work,
        {
            "name": "scripts",
            "tag": "t",
            "storeDir": str(nixstore.dir),
            "contents": [*_entries(nixstore, "note"), {"path": BUSYBOX, "target": "/bin/busybox"}],
            "extraCommands": f"ln -s {hello}/bin/hello ./hello",
            "fakeRootCommands": f"mkdir -p etc && echo {other} > etc/other-path && chown 0:0 etc/other-path",
        },
    )
    proc = run_nsbuild(["layered", spec, "-o", work / "img.tar", "--no-cache"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    got = _image_store_paths(work / "img.tar", work / "x", nixstore.dir)
    want = nixstore.closure("note", "hello", "other")
    assert set(got) == want
    n_layers = len(image_layers(work / "img.tar", work / "y"))
    assert all(i < n_layers - 1 for i in got.values()), "store paths belong in the store layers"
    view = read_image(work / "img.tar", work / "z")
    [(_, link)] = view.find("hello")
    assert link.issym() and link.linkname == f"{hello}/bin/hello"
    # A runtime follows the link into the store path the script named (and that one's closure).
    with podman_store() as ps:
        out = ps.run(ps.load(work / "img.tar"), ["/bin/busybox", "sh", "-c", "cat /hello; cat /etc/other-path"])
    assert out == f"{nixstore.paths['lib']}\n{other}\n"
    # extraCommands alone (no sandbox): the same.
    spec2 = write_spec(
        work,
        {"name": "scripts", "tag": "t", "storeDir": str(nixstore.dir), "extraCommands": f"echo {hello} > hello-path"},
        "two.json",
    )
    proc = run_nsbuild(["layered", spec2, "-o", work / "img2.tar", "--no-cache"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    assert set(_image_store_paths(work / "img2.tar", work / "x2", nixstore.dir)) == nixstore.closure("hello")


def test_script_reference_with_no_store_layer_left(nixstore: NixStore, unprivileged_user, user_tmp) -> None:
    """maxLayers = the base's layers + 1: everything new is in the customisation layer; extraCommands'
    references join it; fakeRootCommands', arriving after its layer is written, are a clear error."""
    work = user_tmp(unprivileged_user)
    (work / "tree").mkdir()
    (work / "tree" / "f").write_text("base\n")
    base = write_spec(work, {"name": "base", "tag": "t", "contents": [str(work / "tree")]}, "base.json")
    proc = run_nsbuild(["layered", base, "-o", work / "base.tar", "--no-cache"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    hello = nixstore.paths["hello"]
    common = {
        "name": "one",
        "tag": "t",
        "storeDir": str(nixstore.dir),
        "maxLayers": 3,
        "fromImage": str(work / "base.tar"),
    }
    spec = write_spec(work, {**common, "extraCommands": f"ln -s {hello}/bin/hello ./hello"})
    proc = run_nsbuild(["layered", spec, "-o", work / "img.tar", "--no-cache"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    got = _image_store_paths(work / "img.tar", work / "x", nixstore.dir)
    assert set(got) == nixstore.closure("hello") and set(got.values()) == {2}
    spec = write_spec(work, {**common, "fakeRootCommands": f"ln -s {hello}/bin/hello ./hello"}, "fr.json")
    proc = run_nsbuild(["layered", spec, "-o", work / "img2.tar", "--no-cache"], unprivileged_user)
    assert proc.returncode == 2, describe(proc)
    assert "maxLayers" in proc.stderr and "fakeRootCommands" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr and not (work / "img2.tar").exists()


# --- content paths that are links or files -------------------------------------------------------------


def test_content_symlink_to_a_store_directory_is_linked_into_root(nixstore: NixStore, user_tmp) -> None:
    work = user_tmp(None)
    link, single = nixstore.paths["linkpkg"], nixstore.paths["filepkg"]
    assert link.is_symlink() and not single.is_dir()
    spec = write_spec(
        work, {"name": "links", "tag": "t", "storeDir": str(nixstore.dir), "contents": [str(link), str(single)]}
    )
    proc = run_nsbuild(["layered", spec, "-o", work / "img.tar", "--no-cache"])
    assert proc.returncode == 0, describe(proc)
    view = read_image(work / "img.tar", work / "x")
    custom = {m.name: m for m in view.layers[-1]}
    assert custom["bin/app"].issym() and custom["bin/app"].linkname == f"{link}/bin/app"
    assert custom["lib-path"].linkname == f"{link}/lib-path"
    assert set(_image_store_paths(work / "img.tar", work / "y", nixstore.dir)) == nixstore.closure("linkpkg", "filepkg")
    # The single file: at its store path, and said so (never silently).
    assert f"contents: {single} is a single file" in proc.stderr
    assert "nothing is linked into /" in proc.stderr
    assert not any(json.dumps(n).find("just-a-file") >= 0 for n in custom)


# --- buildImage: one layer ---------------------------------------------------------------------------

BASE_EXTRA = "mkdir -p bin && for t in sh cat ls; do ln -s busybox bin/$t; done"


def test_build_image_scripts_references_are_in_its_layer(nixstore: NixStore, user_with_subids, user_tmp) -> None:
    """buildImage (`nsbuild image`): what extraCommands or runAsRoot's output names joins the one layer,
    with its closure; runAsRoot runs again over it (it sees the store in dockerTools' VM too)."""
    user = user_with_subids
    work = user_tmp(user)
    base = write_spec(
        work,
        {
            "name": "bb",
            "tag": "t",
            "compressor": "none",
            "extraCommands": BASE_EXTRA,
            "contents": [{"path": BUSYBOX, "target": "/bin/busybox"}],
        },
        "base.json",
    )
    proc = run_nsbuild(["layered", base, "-o", work / "base.tar", "--no-cache"], user)
    assert proc.returncode == 0, describe(proc)
    hello, selfref = nixstore.paths["hello"], nixstore.paths["selfref"]
    common = {
        "name": "one",
        "tag": "t",
        "storeDir": str(nixstore.dir),
        "compressor": "none",
        "fromImage": str(work / "base.tar"),
        "copyToRoot": [str(nixstore.paths["note"])],
    }
    spec = write_spec(
        work,
        {
            **common,
            "runAsRoot": f"mkdir -p /etc; echo {hello} > /etc/hello-path",
            "extraCommands": f"ln -s {selfref} ./selfref",
        },
        "rar.json",
    )
    proc = run_nsbuild(["image", spec, "-o", work / "img.tar"], user)
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr.count("running runAsRoot") == 2, describe(proc)  # again, with hello in the layer
    got = _image_store_paths(work / "img.tar", work / "x", nixstore.dir)
    last = len(image_layers(work / "img.tar", work / "n")) - 1
    assert set(got) == nixstore.closure("note", "hello", "selfref") and set(got.values()) == {last}
    view = read_image(work / "img.tar", work / "v")
    assert [m.name for _, m in view.find("etc/hello-path")]  # the script's own output is still there
    # copyToRoot's note (copied to /) names `other` without referring to it: not the scripts' doing.
    spec = write_spec(work, {**common, "extraCommands": f"echo {hello} > hello-path"}, "extra.json")
    proc = run_nsbuild(["image", spec, "-o", work / "img2.tar"], user)
    assert proc.returncode == 0, describe(proc)
    assert set(_image_store_paths(work / "img2.tar", work / "y", nixstore.dir)) == nixstore.closure("note", "hello")


# --- reading the database safely ----------------------------------------------------------------------


def test_database_with_a_pending_log_is_read_whole_or_refused(user_tmp) -> None:
    """A transaction still in the write-ahead log (Nix killed before its checkpoint) is seen when the
    log can be read with its index (-shm); without the index the database is refused, never read as
    the main file alone (which would miss the transaction)."""
    root = user_tmp(None) / "s"
    (root / "nix" / "store").mkdir(parents=True)
    store = NixStore(root)
    f = root / "greeting"
    f.write_text("hi\n")
    store.nix("nix-store", "--add", str(f))
    fake = store.dir / "0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r-handmade"
    fake.mkdir()
    (fake / "x").write_text("x\n")
    db = root / "nix/var/nix/db/db.sqlite"
    child = (
        "import os, sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "con.execute('pragma wal_autocheckpoint = 0')\n"
        "con.execute('insert into ValidPaths (path, hash, registrationTime, narSize) values (?, ?, 1, 8)',"
        " (sys.argv[2], 'sha256:' + '0' * 64))\n"
        "os._exit(0)  # no checkpoint: the registration stays in the log\n"
    )
    subprocess.run([sys.executable, "-c", child, str(db), str(fake)], check=True, timeout=60)
    assert Path(f"{db}-wal").stat().st_size > 0 and Path(f"{db}-shm").exists()
    work = user_tmp("test")
    spec = write_spec(work, {"name": "x", "storeDir": str(store.dir), "contents": [str(fake)]})
    proc = run_nsbuild(["layered", spec, "-o", work / "img.tar", "--no-cache"], "test")
    assert proc.returncode == 0, describe(proc)  # the registration in the log was seen
    Path(f"{db}-shm").unlink()
    proc = run_nsbuild(["layered", spec, "-o", work / "img2.tar", "--no-cache"], "test")
    assert proc.returncode == 1, describe(proc)
    assert f"cannot read the Nix database {db}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (work / "img2.tar").exists()
    assert not Path(f"{db}-shm").exists(), "the database's directory was written"


# --- the real /nix/store ------------------------------------------------------------------------------

REAL_STORE_EXPR = r"""
let
  mk = name: script: env: derivation ({
    inherit name; system = builtins.currentSystem; builder = "@BUSYBOX@"; args = [ "sh" "-c" script ];
  } // env);
  dep = mk "nsbuild-test-dep-@TAG@" "echo dep > $out" {};
  top = mk "nsbuild-test-top-@TAG@" "echo $dep > $out" { inherit dep; };
in top
"""


def test_default_store_uses_the_real_nix_database(unprivileged_user, user_tmp) -> None:
    """storeDir /nix/store (the default): references from /nix/var/nix/db/db.sqlite, as nix-store -qR."""
    if os.geteuid() != 0:
        pytest.skip("building into the real /nix/store needs root here (no Nix daemon)")
    work = user_tmp(unprivileged_user)
    tag = os.urandom(6).hex()  # a store path of this test alone: deleted afterwards
    expr = work / "real.nix"
    expr.write_text(REAL_STORE_EXPR.replace("@BUSYBOX@", BUSYBOX).replace("@TAG@", tag))
    conf = work / "etc-nix"
    conf.mkdir()
    (conf / "nix.conf").write_text("build-users-group =\nsandbox = false\nsubstituters =\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "NIX_CONF_DIR": str(conf), "USER": "root"}

    def nix(*args: str) -> str:
        proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, describe(proc)
        return proc.stdout

    top = nix("nix-build", str(expr), "--no-out-link").split()[-1]
    try:
        want = {os.path.basename(p) for p in nix("nix-store", "-qR", top).split()}
        assert len(want) == 2
        spec = write_spec(work, {"name": "real", "tag": "t", "contents": [top]})
        proc = run_nsbuild(["layered", spec, "-o", work / "img.tar", "--no-cache"], unprivileged_user)
        assert proc.returncode == 0, describe(proc)
        assert set(_image_store_paths(work / "img.tar", work / "x", Path("/nix/store"))) == want
    finally:
        drvs = nix("nix-store", "-qd", top).split()
        paths = sorted(nix("nix-store", "-qR", top, *drvs).split())
        subprocess.run(["nix-store", "--delete", *paths], env=env, capture_output=True, timeout=120)


# --- layering: the scripts' paths hang off the customisation layer ------------------------------------------
# dockerTools' graph has the customisation layer (hidden, here ~10 kB, larger than the paths) referring
# to what its output refers to. Budget 2, app a content path (100), tool named by a script (60):
#   without the reference: seed custom → {custom}: custom, app; {}: tool, json (2 sets); seed json → 3:
#     undone. Layers by closure size: [tool] (60 + json), [app] (with custom's 10 kB).
#   with it: seed custom → {custom}: custom, app, tool; {}: json (2); seed json → 3: undone.
#     One layer [app, tool] (json's set holds a hidden node only and is dropped).
def test_script_paths_are_references_of_the_customisation_layer_node() -> None:
    from nsbuild.plan.autolayer import ImageGraph, image_store_layers

    app, tool = "a" * 32 + "-app", "b" * 32 + "-tool"
    common = {
        "store_dir": "/nix/store",
        "name": "x",
        "paths": {app: (100, []), tool: (60, [])},
        "content_roots": [app],
        "config_roots": [],
        "base_json": b'{"config":{}}',
    }
    assert image_store_layers(ImageGraph(**common), 2) == [[tool], [app]]
    assert image_store_layers(ImageGraph(**common, script_roots=[tool]), 2) == [[app, tool]]


def test_chroot_store_database_names_paths_under_nix_store(tmp_path: Path) -> None:
    """A `local?root=R` store keeps R/nix/store, and its database (R/nix/var/nix/db) names the paths
    /nix/store/…: storeDir R/nix/store finds that database and reads it under that name."""
    root = tmp_path / "chroot"
    (root / "nix" / "store").mkdir(parents=True)
    store = NixStore(root)
    f = tmp_path / "greeting"
    f.write_text("hi\n")
    added = Path(store.nix("nix-store", "--add", str(f), uri=f"local?root={root}").strip())
    assert str(added).startswith("/nix/store/")
    physical = store.dir / added.name
    assert physical.is_file()
    fake = store.dir / "0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r-handmade"
    fake.mkdir()
    s = Store(str(store.dir))
    assert list(store_closure(s, [physical])) == [added.name]
    with pytest.raises(BuildError, match="not a valid path in the Nix database"):
        store_closure(s, [fake])
