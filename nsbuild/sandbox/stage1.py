"""First process of a sandbox: enters the namespaces and runs the command as their init.

`python -m nsbuild.sandbox.stage1 --config-fd FD`, started by nsbuild.sandbox.runner, which writes
a nsbuild.sandbox.job.Stage1Config as JSON to that pipe (a command line is readable by everyone in
/proc). Mode "self" serves extraCommands and the fakeroot backend.

Process tree: stage1 (unshared user/mount/net namespaces; child subreaper) forks the init, which is
pid 1 of a new pid namespace: when it exits the kernel kills everything left in there. In mode
"none" there is no pid namespace: the init is a child subreaper and kills its descendants itself,
also when stage1 dies (nsbuild.sandbox.lifetime).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import prctl

from nsbuild.sandbox import mounts
from nsbuild.sandbox.job import Stage1Config
from nsbuild.sandbox.lifetime import enter_self_namespace, on_parent_death
from nsbuild.sandbox.proc import kill_descendants, status_code

EXIT_SETUP = 125  # the sandbox itself could not be set up (distinct from the command's status)


def _die(msg: str) -> None:
    sys.stderr.write(f"nsbuild: sandbox: {msg}\n")
    sys.stderr.flush()
    os._exit(EXIT_SETUP)


def _write(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def _enter(cfg: Stage1Config) -> None:
    mode = cfg.mode
    # IPC: fakeroot's SysV queues and semaphores end with the namespace, even when faked is killed.
    flags = mounts.CLONE_NEWUSER | mounts.CLONE_NEWNS | mounts.CLONE_NEWPID | mounts.CLONE_NEWIPC
    if cfg.network == "none":
        flags |= mounts.CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    try:
        mounts.unshare(flags)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            _die(
                "unshare: the limit of user namespaces is reached (user.max_user_namespaces here or in "
                "a parent namespace is 0 or used up)"
            )
        if exc.errno == errno.EPERM:
            _die("unshare: not permitted (seccomp, AppArmor or a container runtime blocks user namespaces)")
        _die(f"unshare: {exc.strerror}")
    if mode == "single":
        try:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"0 {uid} 1\n")
            _write("/proc/self/gid_map", f"0 {gid} 1\n")
        except OSError as exc:
            _die(f"writing the id map: {exc.strerror}")
    else:
        os.write(cfg.ready_fd, b"u")
        os.close(cfg.ready_fd)
        if os.read(cfg.go_fd, 1) != b"g":
            _die("the id map was not set up")  # the parent printed why
        os.close(cfg.go_fd)
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        if mode == "userns":
            os.setgroups([])
    except OSError as exc:
        _die(f"becoming namespace root: {exc.strerror}")


def _lo_up() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname="lo")
        if idx:
            ipr.link("set", index=idx[0], state="up")


def _tie_to_stage1(cfg: Stage1Config, alive_fd: int) -> None:
    """The init dies with stage1: in a pid namespace its death (SIGKILL) takes the namespace along;
    without one it kills its descendants first. stage1 dying before the death signal was set shows
    as a hang-up on the pipe whose other end only stage1 holds."""
    import select

    if cfg.mode == "none":
        on_parent_death(kill_descendants)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        prctl.set_pdeathsig(signal.SIGKILL)
    poller = select.poll()
    poller.register(alive_fd, select.POLLIN)
    if poller.poll(0):
        os._exit(EXIT_SETUP)
    os.close(alive_fd)


def _init(cfg: Stage1Config, alive_fd: int) -> None:
    """pid 1 of the sandbox (or a subreaper child in mode "none"); never returns."""
    _tie_to_stage1(cfg, alive_fd)
    prctl.set_child_subreaper(True)
    if cfg.umask is not None:
        os.umask(cfg.umask)
    # Own session: a terminal's Ctrl-C reaches nsbuild, which tears the sandbox down in order.
    with contextlib.suppress(OSError):
        os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if cfg.mode != "none":
        try:
            # Our mounts must never propagate back to the host's mount namespace.
            mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
        except OSError as exc:
            _die(str(exc))
        # A /proc for the new pid namespace: `ps` and /proc/PID show the sandbox only.
        with contextlib.suppress(OSError):
            mounts.mount("proc", "/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
    want_lo = cfg.mode in ("userns", "single") and cfg.network == "none"
    # Only now: newuidmap (setuid) has run; nothing inside may gain privileges through exec.
    prctl.set_no_new_privs(True)
    env = dict(cfg.env) if cfg.env is not None else dict(os.environ)
    fds: tuple[int, ...] = ()
    if want_lo:
        # pyroute2 takes ~0.1 s to import: bring lo up while the command starts. A command that must
        # not run before the network is ready (the customisation step) waits on this pipe.
        ready_r, ready_w = os.pipe()
        env["NSBUILD_NET_READY_FD"] = str(ready_r)
        fds = (ready_r,)
    try:
        child = subprocess.Popen(cfg.argv, env=env, cwd=cfg.cwd, pass_fds=fds)
    except OSError as exc:
        _die(f"{cfg.argv[0]}: {exc.strerror}")
    if want_lo:
        os.close(ready_r)
        try:
            _lo_up()
            ok = b"1"
        except Exception as exc:  # noqa: BLE001 - pyroute2 raises its own netlink errors
            sys.stderr.write(f"nsbuild: sandbox: bringing up lo: {exc}\n")
            ok = b"e"
        with contextlib.suppress(OSError):
            os.write(ready_w, ok)
        os.close(ready_w)
        if ok != b"1":
            kill_descendants()
            os._exit(EXIT_SETUP)
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == child.pid:
            code = status_code(status)
            break
    kill_descendants()
    os._exit(code)


_init_pid = 0


def _take_down() -> None:
    # The init is pid 1 of its namespace: SIGKILL takes the whole namespace down with it. Without a
    # pid namespace its orphans come to us (a subreaper): kill them all.
    if _init_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(_init_pid, signal.SIGKILL)
    kill_descendants()


def _read_config(argv: list[str]) -> Stage1Config:
    """`--config-fd N`: the configuration as JSON on that pipe (never on the command line)."""
    if len(argv) != 3 or argv[1] != "--config-fd":
        _die("usage: python -m nsbuild.sandbox.stage1 --config-fd FD")
    fd = int(argv[2])
    with os.fdopen(fd, "rb") as f:
        return Stage1Config.from_wire(json.loads(f.read()))


def main() -> None:
    global _init_pid
    cfg = _read_config(sys.argv)
    # nsbuild's death (even kill -9) or its SIGTERM: take the sandbox down, then exit.
    on_parent_death(_take_down)
    if os.getppid() != cfg.parent:
        os._exit(EXIT_SETUP)  # nsbuild died before we set the death signal
    prctl.set_child_subreaper(True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cfg.mode == "self":
        try:
            if not enter_self_namespace():
                cfg = replace(cfg, mode="none")  # no user namespace here: subreapers only (lifetime.py)
        except OSError as exc:
            _die(f"mapping the caller's own ids in a user namespace: {exc.strerror or exc}")
    elif cfg.mode != "none":
        _enter(cfg)
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(alive_w)
            _init(cfg, alive_r)
        finally:
            os._exit(EXIT_SETUP)
    os.close(alive_r)
    _init_pid = pid
    while True:
        try:
            got, status = os.waitpid(pid, 0)
        except ChildProcessError:
            os._exit(EXIT_SETUP)
        if got == pid:
            break
    kill_descendants()
    os._exit(status_code(status))


if __name__ == "__main__":
    main()
