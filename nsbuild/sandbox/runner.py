"""Parent side of a sandbox: start stage1, write its id map with newuidmap/newgidmap, wait for it.

The parent stays outside every namespace. Interrupts (Ctrl-C, SIGTERM turned into KeyboardInterrupt by
the caller) tear the sandbox down before they propagate: stage1 kills the namespace's init, which takes
every process of the build with it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, get_args

import prctl

from nsbuild.errors import BuildError
from nsbuild.sandbox import mounts
from nsbuild.sandbox.ids import IdMap, full_map
from nsbuild.sandbox.job import Mode, Stage1Config

__all__ = ["MODES", "Command", "Mode", "SandboxSetupError", "run", "try_enter"]

MODES: tuple[Mode, ...] = get_args(Mode)


class SandboxSetupError(BuildError):
    """The sandbox itself could not be set up (not the command failing inside it)."""


def _map_args(lines: list[tuple[int, int, int]]) -> list[str]:
    return [str(x) for line in lines for x in line]


def _write_map(pid: int, idmap: IdMap) -> None:
    if os.getuid() == 0:
        # Root writes the maps itself (newuidmap refuses root without a subuid entry).
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write("".join(f"{a} {b} {c}\n" for a, b, c in idmap.uids))
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write("".join(f"{a} {b} {c}\n" for a, b, c in idmap.gids))
        return
    for tool, lines in (("newuidmap", idmap.uids), ("newgidmap", idmap.gids)):
        try:
            res = subprocess.run(
                [tool, str(pid), *_map_args(lines)], capture_output=True, text=True, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError as exc:
            raise SandboxSetupError(f"{tool} not found (install the uidmap package)") from exc
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise SandboxSetupError(f"{tool} failed: {msg[-1] if msg else f'exit {res.returncode}'}")


@dataclass(frozen=True)
class Command:
    """A command to run as the init's child inside a sandbox, and how.

    mode: "userns" (full map), "single" (one id), "self" (the caller's own ids, pid namespace; no
    namespaces where none can be made), "none" (no namespaces; subreapers only).
    network: "none" (an own network namespace with lo up) or "host".
    """

    mode: Mode
    argv: Sequence[str]
    network: str = "none"
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    stdout: int | None = None
    stderr: int | None = None
    umask: int | None = None


def run(cmd: Command) -> subprocess.CompletedProcess:
    """Run cmd.argv as the init's child inside a sandbox; returns its status (and output if captured)."""
    if cmd.mode not in MODES:
        raise ValueError(cmd.mode)
    idmap = full_map() if cmd.mode == "userns" else None
    if cmd.mode == "userns" and idmap is None:
        raise SandboxSetupError("no subordinate id range for this user in /etc/subuid and /etc/subgid")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    cfg_r, cfg_w = os.pipe()
    cfg = Stage1Config(
        mode=cmd.mode,
        network=cmd.network,
        ready_fd=ready_w,
        go_fd=go_r,
        argv=tuple(cmd.argv),
        env=dict(cmd.env) if cmd.env is not None else None,
        cwd=cmd.cwd,
        parent=os.getpid(),
        umask=cmd.umask,
    )
    proc = _start_stage1(cmd, cfg_r, (ready_w, go_r, cfg_r))
    try:
        _send_config(cfg_w, cfg)
        try:
            if cmd.mode == "userns" and os.read(ready_r, 1) == b"u":
                assert idmap is not None
                _write_map(proc.pid, idmap)
                os.write(go_w, b"g")
        finally:
            os.close(ready_r)
            os.close(go_w)
        out, err = proc.communicate()
    except BaseException:
        _stop(proc)
        raise
    return subprocess.CompletedProcess(list(cmd.argv), proc.returncode, out, err)


