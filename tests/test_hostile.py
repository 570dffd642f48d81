"""Hostile base images (issue 4): crafted with Python's tarfile, each must stop the build with one clear
line (exit 1) and write nothing outside the build's own temporary tree.

A canary directory owned by the building account (so a write through an escaped path would succeed)
is the target of every escape attempt; it must be unchanged afterwards. Each case runs through the
three places a base layer is read: `nsbuild image` with runAsRoot (unpacked in the sandbox), `nsbuild
image` without it (validated, layers reused), and `nsbuild layered` with fakeRootCommands (the same
sandbox unpacking, reached from the layered flow).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from support.layouts import OCI_LAYER_GZIP, Layout, image_config, layer_descriptor, sha256
from support.users import UserTmpFactory, account, describe, is_root, run_nsbuild

Entry = Callable[[tarfile.TarFile], None]


def _file(name: str, data: bytes = b"x\n") -> Entry:
    def add(tf: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o644
        tf.addfile(ti, io.BytesIO(data))

    return add


def _special(name: str, kind: bytes, link: str = "", major: int = 0, minor: int = 0) -> Entry:
    def add(tf: tarfile.TarFile) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.linkname = link
        ti.devmajor, ti.devminor = major, minor
        ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o777 if kind == tarfile.SYMTYPE else 0o644
        tf.addfile(ti)

    return add


def _dir(name: str) -> Entry:
    return _special(name, tarfile.DIRTYPE)


def _symlink(name: str, target: str) -> Entry:
    return _special(name, tarfile.SYMTYPE, target)


def _hardlink(name: str, target: str) -> Entry:
    return _special(name, tarfile.LNKTYPE, target)


def layer(*entries: Entry) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for add in entries:
            add(tf)
    return buf.getvalue()


def docker_archive(path: Path, layers: list[bytes], diff_ids: list[str] | None = None) -> None:
    diff_ids = diff_ids or ["sha256:" + hashlib.sha256(data).hexdigest() for data in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "1970-01-01T00:00:01Z"} for _ in layers],
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"L{i}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["hostile:latest"], "Layers": names}]).encode()
    with tarfile.open(path, "w") as tf:
        for name, data in [("manifest.json", manifest), (config_name, config), *zip(names, layers, strict=True)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _patch_size(data: bytes, member: int, size: int) -> bytes:
    """Rewrite the ustar size field of the n-th header (no PAX size record) and its checksum."""
    raw = bytearray(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        off = tf.getmembers()[member].offset
    raw[off + 124 : off + 136] = b"%011o\0" % size
    raw[off + 148 : off + 156] = b" " * 8
    raw[off + 148 : off + 156] = b"%06o\0 " % sum(raw[off : off + 512])
    return bytes(raw)


def _cases(canary: Path) -> dict[str, tuple[list[bytes], str, dict[str, str] | None]]:
    """name → (layers, expected message, diff_ids override or None)."""
    up = "../" * 40 + str(canary).lstrip("/")
    good = layer(_dir("etc"), _file("etc/ok"))
    truncated = layer(_file("big", b"y" * 20000))[:3000]
    no_end = layer(_file("a", b"z" * 512))[:1024]  # a's header and data, no end-of-archive blocks
    return {
        "dotdot": ([layer(_file(up + "/dotdot"))], "contains '..'", None),
        "absolute": ([layer(_file(str(canary) + "/absolute"))], "absolute name", None),
        "symlink-same-layer": (
            [layer(_symlink("esc", str(canary)), _file("esc/pwned"))],
            "writes through the symlink /esc",
            None,
        ),
        "symlink-planted-earlier": (
            [layer(_symlink("esc", str(canary))), layer(_file("esc/pwned"))],
            "planted by fromImage layer 0",
            None,
        ),
        "symlink-deeper": (
            [layer(_dir("a"), _symlink("a/b", str(canary))), layer(_file("a/b/c/pwned"))],
            "writes through the symlink /a/b",
            None,
        ),
        "relative-symlink-up": (
            [layer(_symlink("esc", up)), layer(_dir("esc/sub"))],
            "writes through the symlink /esc",
            None,
        ),
        "whiteout-through-symlink": (
            [layer(_symlink("esc", str(canary))), layer(_file("esc/.wh.keep", b""))],
            "writes through the symlink /esc",
            None,
        ),
        "opaque-through-symlink": (
            [layer(_symlink("esc", str(canary))), layer(_file("esc/.wh..wh..opq", b""))],
            "writes through the symlink /esc",
            None,
        ),
        "hardlink-dotdot": ([layer(_hardlink("hl", up + "/keep"))], "hard link", None),
        "hardlink-absolute": ([layer(_hardlink("hl", str(canary) + "/keep"))], "hard link", None),
        "hardlink-via-symlink": (
            [layer(_symlink("esc", str(canary)), _hardlink("hl", "esc/keep"))],
            "writes through the symlink /esc",
            None,
        ),
        "device-node": ([layer(_special("dev-null", tarfile.CHRTYPE, major=1, minor=3))], "device node", None),
        "absurd-size": ([_patch_size(layer(_file("huge", b"h" * 100)), 0, (8 << 30) - 1)], "absurd size", None),
        "digest-mismatch": (
            [good],
            "does not match",
            {"diff_id": "sha256:" + hashlib.sha256(b"something else").hexdigest()},
        ),
        "truncated": ([truncated], "truncated", None),
        "truncated-no-end": ([no_end], "truncated", None),
    }


MODES = ("image-runAsRoot", "image", "layered-fakeRootCommands")
# Device nodes are refused only where runAsRoot would run over them; elsewhere they are reused as is
# (byte for byte) or stand in as placeholders in the fakeRootCommands sandbox.
ALLOWED = {("device-node", "image"), ("device-node", "layered-fakeRootCommands")}


def _snapshot(d: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(d):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(d))] = "dir" if p.is_dir() else p.read_bytes()
    return out


@pytest.fixture
def hostile_work(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> tuple[str | None, Path, Path]:
    user = unprivileged_user
    work = user_tmp(user)
    canary = user_tmp(user, prefix="nsbuild-canary-")
    (canary / "keep").write_text("keep me\n")
    if is_root():
        acc = account(user)
        os.chown(canary / "keep", acc.uid, acc.gid)
    return user, work, canary


def test_hostile_base_layers(hostile_work: tuple[str | None, Path, Path]) -> None:
    user, work, canary = hostile_work
    before = _snapshot(canary)
    acc = account(user)
    tmp = work / "tmp"
    tmp.mkdir()
    for name, (layers, needle, override) in _cases(canary).items():
        base = work / f"{name}.tar"
        diff_ids = [override["diff_id"]] if override else None
        docker_archive(base, layers, diff_ids)
        # A sanity check of the crafted archive itself: the hostile entry is really in it.
        with tarfile.open(base) as tf:
            assert tf.getmember("L0/layer.tar").size == len(layers[0])
        for mode in MODES:
            out = work / f"{name}-{mode}.tar"
            spec: dict = {"name": "victim", "tag": "t", "compressor": "none", "fromImage": str(base)}
            if mode == "image-runAsRoot":
                spec["runAsRoot"] = "true"
            elif mode == "layered-fakeRootCommands":
                spec["fakeRootCommands"] = "true"
            spec_path = work / "spec.json"
            spec_path.write_text(json.dumps(spec))
            if is_root():
                for p in (spec_path, base, tmp):
                    os.chown(p, acc.uid, acc.gid)
            kind = "layered" if mode.startswith("layered") else "image"
            proc = run_nsbuild([kind, spec_path, "-o", out], user=user, env={"TMPDIR": str(tmp)})
            if (name, mode) in ALLOWED:
                assert proc.returncode == 0, (name, mode, describe(proc))
                out.unlink()
            else:
                assert proc.returncode == 1, (name, mode, describe(proc))
                errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("nsbuild: error:")]
                assert len(errors) == 1 and needle in errors[0], (name, mode, describe(proc))
                assert "Traceback" not in proc.stderr
                assert not out.exists()
            assert _snapshot(canary) == before, (name, mode, "wrote outside the build")
            assert os.listdir(tmp) == [], (name, mode, os.listdir(tmp))
            assert not (work / "pwned").exists() and not (work / "dotdot").exists()


def test_oci_blob_digest_mismatch(hostile_work: tuple[str | None, Path, Path]) -> None:
    """An OCI layout whose layer blob is not what its digest says (gzip-compressed, as registries hold
    it): refused before anything is unpacked."""
    user, work, _ = hostile_work
    good = layer(_file("etc/ok"))
    blob = gzip.compress(good, mtime=0)
    wrong = gzip.compress(layer(_file("etc/evil")), mtime=0)
    layout = work / "oci"
    oci = Layout(layout)
    layer_digest = sha256(blob)
    oci.put_as(layer_digest, wrong)  # the bytes do not match the name
    config = image_config([sha256(good)])
    oci.finish(config, [layer_descriptor(layer_digest, len(blob), OCI_LAYER_GZIP)])
    if is_root():
        acc = account(user)
        for dirpath, dirnames, filenames in os.walk(work):
            for n in [dirpath, *[os.path.join(dirpath, x) for x in dirnames + filenames]]:
                os.lchown(n, acc.uid, acc.gid)
    spec_path = work / "spec.json"
    spec_path.write_text(
        json.dumps(
            {"name": "victim", "tag": "t", "compressor": "none", "fromImage": f"oci:{layout}:t", "runAsRoot": "true"}
        )
    )
    if is_root():
        os.chown(spec_path, acc.uid, acc.gid)
    out = work / "out.tar"
    proc = run_nsbuild(["image", spec_path, "-o", out], user=user)
    assert proc.returncode == 1 and "digest mismatch" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr and not out.exists()
