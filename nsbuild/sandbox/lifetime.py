"""Keeping every process a script starts inside the build's lifetime (issue 11).

Two mechanisms, the first that works here:

- A pid namespace. Its init is the sandbox's stage1 child; PR_SET_PDEATHSIG ties it to stage1, and
  stage1's to nsbuild, so however nsbuild ends (even `kill -9`) the init dies, and with it, by the
  kernel's hand, every process in the namespace: `setsid`, `setsid -f` and double forks included.
  Mode "self" is the namespace for scripts that run as the caller (extraCommands, the fakeroot
  backend): a user namespace mapping only the caller's own uid and gid onto themselves (no helper,
  no subordinate ids, the caller's identity unchanged), plus pid and mount namespaces.
- Where no user namespace can be made: child subreapers and a kill of every descendant. stage1 and the
  init are both subreapers whose death signal is a catchable SIGTERM: whichever of them learns first
  that its parent died kills every process below it before it exits. Only a process that leaves the
  tree (started by another daemon on the script's behalf: systemd-run, at, ssh localhost) or a SIGKILL
  that reaches stage1 and the init at the same time escapes this.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable

from nsbuild.sandbox import mounts

# An IPC namespace too: fakeroot's daemon keeps its state in SysV message queues and semaphores,
# which outlive a daemon that is killed; they end with the namespace.
SELF_FLAGS = mounts.CLONE_NEWUSER | mounts.CLONE_NEWNS | mounts.CLONE_NEWPID | mounts.CLONE_NEWIPC


def _write(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def enter_self_namespace() -> bool:
    """unshare a user namespace mapping only the caller's ids to themselves (+ mount, pid); the next
    fork is the pid namespace's init. False (and nothing changed) where user namespaces are refused."""
    uid, gid = os.getuid(), os.getgid()
    try:
        mounts.unshare(SELF_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSPC, errno.EINVAL, errno.ENOSYS, errno.EUSERS):
            return False
        raise
    # An unprivileged process may map its own ids (setgroups must be denied first for the gid map).
    # Supplementary groups keep granting access; inside they show as the overflow group.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    return True


def on_parent_death(cleanup: Callable[[], None]) -> None:
    """SIGTERM when the parent dies (PR_SET_PDEATHSIG), handled by `cleanup` then exit 128+15.

    Installed before anything is started, so there is no moment at which the parent's death would
    leave children unaccounted for."""
    import prctl

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            cleanup()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    prctl.set_pdeathsig(signal.SIGTERM)


def pid_namespace_available() -> bool:
    """Whether scripts that run as the caller get the pid namespace here (a forked child tries)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only makes syscalls and exits
        code = 1
        try:
            code = 0 if enter_self_namespace() else 1
        except BaseException:  # noqa: BLE001 - any failure means "no"
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
