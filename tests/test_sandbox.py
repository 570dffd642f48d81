"""The sandbox around fakeRootCommands: process hygiene, network, temporary trees, doctor (issue 3).

Everything runs the installed nsbuild as an unprivileged account and checks the host afterwards with
ordinary tools (pgrep via /proc, directory listings).
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
from support.core import HOST_BUSYBOX
from support.users import (
    UserTmpFactory,
    account,
    as_user_argv,
    backends_for,
    describe,
    has_subids,
    is_root,
    nsbuild_cmd,
    processes_with,
    run_as,
    run_nsbuild,
    user_env,
)
from support.verifiers import image_layers


def _write_spec(user: str | None, work: Path, script: str, **extra: object) -> Path:
    if shutil.which("fakeroot") is None:
        pytest.skip("fakeroot is not installed (`make deps`)")
    spec = {
        "name": "sandbox-test",
        "tag": "latest",
        "compressor": "none",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": "mkdir -p bin && ln -s busybox bin/sh",
        "fakeRootCommands": script,
    }
    spec.update(extra)
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    if is_root():
        acc = account(user)
        for p in (path, tmp):
            os.chown(p, acc.uid, acc.gid)
    return path


def _layer_files(image: Path, work: Path) -> dict[str, bytes]:
    layer = image_layers(image, work / f"x-{image.stem}")[-1]
    out = {}
    with tarfile.open(layer) as tf:
        for m in tf.getmembers():
            if m.isfile():
                f = tf.extractfile(m)
                out[m.name] = f.read() if f else b""
    return out


def test_background_processes_die_with_the_build(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """`sleep 1000 &`, a setsid'd daemon and a double fork: none of them survives the build."""
    user = unprivileged_user
    work = user_tmp(user)
    for backend in backends_for(user):
        marker = f"{1000 + uuid.uuid4().int % 100000}.{os.getpid()}"
        script = (
            f"sleep {marker} &\nsetsid sleep {marker} &\n(sleep {marker} & ) \n"
            f"nohup sleep {marker} > /dev/null 2>&1 &\ntouch done"
        )
        spec = _write_spec(user, work, script)
        out = work / f"img-{backend}.tar"
        proc = run_nsbuild(
            ["layered", spec, "-o", out, "--isolation", backend], user=user, env={"TMPDIR": str(work / "tmp")}
        )
        assert proc.returncode == 0, describe(proc)
        assert processes_with(f"sleep {marker}") == [], backend
        assert os.listdir(work / "tmp") == [], f"{backend} left temporary files behind"


