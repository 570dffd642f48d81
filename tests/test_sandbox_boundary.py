"""The sandbox boundary (issue 11): a script cannot reach the host or the caller's secrets, and a build
never changes its inputs.

A hostile base image's /bin/sh (a busybox shell script, run for runAsRoot and for enableFakechroot
fakeRootCommands) attacks from inside the chroot: /proc/PID/root of every process it sees, the caller's
files, the caller's environment in /proc/PID/environ and cmdline, host /tmp, signals to a host process
of the same account, the network, unmounting /proc or mounting a new one. Each attempt that works
writes ESCAPE into a report inside the image; positive controls show that the probes themselves work.
Everything runs the installed nsbuild as the unprivileged accounts.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX, FakeStore, require_busybox
from support.users import (
    UserTmpFactory,
    account,
    describe,
    has_subids,
    is_root,
    popen_as,
    popen_nsbuild,
    processes_of,
    run_nsbuild,
)
from support.verifiers import image_layers

SECRET_A, SECRET_B = "s3cr3t-", uuid.uuid4().hex  # never on one command line together

HOSTILE_SH = r"""#!/bin/busybox sh
bb=/bin/busybox
R=/report.txt
say() { echo "$*" >> $R; }
say ran
$bb cat /proc/1/root/etc/marker 2>/dev/null | $bb grep -q inside-image && say control-proc1-root
$bb ls /proc/1/ >/dev/null 2>&1 && say control-proc
S="@SA@@SB@"
for p in /proc/[0-9]*; do
  $bb cat "$p/root@CANARY@" >/dev/null 2>&1 && say "ESCAPE canary via $p/root"
  $bb ls "$p/root@WORK@" >/dev/null 2>&1 && say "ESCAPE host tree via $p/root"
  for f in environ cmdline; do
    $bb cat "$p/$f" 2>/dev/null | $bb tr '\0' '\n' | $bb grep -q "$S" && say "ESCAPE secret in $p/$f"
  done
  $bb echo pwned 2>/dev/null > "$p/root/tmp/@MARK@"
done
$bb cat @CANARY@ >/dev/null 2>&1 && say "ESCAPE canary direct"
$bb env | $bb grep -q "$S" && say "ESCAPE secret in env"
$bb kill -0 @HOSTPID@ 2>/dev/null && say "ESCAPE host process visible"
$bb kill -9 @HOSTPID@ 2>/dev/null
$bb kill -9 -1 2>/dev/null
$bb wget -q -T 5 -O /dev/null http://127.0.0.1:@PORT@/hostile 2>/dev/null && say "ESCAPE network"
$bb umount -l /proc 2>/dev/null && say info-umounted-proc
for p in /proc/[0-9]*; do
  $bb cat "$p/root@CANARY@" >/dev/null 2>&1 && say "ESCAPE canary after umount via $p"
