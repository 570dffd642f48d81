"""The boundary between a script and the host: what fakeRootCommands / runAsRoot scripts can reach.

Every script of a namespace backend runs in a pid and mount namespace of its own, below the sandbox's:

  chroot (enableFakechroot, runAsRoot)
      pivot_root into the image's tree (not chroot): the host's root is detached, so no path and no
      /proc/PID/root leads out of the image. The script is pid 1 of a fresh pid namespace with its own
      /proc: it sees its own processes only, none of nsbuild's. Documented mounts, nothing else:
      /dev (tmpfs: null zero full random urandom tty bound from the host, the mknod shim, fakeroot's
      library read-only), /proc (fresh), /sys (a fresh read-only sysfs; with --network host the host's
      /sys read-only), /tmp (runAsRoot: a tmpfs).
  no chroot (fakeRootCommands)
      the host's file system as the caller sees it, every mount read-only except the image tree and
      the script's $HOME and $TMPDIR (in the build's own scratch tree); /tmp and /dev/shm are empty
      tmpfs of its own (1 GiB each); the caller's home is an empty directory (but for the spec's
      directory and the build's own trees where they lie below it); a fresh /proc of its own pid
      namespace. The read-only flags and
      the mounts are locked by a further user namespace (same ids), so the script cannot remount or
      unmount them: what namespace root could do beyond the caller's own account (chown to
      subordinate ids, files owned by them) reaches the image only.

The fakeroot backend has no namespaces: its scripts run as the caller, with the caller's view.
The sandbox's own processes get sandbox_env(), never the caller's environment, and their
configuration goes over a pipe, never on a command line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import prctl

from nsbuild.sandbox import mounts
from nsbuild.sandbox.proc import status_code

EXIT_SETUP = 125
# The sandbox's processes (stage1, its init, the inner step, fakeroot's daemon) see only these of the
# caller's variables: /proc/PID/environ of a sandbox process must hold no secret (REGISTRY_PASSWORD...).
KEPT_VARS = ("PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")

_SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "aarch64": 41,
    "riscv64": 41,
    "ppc64le": 203,
    "s390x": 217,
    "armv7l": 218,
    "i686": 217,
}
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the tables merged)
MOUNT_ATTR_RDONLY = 0x1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def sandbox_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the sandbox's own processes: no variable of the caller's but KEPT_VARS."""
    env = {k: os.environ[k] for k in KEPT_VARS if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin")
    env.update({"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"})
    env.update(extra or {})
    return env


def hide_own_process() -> None:
    """Make nsbuild's own process non-dumpable: its /proc/PID/environ (the caller's environment, with
    e.g. REGISTRY_PASSWORD), mem and fds are then closed to processes of the same account, so also to
    scripts that run as the caller (extraCommands, the fakeroot backend). A child gets this back to
    normal when it execs; one that only forks (runner.try_enter) resets it itself."""
    with contextlib.suppress(OSError, AttributeError):
        prctl.set_dumpable(False)


def _syscall_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(0, f"pivot_root: unknown system call number on {platform.machine()}")
    if _libc.syscall(ctypes.c_long(number), os.fsencode(new_root), os.fsencode(put_old)) != 0:
        raise _syscall_error("pivot_root")


def set_readonly(path: str | os.PathLike[str], readonly: bool, recursive: bool) -> None:
    """mount_setattr(2): only the read-only flag changes (locked nosuid/nodev flags stay as they are)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    if (
        _libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(AT_FDCWD),
            os.fsencode(path),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        != 0
    ):
        raise _syscall_error(f"making {os.fsdecode(path)} {'read-only' if readonly else 'writable'}")


def _fail(msg: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, f"nsbuild: sandbox: {msg}\n".encode("utf-8", "replace"))
    os._exit(EXIT_SETUP)


def _close_other_fds(keep: Sequence[int]) -> None:
    """The supervisor must hold no pipe its parent waits on (subprocess's exec-error pipe above all)."""
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _identity_map(kind: str) -> str:
    """The nested namespace maps every id of ours onto itself: ids on disk stay exactly as they were."""
    lines = Path(f"/proc/self/{kind}_map").read_text().split("\n")
    out = []
    for line in lines:
        f = line.split()
        if len(f) == 3:
            out.append(f"{f[0]} {f[0]} {f[2]}\n")
    return "".join(out)


def _supervise(child: int, lock: tuple[int, int] | None) -> None:
    """The script's parent, outside its pid namespace: writes the id map of the nested user namespace
    (lock: ready pipe, go pipe) and exits with the script's status. Never returns."""
    _close_other_fds(lock or ())
    try:
        if lock is not None:
            ready, go = lock
            maps = {kind: _identity_map(kind) for kind in ("uid", "gid")}
            if os.read(ready, 1) == b"u":
                for kind, text in maps.items():
                    Path(f"/proc/{child}/{kind}_map").write_text(text)
                os.write(go, b"g")
            os.close(go)
        _, status = os.waitpid(child, 0)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)
        _fail(f"starting the script: {exc}")
    os._exit(status_code(status))


def _into_image(root: Path) -> None:
    """pivot_root into root, with a /proc of our own pid namespace; the host's tree is detached."""
    mounts.mount(str(root), root, None, mounts.MS_BIND | mounts.MS_REC)
    proc = root / "proc"
    with contextlib.suppress(OSError):
        mounts.umount(proc)  # the sandbox's /proc (its processes are nsbuild's)
    mounts.mount("proc", proc, "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
    os.chdir(root)
    pivot_root(".", ".")
    mounts.umount(".")  # the old root, stacked on top by pivot_root(".", ".")
    os.chdir("/")


PRIVATE_TMP = ("/tmp", "/dev/shm")
PRIVATE_TMP_MIB = 1024


def _private_dirs() -> list[Path]:
    return [Path(d) for d in PRIVATE_TMP if os.path.isdir(d) and not os.path.islink(d)]


def _cover(dirs: Sequence[Path], keep: Sequence[Path], data: str) -> None:
    """An empty tmpfs (mount data `data`) over each of `dirs`; the paths of `keep` below one are bound
    back in at the same place (the build's own trees, the spec's directory, PATH entries)."""
    homes = [(Path(os.path.abspath(h)), Path(os.path.realpath(h))) for h in dirs]
    fds = {}
    for p in keep:
        target = _target_below(Path(p), homes)
        if target is not None and os.path.isdir(p) and target not in fds:
            fds[target] = os.open(p, os.O_PATH | os.O_DIRECTORY)
    for _, real in homes:
        mounts.mount("tmpfs", real, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, data)
    for target, fd in fds.items():
        target.mkdir(parents=True, exist_ok=True)
        mounts.mount(f"/proc/self/fd/{fd}", target, None, mounts.MS_BIND | mounts.MS_REC)
        os.close(fd)


def _target_below(p: Path, homes: Sequence[tuple[Path, Path]]) -> Path | None:
    """Where `p` must be bound back once the homes are covered: its real path if that is below a home,
    else its own name's place (a `~/.nix-profile/bin` in PATH leads out of the home, but its name must
    still resolve), else None (not below a home: nothing to do)."""
    real, named = Path(os.path.realpath(p)), Path(os.path.abspath(p))
    for text, home in homes:
        if real == home or home in real.parents:
            return real
        for base in (text, home):
            if named == base or base in named.parents:
                return home / named.relative_to(base)
    return None


def _host_readonly(
    writable: Sequence[Path], ready: int, go: int, hidden: Sequence[Path] = (), readable: Sequence[Path] = ()
) -> None:
    """The host read-only except `writable`, `hidden` out of sight (but `readable` and `writable` below
    them), a /proc of our own; then a nested user namespace (the same ids) locks all of it: the
    script, its root, can neither remount nor unmount them."""
    with contextlib.suppress(OSError):
        mounts.umount("/proc")
    mounts.mount("proc", "/proc", "proc", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC)
    keep = [*writable, *readable]
    if hidden:
        # The caller's home: its keys, tokens, registry credentials out of sight.
        _cover(hidden, keep, "size=1m,mode=0755")
    # /tmp and /dev/shm of its own: what it writes there is gone when it ends, the host's stay
    # untouched, and tools that expect them writable still work.
    scratch = _private_dirs()
    _cover(scratch, keep, f"size={PRIVATE_TMP_MIB}m,mode=1777")
    for w in writable:
        mounts.mount(str(w), w, None, mounts.MS_BIND | mounts.MS_REC)
    set_readonly("/", True, recursive=True)
    for d in scratch:
        set_readonly(d, False, recursive=False)
    for w in writable:
        set_readonly(w, False, recursive=True)
    mounts.unshare(mounts.CLONE_NEWUSER | mounts.CLONE_NEWNS)
    os.write(ready, b"u")
    if os.read(go, 1) != b"g":
        raise OSError(0, "the nested id map was not written")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    with contextlib.suppress(OSError):
        os.setgroups([])  # denied where the sandbox maps one id (setgroups is "deny" there)


def launcher(
    root: Path | None,
    writable: Sequence[Path],
    cwd: Path,
    enter: Callable[[], None],
    hidden: Sequence[Path] = (),
    readable: Sequence[Path] = (),
) -> Callable[[], None]:
    """A preexec_fn that puts the script behind the boundary described above; `root` for a chroot,
    else `writable` are the only writable paths and `hidden` (the caller's home) is out of sight but
    for `readable` and `writable` below it. `enter` runs last (limits, signal dispositions).

    In the forked child: unshare a pid namespace, fork again; the first process stays outside as the
    script's supervisor (it returns the script's status; its mount namespace and /proc stay the
    sandbox's), the second becomes pid 1 of the new namespace, takes a mount namespace of its own
    and goes on to exec the script.
    """

    def preexec() -> None:
        try:
            mounts.unshare(mounts.CLONE_NEWPID)
            ready_r, ready_w = os.pipe()
            go_r, go_w = os.pipe()
            pid = os.fork()
        except OSError as exc:
            _fail(f"script namespaces: {exc}")
        if pid != 0:
            os.close(ready_w)
            os.close(go_r)
            _supervise(pid, (ready_r, go_w) if root is None else None)
        try:
            # The supervisor killed: the whole namespace goes. (Killed before this line, it was
            # killed by the inner step's sweep, which re-parents and kills us too.)
            prctl.set_pdeathsig(signal.SIGKILL)
            os.close(ready_r)
            os.close(go_w)
            mounts.unshare(mounts.CLONE_NEWNS)
            mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
            if root is not None:
                _into_image(root)
            else:
                _host_readonly(writable, ready_w, go_r, hidden, readable)
                os.chdir(cwd)
            os.close(ready_w)
            os.close(go_r)
            enter()
        except OSError as exc:
            _fail(f"script sandbox: {exc.strerror or exc}")

    return preexec
