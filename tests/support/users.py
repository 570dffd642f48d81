"""Accounts the tests run nsbuild as, and how to run commands as them.

When the suite runs as root (CI, our machines), rootless behaviour is exercised by switching to two
unprivileged accounts that `make test-users` creates:

- "test"  -> nsbuild-test:  has a subordinate id range in /etc/subuid and /etc/subgid (newuidmap works)
- "nosub" -> nsbuild-nosub: has no line in /etc/subuid or /etc/subgid

When the suite runs as an ordinary user, it cannot switch accounts: every case runs as the current
user, and the variant that needs the other kind of account is skipped with the reason.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCOUNTS = {"test": "nsbuild-test", "nosub": "nsbuild-nosub"}
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Hang guard only (a wedged subprocess should fail the test, not the CI job); never a performance bound.
DEFAULT_TIMEOUT = 1800

# Where per-user temporary trees go: /tmp/pytest-of-root is 0700, unreachable for the test accounts.
USER_TMP_PARENT = Path(os.environ.get("NSBUILD_TEST_TMP", "/var/tmp"))

UserKey = str | None  # "test", "nosub", an account name, or None for the account running pytest


def die_with_parent() -> None:
    """preexec_fn for helper daemons (registry, dockerd): SIGTERM when pytest dies, however it dies,
    so an interrupted run leaves no daemon behind. (PR_SET_PDEATHSIG = 1; it follows the forking
    thread, and fixtures start daemons from pytest's main thread.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def is_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()


def account(user: UserKey = None) -> Account:
    """The account behind a user key; fails the test clearly when a test account does not exist."""
    if user is None:
        pw = pwd.getpwuid(os.geteuid())
    else:
        name = ACCOUNTS.get(user, user)
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            if not is_root():
                pytest.skip(f"account {name!r} does not exist and switching accounts needs root")
            pytest.fail(f"account {name!r} does not exist: run `make test-users` as root (or `make test`)")
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


def subid_count(name: str, uid: int, path: str) -> int:
    """How many subordinate ids /etc/subuid or /etc/subgid grants the account (by name or number)."""
    total = 0
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (name, str(uid)) and fields[2].isdigit():
            total += int(fields[2])
    return total


def has_subids(user: UserKey = None) -> bool:
    acc = account(user)
    return subid_count(acc.name, acc.uid, "/etc/subuid") > 0 and subid_count(acc.name, acc.uid, "/etc/subgid") > 0


def backends_for(user: UserKey = None) -> list[str]:
    """The --isolation backends the account can use: userns only with subordinate ids."""
    return ["userns", "userns-fakeroot", "fakeroot"] if has_subids(user) else ["userns-fakeroot", "fakeroot"]


def nsbuild_cmd() -> list[str]:
    """argv prefix running the nsbuild installed next to the interpreter running pytest (the venv).

    sys.executable is deliberately not resolved: the venv's bin/python symlink is what makes the
    console script's environment the venv.
    """
    exe = Path(os.path.dirname(sys.executable)) / "nsbuild"
    if not exe.exists():
        pytest.fail(f"{exe} does not exist: install the project into this venv (`make venv`)")
    return [str(exe)]


def user_env(user: UserKey = None, env: Mapping[str, str] | None = None, tz: str | None = None) -> dict[str, str]:
    """A clean environment for the account: nothing of pytest's environment leaks into a build."""
    acc = account(user)
    out = {
        "HOME": str(acc.home),
        "USER": acc.name,
        "LOGNAME": acc.name,
        "PATH": SAFE_PATH,
        "LANG": "C.UTF-8",
    }
    if tz is not None:
        out["TZ"] = tz
    if env:
        out.update(env)
    return out


def as_user_argv(argv: Sequence[str], user: UserKey = None) -> list[str]:
    """argv wrapped so that it runs as the account (setpriv when we are root and it is another one)."""
    argv = [os.fspath(a) for a in argv]
    if user is None:
        return argv
    acc = account(user)
    if acc.is_current:
        return argv
    if not is_root():
        pytest.skip(f"running as {acc.name} needs root (the suite runs as {pwd.getpwuid(os.geteuid()).pw_name})")
    return ["setpriv", f"--reuid={acc.uid}", f"--regid={acc.gid}", "--init-groups", "--", *argv]


def run_as(
    argv: Sequence[str | os.PathLike[str]],
    user: UserKey = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    input: str | bytes | None = None,
    text: bool = True,
    umask: int | None = None,
    tz: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """Run argv as the account with a clean environment; stdout and stderr are captured.

    `env` adds to (or overrides) the clean environment. `cwd` defaults to the account's home when
    switching accounts (the pytest cwd may be unreachable for it), else to the current directory.
    """
    acc = account(user)
    if cwd is None and not acc.is_current:
        cwd = acc.home
    proc = subprocess.run(
        as_user_argv([os.fspath(a) for a in argv], user),
        cwd=cwd,
        env=user_env(user, env, tz),
        input=input,
        capture_output=True,
        text=text,
        umask=-1 if umask is None else umask,
        timeout=timeout,
        stdin=subprocess.DEVNULL if input is None else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(describe(proc))
    return proc


def popen_as(
    argv: Sequence[str | os.PathLike[str]],
    user: UserKey = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    umask: int | None = None,
    tz: str | None = None,
    **popen_kwargs,
) -> subprocess.Popen:
    """Like run_as but returns the Popen (for interrupting a build: setpriv execs the command, so
    proc.send_signal(SIGINT) reaches it directly). stdout/stderr default to pipes, stdin to /dev/null."""
    acc = account(user)
    if cwd is None and not acc.is_current:
        cwd = acc.home
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        as_user_argv([os.fspath(a) for a in argv], user),
        cwd=cwd,
        env=user_env(user, env, tz),
        umask=-1 if umask is None else umask,
        **popen_kwargs,
    )


def popen_nsbuild(args: Sequence[str | os.PathLike[str]], user: UserKey = None, **kwargs) -> subprocess.Popen:
    return popen_as([*nsbuild_cmd(), *args], user, **kwargs)


def processes_of(user: UserKey = None) -> list[tuple[int, str]]:
    """(pid, command line) of every live process of the account (zombies excluded), from /proc:
    to show that nothing a build started outlives it."""
    uid = account(user).uid
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if int(fields.get("Uid", "-1").split()[0]) != uid or fields.get("State", "").startswith("Z"):
            continue
        found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace").strip()))
    return found


def processes_with(marker: str, *, zombies: bool = True) -> list[str]:
    """Processes (any user) whose argv contains `marker`, pytest itself left out, as "pid: command
    line"; zombies too unless `zombies` is false."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not zombies and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except (OSError, IndexError):
            continue
        if marker in cmd and "pytest" not in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def run_nsbuild(args: Sequence[str | os.PathLike[str]], user: UserKey = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed nsbuild as the account (see run_as for the keyword arguments)."""
    return run_as([*nsbuild_cmd(), *args], user, **kwargs)


def describe(proc: subprocess.CompletedProcess) -> str:
    """A failure message holding the command, its status and its output."""

    def show(data: str | bytes | None) -> str:
        if data is None:
            return ""
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        return data if len(data) < 20000 else data[:8000] + "\n[...]\n" + data[-8000:]

    args = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
    return (
        f"command failed with exit status {proc.returncode}: {args}\n"
        f"--- stdout ---\n{show(proc.stdout)}\n--- stderr ---\n{show(proc.stderr)}"
    )


# --- temporary trees owned by an account ------------------------------------------------------------


def make_user_tmp(user: UserKey = None, prefix: str = "nsbuild-test-") -> Path:
    """A fresh directory under /var/tmp owned by the account, mode 0755 (others may read results)."""
    acc = account(user)
    # Lower-case hex names, not mkdtemp's: podman derives an image name from an `oci:DIR` path, and
    # a component like "abc_" (mkdtemp's alphabet has '_') is not a valid reference.
    while True:
        path = USER_TMP_PARENT / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    if not acc.is_current:
        os.chown(path, acc.uid, acc.gid)
    path.chmod(0o755)
    return path


def first_subid_range(name: str, uid: int, path: str) -> tuple[int, int] | None:
    """The account's first range of /etc/subuid or /etc/subgid, as (start, count)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (name, str(uid)) and fields[1].isdigit() and fields[2].isdigit():
            return int(fields[1]), int(fields[2])
    return None


def chown_tree(user: UserKey, *paths: Path) -> None:
    """As root: each path, and what is below a directory (symlinks not followed), becomes the account's,
    so that nsbuild running as it can read and replace them. Otherwise nothing to do."""
    if is_root():
        acc = account(user)
        for p in paths:
            os.lchown(p, acc.uid, acc.gid)
            for dirpath, dirnames, filenames in os.walk(p) if p.is_dir() and not p.is_symlink() else []:
                for n in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, n), acc.uid, acc.gid)


def remove_tree(path: Path, user: UserKey = None) -> None:
    """Remove a tree, including files owned by subordinate ids and read-only directories.

    Root just removes it (after making directories writable: a build may leave 0555 dirs). An
    ordinary user removes what it owns, then the rest from a user namespace that maps its
    subordinate range the way nsbuild does (namespace id 1.. = first subordinate id..), where it is
    root over those files; `podman unshare` is the last resort.
    """
    if not os.path.lexists(path):
        return
    subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path) and not is_root():
        me = pwd.getpwuid(os.geteuid())
        uids = first_subid_range(me.pw_name, me.pw_uid, "/etc/subuid")
        gids = first_subid_range(me.pw_name, me.pw_uid, "/etc/subgid")
        if uids and gids:
            subprocess.run(
                [
                    "unshare",
                    "--user",
                    "--map-root-user",
                    f"--map-users={uids[0]},1,{uids[1]}",
                    f"--map-groups={gids[0]},1,{gids[1]}",
                    "sh",
                    "-c",
                    'chmod -R u+rwX "$1"; rm -rf "$1"',
                    "sh",
                    str(path),
                ],
                capture_output=True,
                check=False,
            )
        if os.path.lexists(path) and shutil.which("podman"):
            subprocess.run(["podman", "unshare", "rm", "-rf", str(path)], capture_output=True, check=False)
    if os.path.lexists(path):
        raise AssertionError(f"could not remove {path}: files owned by ids this account cannot map remain")


class UserTmpFactory:
    """Creates per-account temporary directories and removes them all at the end of the test."""

    def __init__(self) -> None:
        self._made: list[tuple[Path, UserKey]] = []

    def __call__(self, user: UserKey = None, prefix: str = "nsbuild-test-") -> Path:
        path = make_user_tmp(user, prefix)
        self._made.append((path, user))
        return path

    def cleanup(self) -> None:
        errors = []
        for path, user in reversed(self._made):
            try:
                remove_tree(path, user)
            except AssertionError as exc:
                errors.append(str(exc))
        self._made.clear()
        if errors:
            raise AssertionError("\n".join(errors))


# --- which accounts a rootless test runs as ---------------------------------------------------------


def unprivileged_user_params() -> list:
    """pytest.param list for the two kinds of unprivileged caller: with and without subordinate ids.

    As root: "test" (nsbuild-test) and "nosub" (nsbuild-nosub). Otherwise the current user (None)
    stands in for whichever kind it is, and the other variant is skipped with the reason.
    """
    if is_root():
        return [pytest.param("test", id="test"), pytest.param("nosub", id="nosub")]
    me = pwd.getpwuid(os.geteuid()).pw_name
    mine = has_subids(None)
    return [
        pytest.param(
            None,
            id="test",
            marks=[]
            if mine
            else pytest.mark.skip(
                reason=f"not root and {me} has no /etc/subuid+/etc/subgid range: the with-subids case "
                "needs root (to switch to nsbuild-test) or a range for this user"
            ),
        ),
        pytest.param(
            None,
            id="nosub",
            marks=[]
            if not mine
            else pytest.mark.skip(
                reason=f"not root and {me} has subordinate ids: the no-subids case needs root "
                "(to switch to nsbuild-nosub)"
            ),
        ),
    ]