done
$bb mkdir -p /mnt-h && $bb mount -t proc proc /mnt-h 2>/dev/null && {
  say info-new-proc
  for p in /mnt-h/[0-9]*; do
    $bb cat "$p/root@CANARY@" >/dev/null 2>&1 && say "ESCAPE canary via new proc $p"
    $bb cat "$p/environ" 2>/dev/null | $bb tr '\0' '\n' | $bb grep -q "$S" && say "ESCAPE secret in new proc $p"
  done
  $bb umount /mnt-h
}
$bb rmdir /mnt-h 2>/dev/null
$bb mount -t proc proc /proc 2>/dev/null
exec $bb sh "$@"
"""


def _require() -> None:
    require_busybox()
    if shutil.which("fakeroot") is None:
        pytest.skip("fakeroot is not installed (`make deps`)")


def _entry(name: str, data: bytes | None = None, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    if data is None:
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    else:
        ti.size, ti.mode = len(data), mode
    return ti, data


def _hostile_base(path: Path, sh: str) -> None:
    """A docker-archive: static busybox, the hostile /bin/sh, a marker file and the system dirs."""
    entries = [
        _entry("bin"),
        _entry("bin/busybox", Path(HOST_BUSYBOX).read_bytes(), 0o755),
        _entry("bin/sh", sh.encode(), 0o755),
        _entry("etc"),
        _entry("etc/marker", b"inside-image\n"),
        *(_entry(d) for d in ("tmp", "proc", "dev", "sys", "root")),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    layer = buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "1970-01-01T00:00:01Z"}],
        }
    ).encode()
    cname = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cname, "RepoTags": ["hostile:latest"], "Layers": ["L0/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tf:
        for name, data in (("manifest.json", manifest), (cname, config), ("L0/layer.tar", layer)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


class _Listener:
    """An HTTP server on 127.0.0.1 that records every request (none may come from a sandbox)."""

    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                hits.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.hits = hits
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    srv = _Listener()
    yield srv
    srv.close()


def _own(user: str | None, *paths: Path) -> None:
    if is_root():
        acc = account(user)
        for p in paths:
            os.lchown(p, acc.uid, acc.gid)


def _setup(user: str | None, work: Path) -> tuple[Path, Path, str]:
    """A canary the caller can read (its own file, mode 0600), a scratch TMPDIR, a host /tmp marker name."""
    secret_dir = work / "private"
    secret_dir.mkdir()
    canary = secret_dir / "canary"
    canary.write_text("caller-secret\n")
    canary.chmod(0o600)
    tmp = work / "tmp"
    tmp.mkdir()
    _own(user, secret_dir, canary, tmp)
    return canary, tmp, f"nsbuild-h5-{uuid.uuid4().hex[:12]}"


def _report(image: Path, work: Path, name: str) -> list[str]:
    layer = image_layers(image, work / f"x-{uuid.uuid4().hex[:8]}")[-1]
    with tarfile.open(layer) as tf:
        f = tf.extractfile(name)
        assert f is not None, f"{name} is not in the script's layer"
        return f.read().decode().splitlines()


def _host_sleeper(user: str | None) -> subprocess.Popen:
    return popen_as(["sleep", "600"], user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _sh(canary: Path, work: Path, mark: str, pid: int, port: int) -> str:
    repl = {
        "@CANARY@": str(canary),
        "@WORK@": str(work),
        "@MARK@": mark,
        "@HOSTPID@": str(pid),
        "@PORT@": str(port),
        "@SA@": SECRET_A,
        "@SB@": SECRET_B,
    }
    text = HOSTILE_SH
    for k, v in repl.items():
        text = text.replace(k, v)
    return text


def _backends(user: str | None) -> list[str]:
    return ["userns", "userns-fakeroot"] if has_subids(user) else ["userns-fakeroot"]


@pytest.mark.parametrize("kind", ["runAsRoot", "enableFakechroot"])
def test_hostile_shell_cannot_leave_the_image(
    unprivileged_user: str | None, user_tmp: UserTmpFactory, listener: _Listener, kind: str
) -> None:
    _require()
    user = unprivileged_user
    work = user_tmp(user)
    canary, tmp, mark = _setup(user, work)
    sleeper = _host_sleeper(user)
    try:
        base = work / "hostile.tar"
        _hostile_base(base, _sh(canary, work, mark, sleeper.pid, listener.port))
        _own(user, base)
        for backend in _backends(user):
            spec: dict = {"name": "victim", "tag": "t", "compressor": "none", "fromImage": str(base)}
            if kind == "runAsRoot":
                spec["runAsRoot"] = "echo built > /built"
                command = "image"
            else:
                spec.update(enableFakechroot=True, fakeRootCommands="echo built > /built")
                command = "layered"
            spec_path = work / f"spec-{kind}-{backend}.json"
            spec_path.write_text(json.dumps(spec))
            _own(user, spec_path)
            out = work / f"out-{kind}-{backend}.tar"
            env = {"TMPDIR": str(tmp), "REGISTRY_PASSWORD": SECRET_A + SECRET_B, "NSBUILD_TOKEN": SECRET_A + SECRET_B}
            proc = run_nsbuild([command, spec_path, "-o", out, "--isolation", backend], user=user, env=env)
            # The build still behaves: the script's own work is in the image.
            assert proc.returncode == 0, describe(proc)
            report = _report(out, work, "report.txt")
            assert "ran" in report and "control-proc1-root" in report and "control-proc" in report, report
            assert [line for line in report if line.startswith("ESCAPE")] == [], (kind, backend, report)
            assert _report(out, work, "built") == ["built"]
            assert not Path("/tmp", mark).exists(), "the script wrote into the host's /tmp"
            assert sleeper.poll() is None, "the script killed a host process"
            assert listener.hits == [], "the script reached a host network service"
            assert canary.read_text() == "caller-secret\n"
    finally:
        sleeper.kill()
        sleeper.wait()
        Path("/tmp", mark).unlink(missing_ok=True)


NO_CHROOT_SCRIPT = r"""
say() { echo "$*" >> report.txt; }
say ran
S="@SA@""@SB@"
echo ok > "$TMPDIR/probe" && say control-tmpdir
echo ok > "$HOME/probe" && say control-home
for p in /proc/[0-9]*; do
  for f in environ cmdline; do tr '\0' '\n' < "$p/$f" 2>/dev/null | grep -q "$S" && say "ESCAPE secret in $p/$f"; done
