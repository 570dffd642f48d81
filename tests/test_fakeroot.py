"""fakeRootCommands: what every backend records in the customisation layer (issue 3).

Every build runs the installed nsbuild as an unprivileged account (nsbuild-test with subordinate ids,
nsbuild-nosub without), reads the layers back with Python's tarfile (not nsbuild's code) and, where it
says so, runs the image with podman.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX, require_busybox
from support.users import UserTmpFactory, account, backends_for, describe, is_root, run_nsbuild
from support.verifiers import check_all_layers, image_layers, podman_load_and_run

APPLETS = "sh ls cat echo id stat getcap true"

# The change matrix: every kind of change each backend must record. cwd = the image root.
MATRIX_SCRIPT = r"""
mkdir -p home/alice && chown 1000 home/alice
touch owned && chown 12345:23456 owned
touch nobody && chown 65534:65534 nobody
touch grp && chgrp 4242 grp
cp bin/busybox bin/suidtool && chmod 4755 bin/suidtool
touch sgid && chmod 2711 sgid
mkdir sticky && chmod 1777 sticky
mknod dev-null c 1 3
mknod -m 600 dev-sda b 8 0
mknod fifo p
echo data > hard1 && ln hard1 hard2
ln -s /bin/busybox symlink
mkdir capbin && cp bin/busybox capbin/cat && setcap cap_net_bind_service+ep capbin/cat
touch xa && setfattr -n user.note -v hello xa
rm etc/motd
rm -rf opt/gone
rm -rf opt/replaced && mkdir opt/replaced && echo new > opt/replaced/fresh
chmod 600 etc/lower-chmod
chown 1000:1000 etc/lower-chown
mkdir -p var/lib/app && chown -R 1000:1000 var/lib/app
"""

ROOT_OWNER_NAMES = {0: "root"}


def _require_tools() -> None:
    for tool in ("setcap", "setfattr", "fakeroot"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            pytest.skip(f"{tool} is not installed (`make deps`)")
    require_busybox()


def _rootfs(work: Path) -> Path:
    """An earlier content layer: files the script changes, deletes or replaces."""
    r = work / "rootfs"
    for d in ("etc", "opt/gone/sub", "opt/replaced/old", "opt/kept"):
        (r / d).mkdir(parents=True, exist_ok=True)
    (r / "etc/motd").write_text("motd\n")
    (r / "etc/lower-chmod").write_text("m\n")
    (r / "etc/lower-chown").write_text("c\n")
    (r / "etc/untouched").write_text("u\n")
    (r / "opt/gone/sub/f").write_text("g\n")
    (r / "opt/replaced/old/f").write_text("o\n")
    (r / "opt/replaced/other").write_text("o\n")
    (r / "opt/kept/f").write_text("k\n")
    (r / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n"
        "nobody:x:65534:65534::/nonexistent:/bin/false\n"
    )
    (r / "etc/group").write_text("root:x:0:\nalice:x:1000:\nwheel42:x:4242:\nnogroup:x:65534:\n")
    return r


def _spec(work: Path, script: str, **extra: object) -> dict:
    spec = {
        "name": "fakeroot-test",
        "tag": "latest",
        "compressor": "none",
        "contents": ["rootfs", {"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": f"mkdir -p bin && for a in {APPLETS}; do ln -s busybox bin/$a; done",
        "fakeRootCommands": script,
    }
    spec.update(extra)
    return spec


def build(
    user: str | None,
    work: Path,
    spec: dict,
    isolation: str,
    *,
    out_name: str | None = None,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess, Path]:
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = work / (out_name or f"image-{isolation}.tar")
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    acc = account(user)
    if is_root():
        for p in (spec_path, tmp):
            os.chown(p, acc.uid, acc.gid)
    proc = run_nsbuild(
        ["layered", spec_path, "-o", out, "--isolation", isolation, *extra_args],
        user=user,
        env={"TMPDIR": str(tmp), **(env or {})},
    )
    return proc, out


def listing(layer: Path) -> dict[str, tuple]:
    """name → (type, mode, uid, gid, uname, gname, linkname, devmajor, devminor, xattrs)."""
    out = {}
    with tarfile.open(layer) as tf:
        for m in tf.getmembers():
            xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")))
            out[m.name.rstrip("/")] = (
                m.type,
                m.mode,
                m.uid,
                m.gid,
                m.uname,
                m.gname,
                m.linkname,
                m.devmajor,
                m.devminor,
                xattrs,
            )
    return out


def last_layer(image: Path, work: Path) -> Path:
    return image_layers(image, work / f"unpacked-{image.stem}")[-1]


def diff_id(layer: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(layer, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
def matrix_work(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> tuple[str | None, Path]:
    _require_tools()
    work = user_tmp(unprivileged_user)
    rootfs = _rootfs(work)
    acc = account(unprivileged_user)
    if is_root():
        for dirpath, dirnames, filenames in os.walk(rootfs):
            for n in [dirpath, *[os.path.join(dirpath, x) for x in dirnames + filenames]]:
                os.lchown(n, acc.uid, acc.gid)
    return unprivileged_user, work


CAP_V2_NET_BIND = "\x01\x00\x00\x02\x00\x04\x00\x00" + "\x00" * 12


def test_matrix_recorded_identically_by_every_backend(matrix_work: tuple[str | None, Path]) -> None:
    user, work = matrix_work
    results: dict[str, dict[str, tuple]] = {}
    digests: dict[str, str] = {}
    caller = account(user)
    for backend in backends_for(user):
        proc, out = build(user, work, _spec(work, MATRIX_SCRIPT), backend)
        assert proc.returncode == 0, describe(proc)
        assert f"backend: {backend}" in proc.stderr
        layers = image_layers(out, work / f"unpacked-{backend}")
        # The caller's real uid never reaches an image, in any layer.
        for layer in layers:
            for name, entry in listing(layer).items():
                assert entry[2] != caller.uid and entry[3] != caller.gid, (backend, name, entry)
        results[backend] = listing(layers[-1])
        digests[backend] = diff_id(layers[-1])

    first = next(iter(results))
    lst = results[first]
    reg, dirt, sym, lnk = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    expect = {
        "home/alice": (dirt, 0o755, 1000, 0, "alice", "root"),
        "owned": (reg, 0o644, 12345, 23456, "", ""),
        "nobody": (reg, 0o644, 65534, 65534, "nobody", "nogroup"),
        "grp": (reg, 0o644, 0, 4242, "root", "wheel42"),
        "bin/suidtool": (reg, 0o4755, 0, 0, "root", "root"),
        "sgid": (reg, 0o2711, 0, 0, "root", "root"),
        "sticky": (dirt, 0o1777, 0, 0, "root", "root"),
        "dev-null": (tarfile.CHRTYPE, 0o644, 0, 0, "root", "root"),
        "dev-sda": (tarfile.BLKTYPE, 0o600, 0, 0, "root", "root"),
        "fifo": (tarfile.FIFOTYPE, 0o644, 0, 0, "root", "root"),
        "etc/lower-chmod": (reg, 0o600, 0, 0, "root", "root"),
        "etc/lower-chown": (reg, 0o644, 1000, 1000, "alice", "alice"),
        "var/lib/app": (dirt, 0o755, 1000, 1000, "alice", "alice"),
        "etc/.wh.motd": (reg, 0o644, 0, 0, "root", "root"),
        "opt/.wh.gone": (reg, 0o644, 0, 0, "root", "root"),
        "opt/replaced/.wh..wh..opq": (reg, 0o644, 0, 0, "root", "root"),
        "opt/replaced/fresh": (reg, 0o644, 0, 0, "root", "root"),
    }
    for name, want in expect.items():
        assert name in lst, f"{first}: {name} missing from the customisation layer: {sorted(lst)}"
        assert lst[name][:6] == want, (first, name, lst[name])
    assert lst["dev-null"][7:9] == (1, 3) and lst["dev-sda"][7:9] == (8, 0)
    hard = {lst["hard1"][0], lst["hard2"][0]}
    assert hard == {reg, lnk}
    assert lst["symlink"][0] == sym and lst["symlink"][6] == "/bin/busybox"
    assert dict(lst["capbin/cat"][9]).get("SCHILY.xattr.security.capability") == CAP_V2_NET_BIND
    assert dict(lst["xa"][9]) == {"SCHILY.xattr.user.note": "hello"}
    # Untouched lower files stay in their own layer; deleted ones are not shown again.
    for name in ("etc/untouched", "opt/kept", "opt/kept/f", "etc/motd", "opt/replaced/old"):
        assert name not in lst, (first, name)
    assert not any(k.startswith(("dev/", "proc/", "sys/")) or k in ("dev", "proc", "sys") for k in lst)
    for backend, other in results.items():
        assert other == lst, f"{backend} differs from {first}: " + repr(
            {k: (lst.get(k), other.get(k)) for k in set(lst) | set(other) if lst.get(k) != other.get(k)}
        )
    assert len(set(digests.values())) == 1, digests


def test_nixpkgs_chown_home_alice_and_untouched_owner(matrix_work: tuple[str | None, Path]) -> None:
    """nixpkgs: `mkdir -p home/alice && chown 1000 home/alice` → uid 1000; with uid/gid/uname/gname =
    1000/1000/user/user every untouched entry is 1000:1000 user:user (namespace root becomes the spec's
    owner)."""
    user, work = matrix_work
    for backend in backends_for(user):
        spec = _spec(
            work,
            "mkdir -p home/alice && chown 1000 home/alice\ntouch rootfile",
            uid=1000,
            gid=1000,
            uname="user",
            gname="user",
        )
        proc, out = build(user, work, spec, backend)
        assert proc.returncode == 0, describe(proc)
        layers = image_layers(out, work / f"nix-{backend}")
        lst = listing(layers[-1])
        assert lst["home/alice"][2] == 1000
        assert lst["rootfile"][2:6] == (1000, 1000, "user", "user")
        assert lst["bin/sh"][2:6] == (1000, 1000, "user", "user")
        for layer in layers[:-1]:
            assert all(e[2:6] == (1000, 1000, "user", "user") for e in listing(layer).values())


def _chroot_rootfs(work: Path) -> Path:
    """A root with dynamically linked bash and coreutils (and their libraries): under fakeroot a static
    busybox cannot be faked, so the chroot cases use tools fakeroot can follow."""
    r = work / "chroot-rootfs"
    tools = ["bash", "sh", "touch", "chown", "mkdir", "ls", "cat", "rm", "head", "test", "echo"]
    for tool in tools:
        path = shutil.which(tool, path="/usr/bin:/bin")
        assert path, tool
        real = Path(path)
        dest = r / real.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real.resolve(), dest)
        ldd = subprocess.run(["ldd", str(real)], capture_output=True, text=True).stdout
        for lib in [w for w in ldd.split() if w.startswith("/")]:
            ld = r / Path(lib).relative_to("/")
            ld.parent.mkdir(parents=True, exist_ok=True)
            if not ld.exists():
                shutil.copy2(Path(lib).resolve(), ld)
    if (Path("/bin").is_symlink()) and not (r / "bin").exists():
        (r / "bin").symlink_to("usr/bin")
    (r / "etc").mkdir(exist_ok=True)
    (r / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (r / "etc/group").write_text("root:x:0:\n")
    (r / "etc/gone").write_text("x\n")
    return r


CHROOT_SCRIPT = r"""
touch /testfile && chown 12345:12345 /testfile
mkdir -p /var/lib/app && echo hi > /var/lib/app/x
echo x > /dev/null
head -c 4 /dev/urandom > /dev/null
test -e /proc/self/status && test -d /sys/class
ls /proc/1 > /dev/null
rm /etc/gone
"""


def test_enable_fakechroot(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """The script runs chrooted into the image: absolute paths work, /dev /proc /sys are there and never
    reach the layer; nixpkgs' `touch /testfile && chown 12345:12345 /testfile` → 12345:12345."""
    _require_tools()
    user = unprivileged_user
    work = user_tmp(user)
    _chroot_rootfs(work)
    spec = {
        "name": "chroot-test",
        "tag": "latest",
        "compressor": "none",
        "contents": ["chroot-rootfs"],
        "enableFakechroot": True,
        "fakeRootCommands": CHROOT_SCRIPT,
    }
    results = {}
    for backend in [b for b in backends_for(user) if b != "fakeroot"]:
        proc, out = build(user, work, spec, backend)
        assert proc.returncode == 0, describe(proc)
        lst = listing(last_layer(out, work))
        assert lst["testfile"][2:4] == (12345, 12345)
        assert lst["var/lib/app/x"][0] == tarfile.REGTYPE
        assert "etc/.wh.gone" in lst
        assert not any(k.split("/")[0] in ("dev", "proc", "sys") for k in lst), sorted(lst)
        results[backend] = lst
    assert len({repr(sorted(v.items())) for v in results.values()}) == 1
    # Without namespaces there is no chroot: a clear error, exit 1, no image.
    proc, out = build(user, work, spec, "fakeroot", out_name="no-chroot.tar")
    assert proc.returncode == 1, describe(proc)
    assert "enableFakechroot" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_failing_script_exit_1_output_shown_nothing_written(
    unprivileged_user: str | None, user_tmp: UserTmpFactory
) -> None:
    _require_tools()
    user = unprivileged_user
    work = user_tmp(user)
    _rootfs(work)
    script = "echo visible-output-1234\nmkdir sub && chown 4000:4000 sub && touch sub/f\nexit 7"
    for backend in backends_for(user):
        proc, out = build(user, work, _spec(work, script), backend)
        assert proc.returncode == 1, describe(proc)
        assert "visible-output-1234" in proc.stderr
        assert "exit status 7" in proc.stderr and "Traceback" not in proc.stderr
        assert not out.exists()
        assert os.listdir(work / "tmp") == [], f"{backend} left temporary files behind"