def _start_stage1(cmd: Command, cfg_fd: int, child_fds: tuple[int, ...]) -> subprocess.Popen:
    """stage1, holding child_fds (closed here, whatever happens)."""
    try:
        # The configuration (the command's environment among it) goes over a pipe: a command line
        # is world-readable in /proc/PID/cmdline.
        return subprocess.Popen(
            [sys.executable, "-m", "nsbuild.sandbox.stage1", "--config-fd", str(cfg_fd)],
            pass_fds=child_fds,
            stdin=subprocess.DEVNULL,
            stdout=cmd.stdout,
            stderr=cmd.stderr,
            env=dict(cmd.env) if cmd.env is not None else None,
            # Its own process group: a kill of nsbuild's group leaves stage1 alive
            # long enough to take the sandbox down (its death signal).
            process_group=0,
        )
    finally:
        for fd in child_fds:
            os.close(fd)


def _send_config(fd: int, cfg: Stage1Config) -> None:
    """Write stage1's configuration and close the pipe (stage1 reads it to EOF before anything else)."""
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(cfg.to_wire()).encode())
    except BrokenPipeError:
        pass  # stage1 died at once (its status says why)


def _stop(proc: subprocess.Popen) -> None:
    """Take the sandbox down: stage1 kills its init (and with it the pid namespace), then exits."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class _ProbePipes:
    """The probe child's handshake: ready (child → parent: map me), go (parent → child: mapped),
    err (child → parent: why it failed). Each a (read end, write end) pair."""

    ready: tuple[int, int]
    go: tuple[int, int]
    err: tuple[int, int]


def try_enter(mode: Mode) -> str | None:
    """Can this process create the sandbox's namespaces? None if so, else why not (one line).

    A cheap probe: fork, unshare in the child, write its id map (newuidmap/newgidmap from here for
    mode "userns"), become namespace root, exit. No interpreter is started.
    """
    flags = mounts.CLONE_NEWUSER | mounts.CLONE_NEWNS | mounts.CLONE_NEWPID | mounts.CLONE_NEWNET
    idmap = full_map() if mode == "userns" else None
    if mode == "userns" and idmap is None:
        return "no subordinate id range for this user in /etc/subuid and /etc/subgid"
    ids = (os.getuid(), os.getgid())
    pipes = _ProbePipes(os.pipe(), os.pipe(), os.pipe())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only makes syscalls and exits
        _probe_child(mode, flags, ids, pipes)
    os.close(pipes.ready[1])
    os.close(pipes.go[0])
    os.close(pipes.err[1])
    why = None
    try:
        if mode == "userns" and os.read(pipes.ready[0], 1) == b"u":
            assert idmap is not None
            try:
                _write_map(pid, idmap)
                os.write(pipes.go[1], b"g")
            except (OSError, SandboxSetupError) as exc:
                why = str(exc)
    finally:
        os.close(pipes.ready[0])
        os.close(pipes.go[1])
        _, status = os.waitpid(pid, 0)
        msg = os.read(pipes.err[0], 1000).decode(errors="replace")
        os.close(pipes.err[0])
    if why:
        return why
    if status != 0:
        return f"unshare: {msg}" if msg else "could not enter the namespaces"
    return None


def _probe_child(mode: Mode, flags: int, ids: tuple[int, int], pipes: _ProbePipes) -> NoReturn:  # pragma: no cover
    """The probe's child: unshare, get mapped (by itself, or by the parent for mode "userns"), become
    namespace root; exit 0 if all went well, else 1 with why on the err pipe."""
    code = 1
    try:
        # newuidmap checks who owns /proc/PID: a non-dumpable process's is root's (hide_own_process).
        prctl.set_dumpable(True)
        os.close(pipes.ready[0])
        os.close(pipes.go[1])
        os.close(pipes.err[0])
        try:
            mounts.unshare(flags)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(
                    exc.errno,
                    "the limit of user namespaces is reached (user.max_user_namespaces here or in a parent namespace)",
                ) from None
            raise
        if mode == "single":
            uid, gid = ids
            for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1\n"), ("gid_map", f"0 {gid} 1\n")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        else:
            os.write(pipes.ready[1], b"u")
            if os.read(pipes.go[0], 1) != b"g":
                os._exit(2)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        code = 0
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(pipes.err[1], f"{exc.strerror or exc}".encode()[:500])
    finally:
        os._exit(code)