done
env | grep -q "$S" && say "ESCAPE secret in env"
echo pwned > "/tmp/@MARK@" && say control-private-tmp
echo pwned 2>/dev/null > "@CANARY@" && say "ESCAPE wrote the caller's file"
# (fakeroot answers a chown from its records: the owner on disk is what the test checks)
chown 4000:4000 "@CANARY@" 2>/dev/null || true
mount -o remount,rw / 2>/dev/null && say "ESCAPE remounted / writable"
umount -l /proc 2>/dev/null && say "ESCAPE unmounted /proc"
kill -0 @HOSTPID@ 2>/dev/null && say "ESCAPE host process visible"
echo built > built
"""


def test_fake_root_commands_without_chroot(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """fakeRootCommands on the host's tree (no chroot): the host is read-only to it except the image
    tree, $HOME and $TMPDIR; /tmp is a private tmpfs (the host's stays untouched); the caller's secrets
    and nsbuild's processes are out of sight."""
    _require()
    user = unprivileged_user
    work = user_tmp(user)
    canary, tmp, mark = _setup(user, work)
    sleeper = _host_sleeper(user)
    try:
        script = NO_CHROOT_SCRIPT
        for k, v in {
            "@CANARY@": str(canary),
            "@MARK@": mark,
            "@HOSTPID@": str(sleeper.pid),
            "@SA@": SECRET_A,
            "@SB@": SECRET_B,
        }.items():
            script = script.replace(k, v)
        # The build's scratch tree in /var/tmp, and in /tmp (no TMPDIR), below the script's own /tmp.
        for backend, scratch in [(b, t) for b in _backends(user) for t in (str(tmp), None)]:
            spec = {
                "name": "victim",
                "tag": "t",
                "compressor": "none",
                "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
                "fakeRootCommands": script,
            }
            spec_path = work / f"spec-{backend}.json"
            spec_path.write_text(json.dumps(spec))
            _own(user, spec_path)
            out = work / f"out-{backend}-{bool(scratch)}.tar"
            env = {"REGISTRY_PASSWORD": SECRET_A + SECRET_B, **({"TMPDIR": scratch} if scratch else {})}
            proc = run_nsbuild(["layered", spec_path, "-o", out, "--isolation", backend], user=user, env=env)
            assert proc.returncode == 0, describe(proc)
            report = _report(out, work, "report.txt")
            assert {"ran", "control-tmpdir", "control-home", "control-private-tmp"} <= set(report), report
            assert [line for line in report if line.startswith("ESCAPE")] == [], (backend, report)
            assert not Path("/tmp", mark).exists()
            assert canary.read_text() == "caller-secret\n"
            assert os.stat(canary).st_uid == account(user).uid
            assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
        Path("/tmp", mark).unlink(missing_ok=True)


def _stat_all(*roots: Path) -> dict[str, tuple]:
    """Everything stat tells about every input file (ctime included); atime is the reader's business."""
    out = {}
    for root in roots:
        paths = [root] if not root.is_dir() else [root, *sorted(root.rglob("*"))]
        for p in paths:
            st = os.lstat(p)
            out[str(p)] = (
                st.st_ino,
                st.st_mode,
                st.st_nlink,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
            if stat.S_ISREG(st.st_mode):
                out[str(p) + "#data"] = (hashlib.sha256(p.read_bytes()).hexdigest(),)
    return out


LOWER_ATTACK = """
echo pwned > ../lower/etc/motd 2>/dev/null || true
chown 4000:4000 ../lower/etc/passwd 2>/dev/null || true
chmod 777 ../lower/etc 2>/dev/null || true
echo changed > etc/motd
chown 4000:4000 etc/passwd
"""


def test_a_build_never_changes_its_inputs(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """Every backend, a script attacking the lower layers (../lower) and changing the image: the content
    tree, the store path, the base image and the spec keep every byte and every stat field, ctime
    included, and the image has the script's changes."""
    _require()
    user = unprivileged_user
    work = user_tmp(user)
    rootfs = work / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/motd").write_text("hello\n")
    (rootfs / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (rootfs / "etc/linked").write_text("two names\n")
    os.link(rootfs / "etc/linked", rootfs / "etc/linked2")
    store = FakeStore(work / "store")
    tool = store.add("tool-1", {"bin/tool": "#!/bin/sh\n", "share/tool/data": b"t" * 5000})
    base = work / "base.tar"
    _hostile_base(base, '#!/bin/busybox sh\nexec /bin/busybox sh "$@"\n')
    tmp = work / "tmp"
    tmp.mkdir()
    if is_root():
        acc = account(user)
        for p in [rootfs, *rootfs.rglob("*"), store.dir, *store.dir.rglob("*"), base, tmp]:
            os.lchown(p, acc.uid, acc.gid)
    backends = (["userns"] if has_subids(user) else []) + ["userns-fakeroot", "fakeroot"]
    for backend in backends:
        spec = {
            "name": "inputs",
            "tag": "t",
            "compressor": "none",
            "contents": ["rootfs", str(tool)],
            "storeDir": str(store.dir),
            "fromImage": str(base),
            "fakeRootCommands": LOWER_ATTACK,
        }
        spec_path = work / f"spec-{backend}.json"
        spec_path.write_text(json.dumps(spec))
        _own(user, spec_path)
        before = _stat_all(rootfs, store.dir, base, spec_path)
        for i in range(2):  # the second build reuses the content layer: still nothing changes
            out = work / f"out-{backend}-{i}.tar"
            proc = run_nsbuild(
                ["layered", spec_path, "-o", out, "--isolation", backend], user=user, env={"TMPDIR": str(tmp)}
            )
            assert proc.returncode == 0, describe(proc)
            assert _stat_all(rootfs, store.dir, base, spec_path) == before, f"{backend}: the build changed its inputs"
            layer = image_layers(out, work / f"x-{backend}-{i}")[-1]
            with tarfile.open(layer) as tf:
                motd = tf.extractfile("etc/motd")
                assert motd is not None and motd.read() == b"changed\n"
                assert tf.getmember("etc/passwd").uid == 4000, backend
        assert os.listdir(tmp) == [], f"{backend} left temporary files behind"


def _secret_holders(user: str | None, secret: bytes, skip: int) -> list[str]:
    """Processes of the account (but `skip`) whose environment or command line holds the secret."""
    found = []
    for pid, _ in processes_of(user):
        if pid == skip:
            continue
        for f in ("environ", "cmdline"):
            try:
                if secret in Path(f"/proc/{pid}/{f}").read_bytes():
                    found.append(f"{pid} {f}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:200]!r}")
            except OSError:
                continue
    return found


PEEK = (
    (
        'S="@SA@""@SB@"\necho ran >> @OUT@\n'
        'for p in /proc/[0-9]*; do for f in environ cmdline; do tr "\\0" "\\n" < "$p/$f" 2>/dev/null'
        ' | grep -q "$S" && echo "ESCAPE $p/$f" >> @OUT@; done; done; true\n'
    )
    .replace("@SA@", SECRET_A)
    .replace("@SB@", SECRET_B)
)


def test_no_sandbox_process_holds_the_callers_secret(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """Seen from the host while the script runs: of every process of the build, only nsbuild's own has
    the caller's environment; no command line holds it (stage1's configuration goes over a pipe)."""
    _require()
    user = unprivileged_user
    work = user_tmp(user)
    tmp = work / "tmp"
    tmp.mkdir()
    _own(user, tmp)
    secret = SECRET_A + SECRET_B
    for backend in [*_backends(user), "fakeroot"]:
        marker = f"{3000 + uuid.uuid4().int % 100000}.{os.getpid()}"
        spec = {
            "name": "victim",
            "tag": "t",
            "compressor": "none",
            "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
            "extraCommands": PEEK.replace("@OUT@", "extra-report"),
            "fakeRootCommands": PEEK.replace("@OUT@", "script-report") + f"sleep {marker} || true\necho built > built",
        }
        spec_path = work / f"spec-{backend}.json"
        spec_path.write_text(json.dumps(spec))
        _own(user, spec_path)
        out = work / f"out-{backend}.tar"
        env = {"TMPDIR": str(tmp), "REGISTRY_PASSWORD": secret}
        proc = popen_nsbuild(["layered", spec_path, "-o", out, "--isolation", backend], user, env=env)
        try:
            sleeper = None
            for _ in range(6000):  # hang guard only
                sleeper = next((pid for pid, cmd in processes_of(user) if cmd == f"sleep {marker}"), None)
                if sleeper is not None or proc.poll() is not None:
                    break
                time.sleep(0.05)
            assert sleeper is not None, proc.communicate()
            assert _secret_holders(user, secret.encode(), skip=proc.pid) == [], backend
            assert secret.encode() in Path(f"/proc/{proc.pid}/environ").read_bytes()  # the probe works
            os.kill(sleeper, signal.SIGKILL)
            _, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, (backend, err)
        assert _report(out, work, "built") == ["built"]
        # Scripts that run as the caller beside nsbuild (extraCommands; the fakeroot backend) cannot
        # read nsbuild's own environment either (it is not dumpable).
        for name in ("extra-report", "script-report"):
            report = _report(out, work, name)
            assert "ran" in report and [x for x in report if x.startswith("ESCAPE")] == [], (backend, name, report)


HOME_PEEK = r"""
say() { echo "$*" >> report.txt; }
say ran
cat "@CANARY@" > /dev/null 2>&1 && say "ESCAPE read the caller's home"
ls -A "@HOME@" | grep -q keys-dir && say "ESCAPE listed the caller's home"
cp "$NSBUILD_SPEC_DIR/data.txt" copied.txt && say control-spec-dir
[ "$(command -v cp)" = "@HOME@/profile/bin/cp" ] && say control-path-below-home
echo x 2>/dev/null > "$NSBUILD_SPEC_DIR/new" && say "ESCAPE wrote the spec directory"
echo ok > "$TMPDIR/probe" && say control-tmpdir
true
"""


def test_callers_home_is_out_of_sight(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """The caller's home (~/.docker/config.json, keys) is an empty directory for a script on the host's
    tree, while the spec's directory and the build's own trees below the home stay usable."""
    _require()
    user = unprivileged_user
    acc = account(user)
    if not acc.home.is_dir() or acc.home == Path("/"):
        pytest.skip(f"{acc.name} has no home directory")
    base = acc.home / f"h5-{uuid.uuid4().hex[:8]}"
    try:
        (base / "keys-dir").mkdir(parents=True)
        canary = base / "keys-dir" / "secret"
        canary.write_text("caller-secret\n")
        proj = base / "proj"
        proj.mkdir()
        (proj / "data.txt").write_text("from the spec dir\n")
        tmp = base / "tmp"  # the build's scratch tree below the home too
        tmp.mkdir()
        # A PATH entry below the home that leads out of it, as a Nix user's ~/.nix-profile/bin.
        (base / "profile").mkdir()
        (base / "profile" / "bin").symlink_to("/usr/bin")
        script = HOME_PEEK.replace("@CANARY@", str(canary)).replace("@HOME@", str(base))
        for backend in _backends(user):
            spec = {
                "name": "victim",
                "tag": "t",
                "compressor": "none",
                "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
                "fakeRootCommands": script,
            }
            spec_path = proj / f"spec-{backend}.json"
            spec_path.write_text(json.dumps(spec))
            if is_root():
                for p in [base, *base.rglob("*")]:
                    os.lchown(p, acc.uid, acc.gid)
            out = base / f"out-{backend}.tar"
            proc = run_nsbuild(
                ["layered", spec_path, "-o", out, "--isolation", backend],
                user=user,
                env={"TMPDIR": str(tmp), "PATH": f"{base}/profile/bin:/usr/bin:/bin"},
            )
            assert proc.returncode == 0, describe(proc)
            report = _report(out, base, "report.txt")
            assert {"ran", "control-spec-dir", "control-tmpdir", "control-path-below-home"} <= set(report), report
            assert [x for x in report if x.startswith("ESCAPE")] == [], (backend, report)
            assert _report(out, base, "copied.txt") == ["from the spec dir"]
            assert not (proj / "new").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