def test_podman_runs_image_owners_setuid_and_capability(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """The built image, run by podman: ids, the setuid bit and the file capability are in effect, and
    a file the script deleted from an earlier layer is gone."""
    _require_tools()
    user = user_with_subids
    work = user_tmp(user)
    rootfs = _rootfs(work)
    acc = account(user)
    if is_root():
        for dirpath, dirnames, filenames in os.walk(rootfs):
            for n in [dirpath, *[os.path.join(dirpath, x) for x in dirnames + filenames]]:
                os.lchown(n, acc.uid, acc.gid)
    check = (
        "stat -c '%u:%g %a %n' /home/alice /bin/suidtool /owned; "
        "test -e /etc/motd && echo motd-present || echo motd-gone; "
        "grep CapEff /proc/self/status; "
        "id -u 1>&2"
    )
    for backend in backends_for(user):
        spec = _spec(work, MATRIX_SCRIPT.replace("mknod", ": mknod"), config={"Cmd": ["/bin/sh", "-c", check]})
        spec["extraCommands"] += " && ln -s busybox bin/grep && ln -s busybox bin/test"
        proc, out = build(user, work, spec, backend)
        assert proc.returncode == 0, describe(proc)
        check_all_layers(out, work / f"check-{backend}")
        shown = podman_load_and_run(out, user=user)
        assert "1000:0 755 /home/alice" in shown, shown
        assert "0:0 4755 /bin/suidtool" in shown, shown
        assert "12345:23456 644 /owned" in shown, shown
        assert "motd-gone" in shown, shown
        # As uid 1000, the binary with cap_net_bind_service+ep gets exactly that capability.
        capeff = podman_load_and_run(out, ["/capbin/cat", "/proc/self/status"], user=user, run_args=["--user", "1000"])
        line = next(ln for ln in capeff.splitlines() if ln.startswith("CapEff"))
        assert int(line.split()[1], 16) == 1 << 10, line


def test_from_image_layers_below_the_script(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """fromImage layers are what the script sees below it (owners, devices, files it deletes); every
    backend records the same changes to them."""
    _require_tools()
    user = unprivileged_user
    work = user_tmp(user)
    base = {
        "name": "base",
        "tag": "1",
        "compressor": "none",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": "mkdir -p bin etc opt/dir && ln -s busybox bin/sh && echo m > etc/motd && "
        "echo x > opt/dir/f && echo 'alice:x:1000:1000::/:/bin/sh' > etc/passwd",
        "fakeRootCommands": "mkdir srv && chown 1000:1000 srv && echo s > srv/data && chown 1000 srv/data\n"
        "mknod cdev c 1 3 && mknod keepdev c 1 5",
    }
    proc, base_tar = build(user, work, base, "userns-fakeroot", out_name="base.tar")
    assert proc.returncode == 0, describe(proc)
    script = (
        'test "$(stat -c %u:%g srv)" = 1000:1000\n'
        'test "$(stat -c %u srv/data)" = 1000\n'
        "test -e cdev && test -e keepdev\n"
        "rm etc/motd && rm -rf opt/dir && echo more >> srv/data && chown 2000 srv && chown 7:7 cdev"
    )
    child = {"name": "child", "tag": "1", "compressor": "none", "fromImage": str(base_tar), "fakeRootCommands": script}
    results, digests = {}, {}
    for backend in backends_for(user):
        proc, out = build(user, work, child, backend)
        assert proc.returncode == 0, describe(proc)
        layer = last_layer(out, work)
        results[backend], digests[backend] = listing(layer), diff_id(layer)
    lst = next(iter(results.values()))
    assert lst["srv"][:4] == (tarfile.DIRTYPE, 0o755, 2000, 1000)
    assert lst["srv/data"][:6] == (tarfile.REGTYPE, 0o644, 1000, 0, "alice", "root")
    assert lst["cdev"][0] == tarfile.CHRTYPE and lst["cdev"][2:4] == (7, 7) and lst["cdev"][7:9] == (1, 3)
    assert "etc/.wh.motd" in lst and "opt/.wh.dir" in lst and "keepdev" not in lst
    assert all(v == lst for v in results.values()), results
    assert len(set(digests.values())) == 1, digests


EDGE_SCRIPT = r"""
mv etc/untouched etc/renamed
rm etc/lower-chmod && mkdir etc/lower-chmod
chmod 700 opt/kept
touch -d @5 etc/lower-chown
setfattr -n user.d -v 1 opt/replaced
ln etc/motd etc/motd-link
rm -rf opt/gone/sub && touch opt/gone/newfile
echo appended >> opt/kept/f
"""


def test_edge_changes_identical_across_backends(matrix_work: tuple[str | None, Path]) -> None:
    """Overlayfs (userns) and copy-and-diff (fakeroot backends) agree on renames, a file replaced by a
    directory, metadata-only and time-only changes, xattrs on a lower directory, hardlinks to lower
    files, nested deletions and appends."""
    user, work = matrix_work
    if is_root():
        # A lower file whose group the namespace does not map (the caller's file, group root): overlayfs
        # cannot copy such a file up (EOVERFLOW) unless nsbuild gave the lower layer a copy.
        os.lchown(work / "rootfs/etc/untouched", account(user).uid, 0)
    results, digests = {}, {}
    runs = [(b, {}) for b in backends_for(user)]
    if "userns" in backends_for(user):
        # userns without overlayfs falls back to copy-and-diff with real ids: the same layer again.
        runs.append(("userns", {"NSBUILD_SANDBOX_ENGINE": "copy"}))
    for backend, env in runs:
        for script in (EDGE_SCRIPT, MATRIX_SCRIPT):
            key = f"{backend}{'-copy' if env else ''}-{'edge' if script is EDGE_SCRIPT else 'matrix'}"
            proc, out = build(user, work, _spec(work, script), backend, env=env, out_name=f"{key}.tar")
            assert proc.returncode == 0, describe(proc)
            if backend == "userns":
                assert ("copy-and-diff" in proc.stderr) == bool(env), proc.stderr
            layer = last_layer(out, work)
            results[key], digests[key] = listing(layer), diff_id(layer)
    for kind in ("edge", "matrix"):
        same = {k: v for k, v in results.items() if k.endswith(kind)}
        ref = next(iter(same.values()))
        for key, other in same.items():
            assert other == ref, f"{key}: " + repr(
                {k: (ref.get(k), other.get(k)) for k in set(ref) | set(other) if ref.get(k) != other.get(k)}
            )
        assert len({digests[k] for k in same}) == 1, {k: digests[k] for k in same}
    results = {k: v for k, v in results.items() if k.endswith("edge")}
    digests = {k: v for k, v in digests.items() if k.endswith("edge")}
    lst = next(iter(results.values()))
    assert "etc/.wh.untouched" in lst and lst["etc/renamed"][0] == tarfile.REGTYPE
    assert lst["etc/lower-chmod"][0] == tarfile.DIRTYPE
    assert lst["opt/kept"][1] == 0o700
    assert "etc/lower-chown" in lst
    assert dict(lst["opt/replaced"][9]) == {"SCHILY.xattr.user.d": "1"}
    assert {lst["etc/motd"][0], lst["etc/motd-link"][0]} == {tarfile.REGTYPE, tarfile.LNKTYPE}
    assert "opt/gone/.wh.sub" in lst and "opt/gone/newfile" in lst and "opt/gone/sub/f" not in lst
    assert "opt/kept/f" in lst
    for backend, other in results.items():
        assert other == lst, f"{backend}: " + repr(
            {k: (lst.get(k), other.get(k)) for k in set(lst) | set(other) if lst.get(k) != other.get(k)}
        )
    assert len(set(digests.values())) == 1, digests


def test_nixpkgs_fakechroot_with_static_busybox(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """nixpkgs' case as written (a static busybox image, enableFakechroot, `touch /testfile && chown
    12345:12345 /testfile`): recorded by userns; the fakeroot-based backend cannot follow a static
    shell, and says so before the script runs instead of failing silently."""
    _require_tools()
    user = unprivileged_user
    work = user_tmp(user)
    spec = {
        "name": "busybox-chroot",
        "tag": "latest",
        "compressor": "none",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": "mkdir -p bin && for a in sh touch chown; do ln -s busybox bin/$a; done",
        "enableFakechroot": True,
        "fakeRootCommands": "touch /testfile && chown 12345:12345 /testfile",
    }
    if "userns" in backends_for(user):
        proc, out = build(user, work, spec, "userns")
        assert proc.returncode == 0, describe(proc)
        assert "statically linked" not in proc.stderr
        assert listing(last_layer(out, work))["testfile"][2:4] == (12345, 12345)
    proc, out = build(user, work, spec, "userns-fakeroot")
    assert "/bin/sh is statically linked" in proc.stderr, describe(proc)


def test_contents_folded_into_the_customisation_layer(matrix_work: tuple[str | None, Path]) -> None:
    """fromImage fills the layer budget (maxLayers 3 for a 2-layer base): the contents are folded into the customisation
    layer itself; what the script changes in them lands there, with no whiteout for what is not below."""
    user, work = matrix_work
    base = {
        "name": "base",
        "tag": "1",
        "compressor": "none",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
    }
    proc, base_tar = build(user, work, base, "userns-fakeroot", out_name="base.tar")
    assert proc.returncode == 0, describe(proc)
    results = {}
    for backend in backends_for(user):
        spec = _spec(
            work,
            "chown 1000:1000 etc/lower-chown && rm etc/motd && chmod 4755 bin/busybox",
            maxLayers=3,
            fromImage=str(base_tar),
        )
        spec["contents"] = ["rootfs"]
        proc, out = build(user, work, spec, backend)
        assert proc.returncode == 0, describe(proc)
        layers = image_layers(out, work / f"fold-{backend}")
        assert len(layers) == 3, layers
        lst = listing(layers[-1])
        assert lst["etc/lower-chown"][2:4] == (1000, 1000)
        assert lst["etc/untouched"][2:4] == (0, 0)
        assert lst["bin/busybox"][1] == 0o4755  # from the base layer: copied up
        assert "etc/motd" not in lst and "etc/.wh.motd" not in lst, sorted(lst)
        results[backend] = lst
    assert all(v == next(iter(results.values())) for v in results.values())
