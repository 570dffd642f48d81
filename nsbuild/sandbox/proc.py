"""Process hygiene: find and kill every descendant, so nothing a script starts outlives the build."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads), from /proc/PID/task/*/children."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: the process is exiting right now
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.extend(int(x) for x in text.split())
    return out


def descendants(pid: int) -> list[int]:
    seen: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children(p))
    return seen


def reap_nohang() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_descendants() -> None:
    """SIGKILL every descendant of this process (a child subreaper) until none is left.

    Orphans of killed processes are re-parented to us (we are a subreaper), so loop until the tree is
    empty. A process forking while we kill only adds children that the next round finds.

    Only processes this round killed are waited for: a grandchild re-parented to us between the scan
    and the wait was not killed yet, and a blocking wait for it would hang until the build's own
    parent gave up and killed us, orphaning the rest of the tree to pid 1.
    """
    me = os.getpid()
    for _ in range(1000):
        pids = descendants(me)
        if not pids:
            break
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        killed = set(pids)
        for p in children(me):
            if p in killed:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p, 0)
    reap_nohang()


def status_code(status: int) -> int:
    """A waitpid status as a shell would report it (128+N for a signal)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
