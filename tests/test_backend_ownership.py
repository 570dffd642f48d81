"""Every backend records the same ownership as the userns backend, byte for byte, or fails (issue 11).

The reference is the userns backend as nsbuild-test (full subordinate map: the kernel does every chown
and mode change for real). The same scripts then run with the single-id namespace + fakeroot and with
plain fakeroot, as nsbuild-test and as nsbuild-nosub; their customisation layers must be the same
bytes. The scripts chown to each account's own uid: plain fakeroot sees the caller's real ids on disk,
and must neither turn them into root (a setuid-root file the script never made) nor guess.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX
from support.users import UserTmpFactory, account, describe, is_root, run_nsbuild
from support.verifiers import image_layers


def _ownership_script() -> str:
    t, n = account("test").uid, account("nosub").uid
    # A script may change PATH: the shims must still find the real tools (and not themselves).
    return f"""
PATH=/nonexistent:$PATH
touch own-{t} && chown {t}:{t} own-{t} && chmod 4755 own-{t}
touch own-{n} && chown {n}:{n} own-{n} && chmod 4755 own-{n}
touch grp && chgrp {n} grp && chmod 2755 grp
touch uid-only && chown {t} uid-only
touch other && chown 1003:1003 other && chmod 4755 other
mkdir dir && chown {n}:{t} dir && chmod 3775 dir
touch suid-then-chown && chmod 6755 suid-then-chown && chown 1003:1003 suid-then-chown
touch sgid-noexec && chmod 2644 sgid-noexec && chown 1004 sgid-noexec
mkdir -p tree/sub && touch tree/sub/s tree/g && chmod 4755 tree/sub/s && chmod 2775 tree/g tree/sub
chown -R 1005:1005 tree
ln -s own-{t} link && chown -h 1006:1006 link
mknod cdev c 1 3
mknod -m 600 bdev b 8 0
mknod fifo p
touch xa && setfattr -n user.note -v hello xa
touch suid-xattr && chmod 4755 suid-xattr && setfattr -n user.k -v v suid-xattr
touch xo && chown {t}:{t} xo && setfattr -n user.k -v v xo
cp bin/busybox capbin && setcap cap_net_bind_service+ep capbin
cp bin/busybox capown && chown {n}:{n} capown && setcap cap_net_raw+ep capown
"""


def _require_tools() -> None:
    if not is_root():
        pytest.skip("comparing accounts needs root (to run as nsbuild-test and nsbuild-nosub)")
    for tool in ("setcap", "setfattr", "fakeroot"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip(f"{tool} is not installed (`make deps`)")


def _build(user: str, work: Path, script: str, backend: str) -> tuple[object, Path | None]:
    """Build as the account with --isolation backend; (process, customisation layer or None)."""
    acc = account(user)
    d = work / f"{user}-{backend}"
    d.mkdir()
    spec = {
        "name": "owners",
        "tag": "latest",
        "compressor": "none",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": "mkdir -p bin && ln -s busybox bin/sh",
        "fakeRootCommands": script,
    }
    (d / "spec.json").write_text(json.dumps(spec))
    (d / "tmp").mkdir()
    for p in (d, d / "spec.json", d / "tmp"):
        os.chown(p, acc.uid, acc.gid)
    out = d / "img.tar"
    proc = run_nsbuild(
        ["layered", d / "spec.json", "-o", out, "--isolation", backend, "--no-cache"],
        user,
        env={"TMPDIR": str(d / "tmp")},
    )
    if proc.returncode != 0:
        return proc, None
    return proc, image_layers(out, d / "x")[-1]


def _listing(layer: Path) -> dict[str, tuple]:
    with tarfile.open(layer) as tf:
        return {
            m.name: (
                m.type,
                oct(m.mode),
                m.uid,
                m.gid,
                m.uname,
                m.gname,
                m.devmajor,
                m.devminor,
                sorted(k for k in m.pax_headers if k.startswith("SCHILY.xattr.")),
            )
            for m in tf.getmembers()
        }


def _differences(want: Path, got: Path) -> dict[str, tuple]:
    a, b = _listing(want), _listing(got)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


VARIANTS = [("test", "userns-fakeroot"), ("test", "fakeroot"), ("nosub", "userns-fakeroot"), ("nosub", "fakeroot")]


def test_every_backend_writes_the_userns_bytes(user_tmp: UserTmpFactory) -> None:
    _require_tools()
    work = user_tmp(None)
    script = _ownership_script()
    proc, reference = _build("test", work, script, "userns")
    assert reference is not None, describe(proc)
    ref = _listing(reference)
    t, n = account("test").uid, account("nosub").uid
    # What the kernel did (the reference itself is checked, not only the agreement with it).
    assert ref[f"own-{t}"][1:4] == (oct(0o4755), t, t), ref[f"own-{t}"]
    assert ref[f"own-{n}"][1:4] == (oct(0o4755), n, n), ref[f"own-{n}"]
    assert ref["suid-then-chown"][1:4] == (oct(0o755), 1003, 1003), "a chown clears setuid and setgid"
    assert ref["sgid-noexec"][1] == oct(0o2644), "setgid without group exec is not cleared"
    assert ref["suid-xattr"][1] == oct(0o4755), "setting an extended attribute keeps setuid"
    assert ref["cdev"][0] == tarfile.CHRTYPE and ref["bdev"][6:8] == (8, 0)
    assert "SCHILY.xattr.security.capability" in ref["capbin"][8]
    assert ref["capown"][2:4] == (n, n) and "SCHILY.xattr.security.capability" in ref["capown"][8]
    want = reference.read_bytes()
    for user, backend in VARIANTS:
        proc, layer = _build(user, work, script, backend)
        assert layer is not None, describe(proc)
        assert layer.read_bytes() == want, (user, backend, _differences(reference, layer))


def test_what_fakeroot_cannot_tell_fails_the_build(user_tmp: UserTmpFactory) -> None:
    """A program setting an extended attribute itself (not through setfattr/setcap) on a file fakeroot
    has no record of: plain fakeroot records the caller's real ids, indistinguishable from a chown to
    them. That build fails (exit 1, one line naming the file), never writes either owner; the namespace
    backends record it and agree with userns."""
    _require_tools()
    work = user_tmp(None)
    script = 'touch n && python3 -c \'import os; os.setxattr("n", "user.k", b"v")\'\n'
    proc, reference = _build("test", work, script, "userns")
    assert reference is not None, describe(proc)
    assert _listing(reference)["n"][2:4] == (0, 0)
    for user in ("test", "nosub"):
        proc, layer = _build(user, work, script, "userns-fakeroot")
        assert layer is not None, describe(proc)
        assert layer.read_bytes() == reference.read_bytes(), _differences(reference, layer)
        proc, layer = _build(user, work, script, "fakeroot")
        assert proc.returncode == 1 and layer is None, describe(proc)
        assert "/n:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (work / f"{user}-fakeroot" / "img.tar").exists()
        assert os.listdir(work / f"{user}-fakeroot" / "tmp") == []