def test_ctrl_c_during_script(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """SIGINT to nsbuild's process group (a terminal's Ctrl-C) while the script runs: exit 130, no
    process of the build left, no temporary tree, no output; also with files owned by other ids."""
    user = unprivileged_user
    work = user_tmp(user)
    for backend in backends_for(user):
        marker = f"{2000 + uuid.uuid4().int % 100000}.{os.getpid()}"
        # The script cannot write outside the image tree (the host is read-only to it): its second
        # sleep running is the sign that it got there.
        script = (
            f"mkdir -p owned/deep && chown -R 4000:4000 owned && chmod 500 owned\nsleep {marker} &\nsleep {marker}\n"
        )
        spec = _write_spec(user, work, script)
        out = work / f"img-{backend}.tar"
        argv = as_user_argv([*nsbuild_cmd(), "layered", str(spec), "-o", str(out), "--isolation", backend], user)
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
            while len(processes_with(f"sleep {marker}")) < 2:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the script never started"
                time.sleep(0.05)
            assert processes_with(f"sleep {marker}"), "the script's sleep should be running"
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 130, (backend, proc.returncode, err)
        assert "Traceback" not in err.decode(errors="replace")
        assert processes_with(f"sleep {marker}") == [], backend
        assert os.listdir(work / "tmp") == [], f"{backend} left temporary files behind"
        assert not out.exists()


def test_network_only_loopback(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """The script sees its own network namespace with lo up and nothing else; --network host opts out
    (the fakeroot backend has no namespaces, hence no network isolation)."""
    user = unprivileged_user
    work = user_tmp(user)
    script = (
        "cat /proc/net/dev > netdev\n"
        "cat /sys/class/net/lo/operstate > lo-state 2>/dev/null || true\n"
        "cat /proc/net/if_inet6 > inet6 2>/dev/null || true\n"
        "ls /proc > procs"
    )
    host_ifaces = {ln.split(":")[0].strip() for ln in Path("/proc/net/dev").read_text().splitlines()[2:]}
    for backend in [b for b in backends_for(user) if b != "fakeroot"]:
        spec = _write_spec(user, work, script)
        out = work / f"img-{backend}.tar"
        proc = run_nsbuild(
            ["layered", spec, "-o", out, "--isolation", backend], user=user, env={"TMPDIR": str(work / "tmp")}
        )
        assert proc.returncode == 0, describe(proc)
        files = _layer_files(out, work)
        ifaces = {ln.split(":")[0].strip() for ln in files["netdev"].decode().splitlines()[2:]}
        assert ifaces == {"lo"}, (backend, ifaces)
        # lo is up: it holds ::1 (the kernel adds it only to an up interface).
        assert b"lo" in files["inet6"], (backend, files["inet6"])
        # A pid namespace of its own: only a handful of pids are visible.
        pids = [p for p in files["procs"].decode().split() if p.isdigit()]
        assert len(pids) < 20, (backend, pids)
        # --network host: the host's interfaces are visible.
        out2 = work / f"img-{backend}-host.tar"
        proc = run_nsbuild(
            ["layered", spec, "-o", out2, "--isolation", backend, "--network", "host"],
            user=user,
            env={"TMPDIR": str(work / "tmp")},
        )
        assert proc.returncode == 0, describe(proc)
        files = _layer_files(out2, work)
        ifaces = {ln.split(":")[0].strip() for ln in files["netdev"].decode().splitlines()[2:]}
        assert ifaces == host_ifaces, (backend, ifaces)


def test_deleted_lower_file_gone_in_container(
    user_with_subids: str | None, user_tmp: UserTmpFactory, require_podman: None
) -> None:
    from support.verifiers import podman_load_and_run

    user = user_with_subids
    work = user_tmp(user)
    rootfs = work / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/doomed").write_text("x\n")
    (rootfs / "etc/kept").write_text("k\n")
    if is_root():
        acc = account(user)
        for p in (rootfs, rootfs / "etc", rootfs / "etc/doomed", rootfs / "etc/kept"):
            os.chown(p, acc.uid, acc.gid)
    spec = _write_spec(
        user,
        work,
        "rm etc/doomed",
        contents=["rootfs", {"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        config={"Cmd": ["/bin/busybox", "ls", "/etc"]},
    )
    for backend in backends_for(user):
        out = work / f"img-{backend}.tar"
        proc = run_nsbuild(
            ["layered", spec, "-o", out, "--isolation", backend], user=user, env={"TMPDIR": str(work / "tmp")}
        )
        assert proc.returncode == 0, describe(proc)
        shown = podman_load_and_run(out, user=user).split()
        assert "kept" in shown and "doomed" not in shown, (backend, shown)


def test_doctor_reports_backends(unprivileged_user: str | None) -> None:
    proc = run_nsbuild(["doctor"], user=unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    text = proc.stdout
    assert "[ok  ] userns-fakeroot" in text and "[ok  ] fakeroot" in text, text
    if has_subids(unprivileged_user):
        assert "[ok  ] userns " in text and "auto uses: userns\n" in text, text
    else:
        assert "[FAIL] userns " in text, text
        assert "no subordinate id range" in text and "usermod --add-subuids" in text, text
        assert "auto uses: userns-fakeroot" in text, text


def _without_userns(user: str | None, argv: list[str], path: str | None = None) -> subprocess.CompletedProcess:
    """argv inside a user namespace whose user.max_user_namespaces is 0: no further user namespace can
    be created there, as on a host where an administrator disabled them."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    inner = 'echo 0 > /proc/sys/user/max_user_namespaces && p=$1 && shift && PATH=$p exec "$@"'
    path = path or user_env(user)["PATH"]
    return run_as(["unshare", "--user", "--map-root-user", "sh", "-c", inner, "sh", path, *argv], user)


def test_doctor_without_user_namespaces(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    user = unprivileged_user
    proc = _without_userns(user, [*nsbuild_cmd(), "doctor"])
    assert proc.returncode == 0, describe(proc)
    text = proc.stdout
    assert "[FAIL] userns " in text and "[FAIL] userns-fakeroot" in text, text
    assert text.count("user.max_user_namespaces = 0") == 2, text
    assert "[ok  ] fakeroot" in text and "auto uses: fakeroot" in text, text
    # A build there falls back to the fakeroot backend by itself, and still records ownership.
    work = user_tmp(user)
    spec = _write_spec(user, work, "touch f && chown 1234:5678 f")
    out = work / "img.tar"
    proc = _without_userns(user, [*nsbuild_cmd(), "layered", str(spec), "-o", str(out)])
    assert proc.returncode == 0, describe(proc)
    assert "backend: fakeroot" in proc.stderr
    layer = image_layers(out, work / "x")[-1]
    with tarfile.open(layer) as tf:
        m = tf.getmember("f")
    assert (m.uid, m.gid) == (1234, 5678)
    # Forcing a namespace backend there: exit 1, one line saying why and what to change.
    proc = _without_userns(
        user, [*nsbuild_cmd(), "layered", str(spec), "-o", str(work / "no.tar"), "--isolation", "userns-fakeroot"]
    )
    assert proc.returncode == 1, describe(proc)
    assert "max_user_namespaces" in proc.stderr and "Traceback" not in proc.stderr
    assert not (work / "no.tar").exists()


def test_no_backend_works_one_reason_each(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """No user namespaces and no fakeroot on PATH: doctor exits 1; a build says, per backend, why."""
    user = unprivileged_user
    work = user_tmp(user)
    bindir = work / "bin"
    bindir.mkdir()
    for tool in ("bash", "sh", "mkdir", "ln", "rm", "true"):  # what extraCommands needs, no fakeroot
        (bindir / tool).symlink_to(shutil.which(tool, path="/usr/bin:/bin"))
    path = str(bindir)
    proc = _without_userns(user, [*nsbuild_cmd(), "doctor"], path=path)
    assert proc.returncode == 1, describe(proc)
    assert "no backend works here" in proc.stdout
    assert "fakeroot is not installed" in proc.stdout
    spec = _write_spec(user, work, "true")
    proc = _without_userns(user, [*nsbuild_cmd(), "layered", str(spec), "-o", str(work / "img.tar")], path=path)
    assert proc.returncode == 1, describe(proc)
    err = proc.stderr
    assert "no backend works" in err and "Traceback" not in err, err
    for backend in ("userns:", "userns-fakeroot:", "fakeroot:"):
        assert f"  {backend}" in err, err
    assert not (work / "img.tar").exists()


def test_script_is_root_with_no_new_privs(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """The script is uid 0 (real in a namespace, faked under fakeroot) and cannot gain privileges
    through a setuid binary (no-new-privs), whatever the backend."""
    user = unprivileged_user
    work = user_tmp(user)
    script = "id -u > uid\ngrep NoNewPrivs /proc/self/status > nnp\nls -n /proc/self/ > /dev/null"
    for backend in backends_for(user):
        spec = _write_spec(user, work, script)
        out = work / f"img-{backend}.tar"
        proc = run_nsbuild(
            ["layered", spec, "-o", out, "--isolation", backend], user=user, env={"TMPDIR": str(work / "tmp")}
        )
        assert proc.returncode == 0, describe(proc)
        files = _layer_files(out, work)
        assert files["uid"].strip() == b"0", (backend, files["uid"])
        assert files["nnp"].split() == [b"NoNewPrivs:", b"1"], (backend, files["nnp"])


def test_stream_stdout_holds_only_the_image(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """The script's output goes to stderr: `nsbuild stream`'s stdout stays a clean docker-archive."""
    import io

    user = unprivileged_user
    work = user_tmp(user)
    spec = _write_spec(user, work, "echo noise-on-stdout\necho noise-on-stderr >&2\ntouch f")
    proc = run_as([*nsbuild_cmd(), "stream", str(spec)], user, env={"TMPDIR": str(work / "tmp")}, text=False)
    assert proc.returncode == 0, describe(proc)
    assert b"noise-on-stdout" in proc.stderr and b"noise-on-stdout" not in proc.stdout
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tf:
        assert "manifest.json" in tf.getnames()


DRIVER = r"""
import json, sys
from pathlib import Path
from nsbuild.rootfs.customize import CustomisationJob, build_customisation_layer
from nsbuild.errors import BuildError
from nsbuild.tar.owners import Owner

class Log:
    def info(self, m): print(m, file=sys.stderr)
    def warn(self, m): print("warning:", m, file=sys.stderr)

args = json.loads(sys.argv[1])
work = Path(args["work"])
custom = work / "custom"; custom.mkdir(exist_ok=True)
sandbox = work / "sandbox"; sandbox.mkdir(exist_ok=True)
try:
    build_customisation_layer(CustomisationJob(custom_root=custom, lower=[], base_layer_tars=[], script=args["script"],
        enable_fakechroot=False, root_owner=Owner(0, 0, "root", "root"), mtime=1,
        isolation=args["backend"], network="none", workdir=sandbox, out_tar=work / "out.tar", log=Log(),
        scratch_mib=args.get("scratch"), memory_mib=args.get("memory")))
except BuildError as exc:
    print("BuildError:", exc)
    sys.exit(1)
print("ok")
"""


def test_scratch_and_memory_limits(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """runAsRoot's diskSize and buildVMMemorySize: a tmpfs of that size holds what the script writes,
    and each script process gets that much address space."""
    import sys

    user = unprivileged_user
    work = user_tmp(user)
    driver = work / "driver.py"
    driver.write_text(DRIVER)

    def go(backend: str, script: str, **limits: int) -> subprocess.CompletedProcess:
        for p in (work / "out.tar",):
            p.unlink(missing_ok=True)
        args = json.dumps({"work": str(work), "backend": backend, "script": script, **limits})
        return run_as([sys.executable, str(driver), args], user)

    big = "head -c 24000000 /dev/zero > big"
    hog = f"{sys.executable} -c 'x = bytearray(300 << 20)'"
    for backend in [b for b in backends_for(user) if b != "fakeroot"]:
        proc = go(backend, big, scratch=16)
        assert proc.returncode == 1 and "No space left on device" in proc.stderr, describe(proc)
        assert not (work / "out.tar").exists()
        proc = go(backend, big, scratch=64)
        assert proc.returncode == 0, describe(proc)
        proc = go(backend, hog, memory=200)
        assert proc.returncode == 1 and "MemoryError" in proc.stderr, describe(proc)
        proc = go(backend, hog, memory=1024)
        assert proc.returncode == 0, describe(proc)
        assert os.listdir(work / "sandbox") == []
