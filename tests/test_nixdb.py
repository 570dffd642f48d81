"""includeNixDB: NAR hashes, the Nix database, gcroots, reproducibility, and the built image.

NAR bytes are checked against archives assembled by hand from the format's definition and against
hashes that Nix itself (nix-hash 2.8) printed once for the same trees; where nix-store is installed
(Debian's nix-bin) the database is also opened by real Nix, which re-hashes every path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support.users import describe, run_nsbuild
from support.verifiers import image_layers

from nsbuild.errors import BuildError
from nsbuild.plan.closure import closure as store_closure
from nsbuild.plan.store import Store
from nsbuild.rootfs.nixdb import nar_info, write_nar, write_nix_db

NIX_STORE = shutil.which("nix-store")
needs_nix = pytest.mark.skipif(NIX_STORE is None, reason="nix-store is not installed (Debian package nix-bin)")

# Hash parts in Nix's base32 alphabet (no e, o, u, t).
H_LIB = "0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r"
H_APP = "1zyxwvsrqpnmlkjihgfdcba987654321"
H_DATA = "22222222222222222222222222222222"
H_TOOL = "3333333333333333333333333333333z"

HELLO_NAR = (
    b"\x0d\0\0\0\0\0\0\0"
    b"nix-archive-1\0\0\0"
    b"\x01\0\0\0\0\0\0\0"
    b"(\0\0\0\0\0\0\0"
    b"\x04\0\0\0\0\0\0\0"
    b"type\0\0\0\0"
    b"\x07\0\0\0\0\0\0\0"
    b"regular\0"
    b"\x08\0\0\0\0\0\0\0"
    b"contents"
    b"\x06\0\0\0\0\0\0\0"
    b"hello\n\0\0"
    b"\x01\0\0\0\0\0\0\0"
    b")\0\0\0\0\0\0\0"
)
# `nix-hash --type sha256` of the trees below, printed by Nix 2.8.
HELLO_SHA256 = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"
TREE_SHA256, TREE_NAR_SIZE = "8c2f4af958f68c8c37c399ed622e4c55df97b54f818280effd664885b3155d3b", 1032
SYMLINK_SHA256, SYMLINK_NAR_SIZE = "6c1859a626527d8468063122457ed18ed4497ce1d2c2fa7f636b2e991e831ff4", 128


def _nar_str(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)


def _tree(d: Path) -> Path:
    """B (executable), a -> B, a.d/x (empty), e/ (empty): names whose byte order matters."""
    d.mkdir()
    (d / "B").write_text("upper\n")
    os.chmod(d / "B", 0o755)
    os.symlink("B", d / "a")
    (d / "a.d").mkdir()
    (d / "a.d/x").write_bytes(b"")
    (d / "e").mkdir()
    return d


def _nar_bytes(path: Path) -> bytes:
    buf = io.BytesIO()
    write_nar(path, buf)
    return buf.getvalue()


# --- NAR ---------------------------------------------------------------------------------------


def test_nar_of_a_file_is_the_archive_assembled_by_hand(tmp_path: Path) -> None:
    f = tmp_path / "hello"
    f.write_text("hello\n")
    os.chmod(f, 0o644)
    assert _nar_bytes(f) == HELLO_NAR
    info = nar_info(f)
    assert (info.sha256, info.size) == (HELLO_SHA256, len(HELLO_NAR))
    assert hashlib.sha256(HELLO_NAR).hexdigest() == HELLO_SHA256


def test_nar_executable_symlink_directory(tmp_path: Path) -> None:
    t = _tree(tmp_path / "T")
    exe = tmp_path / "exe"
    exe.write_text("hello\n")
    os.chmod(exe, 0o500)  # only the owner's x bit counts
    expected_exe = (
        _nar_str(b"nix-archive-1")
        + _nar_str(b"(")
        + _nar_str(b"type")
        + _nar_str(b"regular")
        + _nar_str(b"executable")
        + _nar_str(b"")
        + _nar_str(b"contents")
        + _nar_str(b"hello\n")
        + _nar_str(b")")
    )
    assert _nar_bytes(exe) == expected_exe
    os.chmod(exe, 0o655)  # group/other x without the owner's: not executable for Nix
    assert _nar_bytes(exe) == HELLO_NAR

    info = nar_info(t)
    assert (info.sha256, info.size) == (TREE_SHA256, TREE_NAR_SIZE)
    nar = _nar_bytes(t)
    assert [nar.index(_nar_str(n)) for n in (b"B", b"a", b"a.d", b"e")] == sorted(
        nar.index(_nar_str(n)) for n in (b"B", b"a", b"a.d", b"e")
    )
    sl = tmp_path / "sl"
    os.symlink("/some/where", sl)
    assert _nar_bytes(sl) == (
        _nar_str(b"nix-archive-1")
        + _nar_str(b"(")
        + _nar_str(b"type")
        + _nar_str(b"symlink")
        + _nar_str(b"target")
        + _nar_str(b"/some/where")
        + _nar_str(b")")
    )
    assert (nar_info(sl).sha256, nar_info(sl).size) == (SYMLINK_SHA256, SYMLINK_NAR_SIZE)


@needs_nix
def test_nar_matches_nix_store_dump(tmp_path: Path) -> None:
    t = _tree(tmp_path / "T")
    big = os.urandom(2 * 1024 * 1024 + 13)  # crosses the read chunk size, odd length needs padding
    (t / "big").write_bytes(big)
    (t / "sub").mkdir()
    (t / "sub" / "\u00e9t\u00e9 name").write_text("x" * 9)
    os.symlink("../big", t / "sub" / "up")
    dump = subprocess.run([NIX_STORE, "--dump", t], capture_output=True, check=True).stdout
    assert _nar_bytes(t) == dump
    info = nar_info(t)
    assert (info.sha256, info.size) == (hashlib.sha256(dump).hexdigest(), len(dump))


def test_nar_refuses_what_nix_cannot_archive(tmp_path: Path) -> None:
    t = tmp_path / "T"
    t.mkdir()
    os.mkfifo(t / "fifo")
    with pytest.raises(BuildError, match="fifo"):
        nar_info(t)


def test_nar_self_reference_found_anywhere(tmp_path: Path) -> None:
    t = tmp_path / "T"
    t.mkdir()
    (t / "f").write_bytes(b"a" * ((1 << 20) - 5) + H_LIB.encode())
    assert nar_info(t, H_LIB).self_reference  # spans a read-chunk boundary
    assert not nar_info(t, H_APP).self_reference
    (t / "f").write_text("nothing")
    os.symlink(f"/nix/store/{H_LIB}-lib/lib", t / "l")
    assert nar_info(t, H_LIB).self_reference
    os.unlink(t / "l")
    (t / f"{H_LIB}.conf").write_text("")
    assert nar_info(t, H_LIB).self_reference


# --- the database ------------------------------------------------------------------------------


def _fake_store(base: Path) -> tuple[Path, dict[str, Path]]:
    """app -> lib, app -> data, lib -> lib (itself), tool -> lib; data is the "hello" file."""
    store = base / "nix" / "store"
    store.mkdir(parents=True)
    p = {k: store / f"{h}-{k}" for k, h in (("lib", H_LIB), ("app", H_APP), ("data", H_DATA), ("tool", H_TOOL))}
    (p["lib"] / "lib").mkdir(parents=True)
    (p["lib"] / "lib" / "libx.so").write_bytes(b"\x7fELF rpath=" + str(p["lib"] / "lib").encode() + b"\0")
    (p["app"] / "bin").mkdir(parents=True)
    (p["app"] / "bin" / "app").write_text(f"#!/bin/sh\nLD_LIBRARY_PATH={p['lib']}/lib exec cat {p['data']}\n")
    os.chmod(p["app"] / "bin" / "app", 0o755)
    os.symlink(f"{p['lib']}/lib/libx.so", p["app"] / "libx.so")
    p["data"].write_text("hello\n")
    (p["tool"] / "bin").mkdir(parents=True)
    os.symlink(f"{p['lib']}/lib", p["tool"] / "bin" / "lib")
    return store, p


def _write(base: Path, roots: list[str], registration_time: int = 1_700_000_000) -> tuple[Path, dict[str, Path]]:
    store, p = _fake_store(base)
    s = Store(str(store))
    closure = store_closure(s, [p[r] for r in roots])
    out = base / "root"
    out.mkdir()
    os.chmod(out, 0o755)
    write_nix_db(out, closure, [p[r] for r in roots], "/nix/store", registration_time)
    return out, p


def _rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_database_registers_the_closure_and_its_references(tmp_path: Path) -> None:
    root, p = _write(tmp_path, ["app", "tool"])
    db = root / "nix/var/nix/db/db.sqlite"
    name = {k: f"/nix/store/{v.name}" for k, v in p.items()}
    rows = _rows(
        db, "select id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca from ValidPaths order by id"
    )
    assert [r[1] for r in rows] == sorted(name.values())  # ids follow the sorted paths
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    by_path = {r[1]: r for r in rows}
    for k, path in p.items():
        _, _, h, t, deriver, size, ultimate, sigs, ca = by_path[name[k]]
        want = hashlib.sha256(_nar_bytes(path)).hexdigest()
        assert (h, size) == ("sha256:" + want, len(_nar_bytes(path)))
        assert (t, deriver, ultimate, sigs, ca) == (1_700_000_000, None, None, None, None)
    assert by_path[name["data"]][2] == "sha256:" + HELLO_SHA256  # a plain file "hello\n", hashed by Nix
    refs = set(
        _rows(
            db,
            "select a.path, b.path from Refs join ValidPaths a on referrer = a.id "
            "join ValidPaths b on reference = b.id",
        )
    )
    assert refs == {
        (name["app"], name["lib"]),
        (name["app"], name["data"]),
        (name["lib"], name["lib"]),
        (name["tool"], name["lib"]),
    }
    assert _rows(db, "select count(*) from DerivationOutputs") == [(0,)]
    objects = {r[0] for r in _rows(db, "select name from sqlite_master")}
    assert {
        "ValidPaths",
        "Refs",
        "DerivationOutputs",
        "IndexReferrer",
        "IndexReference",
        "IndexDerivationOutputs",
        "DeleteSelfRefs",
    } <= objects
    assert _rows(db, "pragma journal_mode") == [("delete",)]
    assert _rows(db, "pragma page_size") == [(4096,)]
    assert _rows(db, "pragma integrity_check") == [("ok",)]
    assert not list(db.parent.glob("db.sqlite-*")) and not (db.parent / "db.sqlite.tmp").exists()

    state = root / "nix/var/nix"
    assert (state / "db/schema").read_text() == "10"
    assert (state / "db/big-lock").read_bytes() == b""
    assert stat.S_IMODE(os.lstat(state / "db/big-lock").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(db).st_mode) == 0o644
    roots = {q.name: os.readlink(q) for q in (state / "gcroots/docker").iterdir()}
    assert roots == {p["app"].name: name["app"], p["tool"].name: name["tool"]}
    assert os.readlink(state / "gcroots/profiles") == "/nix/var/nix/profiles"
    for d in ("profiles/per-user", "gcroots/per-user", "temproots"):
        assert (state / d).is_dir()


def test_registration_time_and_refusals(tmp_path: Path) -> None:
    root, p = _write(tmp_path / "a", ["data"], registration_time=0)
    assert _rows(root / "nix/var/nix/db/db.sqlite", "select registrationTime, hash from ValidPaths") == [
        (0, "sha256:" + HELLO_SHA256)
    ]
    store, p = _fake_store(tmp_path / "b")
    s = Store(str(store))
    closure = store_closure(s, [p["app"]])
    out = tmp_path / "b" / "root"
    out.mkdir()
    with pytest.raises(BuildError, match="not one of the registered"):
        write_nix_db(out, closure, [p["tool"]], "/nix/store", 1)
    partial = {k: v for k, v in closure.items() if not k.endswith("-lib")}
    with pytest.raises(BuildError, match="not in the image's closure"):
        write_nix_db(out, partial, [p["app"]], "/nix/store", 1)
    with pytest.raises(BuildError, match="no store paths"):
        write_nix_db(out, {}, [], "/nix/store", 1)
    escape = tmp_path / "b" / "elsewhere"
    escape.mkdir()
    (out / "nix").mkdir(exist_ok=True)
    os.symlink(escape, out / "nix" / "var")
    with pytest.raises(BuildError, match="symlink"):
        write_nix_db(out, closure, [p["app"]], "/nix/store", 1)
    assert list(escape.iterdir()) == []


_CHILD = """
import sys
from pathlib import Path
from nsbuild.rootfs.nixdb import write_nix_db
from nsbuild.plan.closure import closure as store_closure
from nsbuild.plan.store import Store
store, out = sys.argv[1], Path(sys.argv[2])
s = Store(store)
roots = [s.dir / n for n in sorted(s.entries.values()) if n.endswith(("-app", "-tool"))]
write_nix_db(out, store_closure(s, roots), roots, "/nix/store", 1700000000)
"""


def _listing(root: Path) -> list[tuple[str, int, str]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(dirnames + filenames):
            q = Path(dirpath) / n
            st = os.lstat(q)
            what = (
                os.readlink(q)
                if stat.S_ISLNK(st.st_mode)
                else (hashlib.sha256(q.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "")
            )
            out.append((str(q.relative_to(root)), st.st_mode, what))
    return out


def test_bit_identical_across_umask_and_timezone(tmp_path: Path) -> None:
    store, _ = _fake_store(tmp_path)
    trees = []
    for i, (umask, tz) in enumerate(((0o022, "UTC"), (0o077, "Pacific/Kiritimati"), (0o002, "America/St_Johns"))):
        out = tmp_path / f"out{i}"
        out.mkdir()
        os.chmod(out, 0o755)
        env = {**os.environ, "TZ": tz}
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(store), str(out)], env=env, umask=umask, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        trees.append(out)
    first = _listing(trees[0])
    assert any(n.endswith("db.sqlite") for n, _, _ in first)
    for other in trees[1:]:
        assert _listing(other) == first
        assert (other / "nix/var/nix/db/db.sqlite").read_bytes() == (trees[0] / "nix/var/nix/db/db.sqlite").read_bytes()
    # Run again over an existing database: replaced, same bytes.
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(store), str(trees[0])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _listing(trees[0]) == first


# --- real Nix reads it -------------------------------------------------------------------------


def _nix(root: Path, *args: str, store: str | None = None) -> subprocess.CompletedProcess:
    # A store root owned by us: Nix would otherwise want the nixbld group and a daemon.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "USER": "root",
        "NIX_CONF_DIR": str(root / "etc-nix"),
    }
    (root / "etc-nix").mkdir(exist_ok=True)
    (root / "etc-nix" / "nix.conf").write_text("build-users-group =\nsandbox = false\n")
    return subprocess.run(
        [NIX_STORE, "--store", store or f"local?root={root}", *args], env=env, capture_output=True, text=True
    )


@needs_nix
def test_real_nix_verifies_contents_and_reads_references(tmp_path: Path) -> None:
    root, p = _write(tmp_path, ["app", "tool"])
    # The fake store already lies at tmp_path/nix/store: make root/nix/store the same tree.
    shutil.move(str(tmp_path / "nix" / "store"), root / "nix" / "store")
    name = {k: f"/nix/store/{v.name}" for k, v in p.items()}
    proc = _nix(root, "--verify", "--check-contents")
    assert proc.returncode == 0 and "was modified" not in proc.stderr, describe(proc)
    proc = _nix(root, "-q", "--references", name["app"])
    assert proc.returncode == 0, describe(proc)
    assert sorted(proc.stdout.split()) == sorted([name["lib"], name["data"]])
    assert _nix(root, "-q", "--references", name["lib"]).stdout.split() == [name["lib"]]
    assert sorted(_nix(root, "-qR", name["tool"]).stdout.split()) == sorted([name["tool"], name["lib"]])
    assert _nix(root, "-q", "--hash", name["data"]).stdout.strip() in (
        "sha256:" + HELLO_SHA256,
        "sha256:" + _nix32(bytes.fromhex(HELLO_SHA256)),
    )
    roots = _nix(root, "--gc", "--print-roots").stdout
    assert f"gcroots/docker/{p['app'].name} -> {name['app']}" in roots
    # The check can fail: a changed file is reported.
    (root / "nix/store" / p["data"].name).write_text("changed\n")
    proc = _nix(root, "--verify", "--check-contents")
    assert proc.returncode != 0 or "was modified" in proc.stderr, describe(proc)


def _nix32(digest: bytes) -> str:
    chars = "0123456789abcdfghijklmnpqrsvwxyz"
    n = len(digest) * 8
    out = []
    for i in range((n + 4) // 5 - 1, -1, -1):
        b = i * 5
        j, k = divmod(b, 8)
        c = (digest[j] >> k) | ((digest[j + 1] << (8 - k)) if j + 1 < len(digest) else 0)
        out.append(chars[c & 0x1F])
    return "".join(out)


# --- end to end: nsbuild layered -------------------------------------------------------------------


def _layer_members(layer: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = {}
    with tarfile.open(layer) as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read() if m.isreg() else None
            out[m.name.lstrip("./").rstrip("/")] = (m, data)
    return out


def test_layered_image_carries_the_database(unprivileged_user: str | None, user_tmp) -> None:
    work = user_tmp(unprivileged_user)
    store, p = _fake_store(work)
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "name": "nixdb",
                "tag": "t",
                "storeDir": str(store),
                "includeNixDB": True,
                "contents": [str(p["app"])],
                "config": {"Cmd": [str(p["tool"] / "bin" / "lib")]},
                "mtime": "2024-01-02T03:04:05Z",
                # dockerTools writes the database before extraCommands: a script may rely on it.
                "extraCommands": "test -s nix/var/nix/db/db.sqlite && echo yes > saw-db",
            }
        )
    )
    proc = run_nsbuild(["layered", spec, "-o", work / "img.tar"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    layers = image_layers(work / "img.tar", work / "x")
    custom = _layer_members(layers[-1])
    db_member, db_bytes = custom["nix/var/nix/db/db.sqlite"]
    assert custom["saw-db"][1] == b"yes\n"
    assert db_member.mtime == 1704164645 and stat.S_IMODE(db_member.mode) == 0o644
    db = work / "db.sqlite"
    db.write_bytes(db_bytes)
    name = {k: f"{store}/{v.name}" for k, v in p.items()}
    rows = dict(_rows(db, "select path, registrationTime from ValidPaths"))
    assert rows == {name[k]: 1704164645 for k in ("app", "lib", "data", "tool")}  # tool: named in config
    refs = set(
        _rows(
            db,
            "select a.path, b.path from Refs join ValidPaths a on referrer = a.id "
            "join ValidPaths b on reference = b.id",
        )
    )
    assert (name["app"], name["data"]) in refs and (name["tool"], name["lib"]) in refs
    hashes = dict(_rows(db, "select path, hash from ValidPaths"))
    assert hashes[name["data"]] == "sha256:" + HELLO_SHA256
    assert custom["nix/var/nix/db/schema"][1] == b"10"
    gc = custom[f"nix/var/nix/gcroots/docker/{p['app'].name}"][0]
    assert gc.issym() and gc.linkname == name["app"]
    # Every store path the database names is in the image, in a layer below.
    below = set()
    for layer in layers[:-1]:
        below |= set(_layer_members(layer))
    for path in rows:
        assert path.lstrip("/") in below
    if NIX_STORE is not None:
        # Real Nix opens the unpacked image as a store (this storeDir, state in the image) and
        # re-hashes every registered path.
        rootfs = work / "rootfs"
        rootfs.mkdir()
        for layer in layers:
            subprocess.run(["tar", "-xf", layer, "-C", rootfs], check=True)
        uri = f"local?store={store}&real={rootfs}{store}&state={rootfs}/nix/var/nix&log={rootfs}/nix/var/log/nix"
        proc = _nix(work, "--verify", "--check-contents", store=uri)
        assert proc.returncode == 0 and "checking store hashes" in proc.stderr, describe(proc)
        assert "was modified" not in proc.stderr and "invalid" not in proc.stderr, describe(proc)
        proc = _nix(work, "-qR", name["app"], store=uri)
        assert sorted(proc.stdout.split()) == sorted([name["app"], name["lib"], name["data"]]), describe(proc)

    # Same inputs, another umask and time zone: the same customisation layer, byte for byte.
    proc = run_nsbuild(["layered", spec, "-o", work / "img2.tar"], unprivileged_user, umask=0o077, tz="Asia/Kathmandu")
    assert proc.returncode == 0, describe(proc)
    again = image_layers(work / "img2.tar", work / "y")
    assert again[-1].read_bytes() == layers[-1].read_bytes()


def test_layered_without_store_paths_is_a_spec_error(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"name": "x", "includeNixDB": True, "contents": [str(tree)], "storeDir": str(tmp_path / "store")})
    )
    proc = run_nsbuild(["layered", spec, "-o", tmp_path / "img.tar"])
    assert proc.returncode == 2, describe(proc)
    assert "includeNixDB" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
