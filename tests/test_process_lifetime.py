"""No process a script starts outlives the build, however it was started and however nsbuild ended;
a build killed outright leaves nothing the next build does not clean up (issue 11).

Every build runs the installed nsbuild as an unprivileged account. Processes are found through /proc
by a marker in their command line (a `sleep` duration no other process uses).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX
from support.users import (
    UserTmpFactory,
    account,
    as_user_argv,
    describe,
    has_subids,
    is_root,
    nsbuild_cmd,
    popen_nsbuild,
    processes_with,
    run_as,
    run_nsbuild,
    user_env,
)

HANG_GUARD = 120  # seconds; only to fail instead of hanging, never a performance bound


def _marker() -> str:
    return f"{3000 + uuid.uuid4().int % 100000}.{os.getpid()}"


def _escapes(marker: str) -> str:
    """Every way a script can try to leave its process tree behind."""
    return (
        f"setsid -f sleep {marker}\n"
        f"(setsid sleep {marker} &)\n"
        f"(sleep {marker} &)\n"
        f"nohup sleep {marker} > /dev/null 2>&1 &\n"
        f"sleep {marker} &\n"
    )


def _running_sleep(marker: str) -> bool:
    """A `sleep MARKER` is running (not merely bash, whose command line holds the script's text)."""
    return any(p.split(": ", 1)[1].startswith(f"sleep {marker}") for p in processes_with(marker, zombies=False))


def _wait_gone(marker: str) -> list[str]:
    """The processes still alive after the hang guard (the kernel ends a pid namespace asynchronously)."""
    deadline = time.monotonic() + HANG_GUARD
    while (left := processes_with(marker, zombies=False)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _kinds(user: str | None) -> list[tuple[str, str]]:
    """(script kind, --isolation) pairs this account can run."""
    backends = ["userns", "userns-fakeroot", "fakeroot"] if has_subids(user) else ["userns-fakeroot", "fakeroot"]
    return [("extraCommands", "auto")] + [("fakeRootCommands", b) for b in backends]


def _write_spec(user: str | None, work: Path, kind: str, script: str, name: str = "spec.json") -> Path:
    if shutil.which("fakeroot") is None or shutil.which("setsid") is None:
        pytest.skip("fakeroot and setsid (util-linux) are needed (`make deps`)")
    setup = "mkdir -p bin && ln -sf busybox bin/sh"
    spec = {
        "name": "lifetime-test",
        "tag": "latest",
        "compressor": "none",
        "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": setup + ("\n" + script if kind == "extraCommands" else ""),
    }
    if kind == "fakeRootCommands":
        spec["fakeRootCommands"] = script
    path = work / name
    path.write_text(json.dumps(spec))
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    if is_root():
        acc = account(user)
        for p in (path, tmp):
            os.chown(p, acc.uid, acc.gid)
    return path


def _without_userns(argv: list[str]) -> list[str]:
    """argv where no user namespace can be made (user.max_user_namespaces = 0 in the namespace it runs
    in), as on a host whose administrator disabled them: the subreaper fallback is what remains."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    inner = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "sh", "-c", inner, "sh", *argv]


def _leftovers(work: Path, out: Path) -> list[str]:
    """Temporary trees of the builds (TMPDIR) and files beside the output other than the output."""
    left = [f"tmp/{n}" for n in os.listdir(work / "tmp")]
    left += [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.")]
    return left


@pytest.mark.parametrize("fallback", [False, True], ids=["pidns", "no-userns"])
def test_no_script_process_outlives_a_build(
    unprivileged_user: str | None, user_tmp: UserTmpFactory, fallback: bool
) -> None:
    """setsid, setsid -f, a double fork, nohup and `&`, in every script kind: all gone when nsbuild
    exits, with a pid namespace and with only the subreaper fallback."""
    user = unprivileged_user
    work = user_tmp(user)
    kinds = [("extraCommands", "auto"), ("fakeRootCommands", "fakeroot")] if fallback else _kinds(user)
    doctor = [*nsbuild_cmd(), "doctor"]
    proc = run_as(_without_userns(doctor) if fallback else doctor, user)
    assert ("child subreapers only" if fallback else "(pid namespace; setsid") in proc.stdout, describe(proc)
    for kind, backend in kinds:
        marker = _marker()
        spec = _write_spec(user, work, kind, _escapes(marker) + "touch made-it")
        out = work / f"img-{kind}-{backend}.tar"
        argv = [*nsbuild_cmd(), "layered", str(spec), "-o", str(out), "--isolation", backend, "--no-cache"]
        proc = run_as(_without_userns(argv) if fallback else argv, user, env={"TMPDIR": str(work / "tmp")})
        assert proc.returncode == 0, describe(proc)
        assert processes_with(marker, zombies=False) == [], (kind, backend)
        assert _leftovers(work, out) == [], (kind, backend)


def _start_and_kill(user: str | None, argv: list[str], work: Path, started: str, group: bool) -> list[str]:
    """Start a build, wait until its script runs, kill -9 nsbuild: its pid only, or (group) its whole
    process group, as a terminal or a job runner might. `started`: a marker in the command line of the
    script's last process (a file would do, but the host is read-only to a sandboxed script)."""
    proc = subprocess.Popen(
        as_user_argv(argv, user),
        env=user_env(user, {"TMPDIR": str(work / "tmp")}),
        cwd=work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not _running_sleep(started):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the script never started"
            time.sleep(0.05)
        seen = processes_with(started.removesuffix("5"), zombies=False)
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return seen


@pytest.mark.parametrize("group", [False, True], ids=["pid", "group"])
@pytest.mark.parametrize("fallback", [False, True], ids=["pidns", "no-userns"])
def test_kill_9_of_nsbuild_ends_every_script_process(
    unprivileged_user: str | None, user_tmp: UserTmpFactory, fallback: bool, group: bool
) -> None:
    """kill -9 of nsbuild while the script runs (its children escaped with setsid -f and double forks):
    every one of them ends; the next build sweeps the dead build's tree and temporary output file."""
    user = unprivileged_user
    work = user_tmp(user)
    kinds = [("extraCommands", "auto"), ("fakeRootCommands", "fakeroot")] if fallback else _kinds(user)
    for kind, backend in kinds:
        marker = _marker()
        started = f"{marker}5"  # still contains the marker: it must end too
        script = (
            "mkdir -p owned/deep && chown -R 4000:4000 owned && chmod 500 owned\n" if kind == "fakeRootCommands" else ""
        )
        if backend in ("fakeroot", "userns-fakeroot") and kind == "fakeRootCommands":
            # The key of faked's SysV objects, shown in a process's argv[0] (the host is read-only here).
            script += f'(exec -a "fakerootkey=$FAKEROOTKEY" sleep {marker}) &\n'
        script += _escapes(marker) + f"sleep {started}\n"
        spec = _write_spec(user, work, kind, script)
        out = work / f"img-{kind}-{backend}.tar"
        argv = [*nsbuild_cmd(), "layered", str(spec), "-o", str(out), "--isolation", backend, "--no-cache"]
        seen = _start_and_kill(user, _without_userns(argv) if fallback else argv, work, started, group)
        shown = [c.split("fakerootkey=", 1)[1].split()[0] for c in seen if "fakerootkey=" in c]
        keys = [k for k in shown if k.isdigit()]  # not the script's own text in bash's command line
        assert _wait_gone(marker) == [], (kind, backend)
        if backend in ("fakeroot", "userns-fakeroot") and kind == "fakeRootCommands" and not fallback:
            assert keys, seen
            # faked was killed before it could remove its SysV queue and semaphore: they end with the
            # build's IPC namespace, never in the host's (where nothing would ever remove them).
            assert _sysv_keys_in_use(int(keys[0])) == [], backend
        assert not out.exists()
        # The dead build's workspace (and the archive it was writing) stay until the next build.
        assert _leftovers(work, out), "the killed build should have left its workspace"
        quick = _write_spec(user, work, kind, "true", name="quick.json")
        argv = [*nsbuild_cmd(), "layered", str(quick), "-o", str(out), "--isolation", backend, "--no-cache"]
        proc = run_as(_without_userns(argv) if fallback else argv, user, env={"TMPDIR": str(work / "tmp")})
        assert proc.returncode == 0, describe(proc)
        assert _leftovers(work, out) == [], (kind, backend)


def _sysv_keys_in_use(key: int) -> list[str]:
    """The host's SysV message queues and semaphore sets with this key (fakeroot's session key)."""
    found = []
    for kind in ("msg", "sem"):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields and int(fields[0]) in (key, key + 1, key + 2):
                found.append(f"{kind}: {line}")
    return found


def _big_rootfs(work: Path, user: str | None) -> Path:
    """~100 MB of deterministic content in many files: a build long enough to be killed anywhere."""
    root = work / "rootfs"
    rng = random.Random(11)
    for d in range(8):
        sub = root / "data" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(40):
            (sub / f"f{f}").write_bytes(rng.randbytes(8 << 10) * 40)
    if is_root():
        acc = account(user)
        for dirpath, dirnames, filenames in os.walk(root):
            for n in [dirpath, *[os.path.join(dirpath, x) for x in dirnames + filenames]]:
                os.lchown(n, acc.uid, acc.gid)
    return root


def test_kill_9_loop_then_the_same_bytes(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """kill -9 of nsbuild at random moments of a build whose fakeRootCommands make files owned by
    subordinate ids: the next build succeeds with the clean build's bytes, and nothing is left that the
    user cannot delete (dead builds' trees are swept, through the namespace), nor beside the output."""
    user = user_with_subids
    work = user_tmp(user)
    _big_rootfs(work, user)
    script = (
        "cp -a data copy && chown -R 4000:4001 copy && chmod -R go-rwx copy && chmod 500 copy\n"
        "mkdir -p srv && chown 5000:5000 srv && rm -rf data/d0\n"
    )
    spec = {"name": "killed", "tag": "latest", "compressor": "none", "contents": ["rootfs"], "fakeRootCommands": script}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    (work / "tmp").mkdir()
    if is_root():
        acc = account(user)
        for p in (spec_path, work / "tmp"):
            os.chown(p, acc.uid, acc.gid)
    clean = work / "clean.tar"
    args = ["layered", spec_path, "--isolation", "userns", "--no-cache"]
    t0 = time.monotonic()
    proc = run_nsbuild([*args, "-o", clean], user, env={"TMPDIR": str(work / "tmp")})
    took = time.monotonic() - t0
    assert proc.returncode == 0, describe(proc)
    out = work / "out" / "img.tar"
    out.parent.mkdir()
    if is_root():
        os.chown(out.parent, account(user).uid, account(user).gid)
    rng = random.Random()
    kills = 0
    for _ in range(12):
        p = popen_nsbuild([*args, "-o", out], user, env={"TMPDIR": str(work / "tmp")}, cwd=work)
        time.sleep(rng.uniform(0, took))  # a random moment, not a bound on anything
        if p.poll() is None:
            p.kill()  # the setpriv'd process is nsbuild itself: this is kill -9 of nsbuild
            kills += 1
        p.communicate(timeout=HANG_GUARD)
        if out.exists():
            out.unlink()  # that build finished before its kill: the next one starts afresh
    assert kills >= 1
    proc = run_nsbuild([*args, "-o", out], user, env={"TMPDIR": str(work / "tmp")})
    assert proc.returncode == 0, describe(proc)
    assert out.read_bytes() == clean.read_bytes()
    assert _leftovers(work, out) == []
    # Everything left in the user's directories is theirs to delete, without a namespace.
    proc = run_as(["rm", "-rf", str(work / "out"), str(work / "tmp")], user)
    assert proc.returncode == 0, describe(proc)


def _busybox_base(user: str | None, work: Path) -> Path:
    setup = "mkdir -p bin tmp && for a in sh sleep setsid touch; do ln -s busybox bin/$a; done"
    spec = _write_spec(user, work, "extraCommands", "", name="base.json")
    data = json.loads(spec.read_text())
    data["extraCommands"] = setup
    spec.write_text(json.dumps(data))
    out = work / "base.tar"
    proc = run_nsbuild(["layered", spec, "-o", out, "--no-cache"], user, env={"TMPDIR": str(work / "tmp")})
    assert proc.returncode == 0, describe(proc)
    return out


def _image_spec(user: str | None, work: Path, base: Path, marker: str, wait: bool) -> Path:
    """buildImage: runAsRoot (chrooted into the image, busybox) and extraCommands (host tools)."""
    escapes = f"setsid sleep {marker} &\n(setsid sleep {marker} &)\n(sleep {marker} &)\nsleep {marker} &\n"
    spec = {
        "name": "image-lifetime",
        "tag": "latest",
        "compressor": "none",
        "fromImage": str(base),
        "runAsRoot": "#!/bin/sh\n" + escapes + ("sleep " + marker + "\n" if wait else "touch /ran"),
        "extraCommands": _escapes(marker),
    }
    path = work / "image.json"
    path.write_text(json.dumps(spec))
    if is_root():
        acc = account(user)
        os.chown(path, acc.uid, acc.gid)
    return path


def test_build_image_scripts_end_with_the_build(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """runAsRoot (in the image's chroot) and buildImage's extraCommands: nothing they start survives a
    build, nor a kill -9 of nsbuild while runAsRoot runs."""
    user = unprivileged_user
    work = user_tmp(user)
    base = _busybox_base(user, work)
    backends = ["userns", "userns-fakeroot"] if has_subids(user) else ["userns-fakeroot"]
    for backend in backends:
        marker = _marker()
        spec = _image_spec(user, work, base, marker, wait=False)
        out = work / f"img-{backend}.tar"
        args = ["image", spec, "-o", out, "--isolation", backend, "--no-cache"]
        proc = run_nsbuild(args, user, env={"TMPDIR": str(work / "tmp")})
        assert proc.returncode == 0, describe(proc)
        assert processes_with(marker, zombies=False) == [], backend
        assert _leftovers(work, out) == [], backend
        marker = _marker()
        spec = _image_spec(user, work, base, marker, wait=True)
        p = popen_nsbuild(args, user, env={"TMPDIR": str(work / "tmp")}, cwd=work)
        try:
            deadline = time.monotonic() + HANG_GUARD
            while len(processes_with(marker, zombies=False)) < 5:  # four escaped sleeps and the one runAsRoot waits on
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, "runAsRoot never started its processes"
                time.sleep(0.05)
            p.kill()  # kill -9 of nsbuild (setpriv exec'd it)
            p.communicate(timeout=HANG_GUARD)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert _wait_gone(marker) == [], backend


def test_a_live_build_is_never_swept(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    """Builds sweep dead builds' trees, never a running one's: a build started while another waits in
    its script (same TMPDIR, same output) leaves the other's workspace and temporary output alone."""
    user = unprivileged_user
    work = user_tmp(user)
    started, go = _marker(), work / "go"  # the host is read-only to the script: it signals by a process
    script = f"mkdir -p owned && chown 4000:4000 owned\nsleep {started} &\nwhile [ ! -e {go} ]; do sleep 0.1; done\n"
    slow = _write_spec(user, work, "fakeRootCommands", script, name="slow.json")
    quick = _write_spec(user, work, "fakeRootCommands", "true", name="quick.json")
    out = work / "img.tar"
    env = {"TMPDIR": str(work / "tmp")}
    a = popen_nsbuild(["layered", slow, "-o", out, "--no-cache"], user, env=env, cwd=work)
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not _running_sleep(started):
            assert a.poll() is None, a.communicate()
            assert time.monotonic() < deadline, "the script never started"
            time.sleep(0.05)
        during = _leftovers(work, out)
        assert during, "the running build has a workspace and a temporary output"
        proc = run_nsbuild(["layered", quick, "-o", work / "other.tar", "--no-cache"], user, env=env)
        assert proc.returncode == 0, describe(proc)
        proc = run_nsbuild(["layered", quick, "-o", out, "--no-cache"], user, env=env)
        assert proc.returncode == 0, describe(proc)
        assert set(during) <= set(_leftovers(work, out)), "a live build's files were swept"
        go.touch()
        _, err = a.communicate(timeout=HANG_GUARD)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, err
    assert _leftovers(work, out) == []
