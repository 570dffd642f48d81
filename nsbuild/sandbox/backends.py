"""Where fakeRootCommands run: the backends, how to tell whether they work here, and picking one.

Backends, in the order `--isolation auto` tries them (REGISTRY):
  userns           user+mount+net+pid namespaces with the caller's full subordinate id map (newuidmap);
                   chown to any mapped id is real on disk; overlayfs captures the changes.
  userns-fakeroot  a namespace with one id (no subordinate ids needed); fakeroot inside records what the
                   kernel refuses (chown to other ids, device nodes); copy-and-diff captures changes.
  fakeroot         no namespaces at all (LD_PRELOAD only): static binaries cannot be faked.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nsbuild.errors import BuildError
from nsbuild.sandbox.ids import current_user, full_map
from nsbuild.sandbox.runner import Mode, try_enter

RESTRICTED = (
    "user namespaces may be restricted by seccomp, AppArmor "
    "(kernel.apparmor_restrict_unprivileged_userns) or a container runtime"
)


@dataclass(frozen=True)
class Probe:
    backend: str
    ok: bool
    why: str = ""  # why it does not work here
    fix: str = ""  # what the user can change


class Backend(Protocol):
    """One way of running a script as (faked) root over the image being built."""

    name: str
    mode: Mode  # the stage1 mode its sandbox runs in (nsbuild.sandbox.runner)
    uses_fakeroot: bool  # the script runs under fakeroot

    def probe(self) -> Probe:
        """Whether it works here; if not, why and what the user can change."""
        ...


class UsernsBackend:
    name = "userns"
    mode: Mode = "userns"
    uses_fakeroot = False

    def probe(self) -> Probe:
        disabled = _userns_disabled()
        if disabled:
            return Probe(self.name, False, *disabled)
        user, _, _ = current_user()
        for tool in ("newuidmap", "newgidmap"):
            bad = _setuid_ok(tool)
            if bad:
                return Probe(self.name, False, bad, "install the uidmap package (apt-get install uidmap)")
        if full_map() is None:
            return Probe(
                self.name,
                False,
                f"user {user} has no subordinate id range in /etc/subuid and /etc/subgid",
                f"ask an administrator: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}",
            )
        return _cannot_enter(self.name, self.mode) or Probe(self.name, True)


class UsernsFakerootBackend:
    name = "userns-fakeroot"
    mode: Mode = "single"
    uses_fakeroot = True

    def probe(self) -> Probe:
        disabled = _userns_disabled()
        if disabled:
            return Probe(self.name, False, *disabled)
        return (
            _fakeroot_missing(self.name)
            or _cannot_enter(self.name, self.mode)
            or _fakeroot_broken(self.name, "check that fakeroot's faked daemon can run (SysV IPC)")
            or Probe(self.name, True)
        )


class FakerootBackend:
    # No namespaces for the script: it runs as the caller, in a pid namespace of the caller's own ids
    # where one can be made.
    name = "fakeroot"
    mode: Mode = "self"
    uses_fakeroot = True

    def probe(self) -> Probe:
        fix = "check that fakeroot's faked daemon can run (SysV IPC) and LD_PRELOAD is allowed"
        return _fakeroot_missing(self.name) or _fakeroot_broken(self.name, fix) or Probe(self.name, True)


REGISTRY: tuple[Backend, ...] = (UsernsBackend(), UsernsFakerootBackend(), FakerootBackend())
BACKENDS = tuple(b.name for b in REGISTRY)
# Stage1 mode per backend, and whether the script runs under fakeroot.
MODE = {b.name: b.mode for b in REGISTRY}
USES_FAKEROOT = {b.name: b.uses_fakeroot for b in REGISTRY}
_BY_NAME = {b.name: b for b in REGISTRY}

_cache: dict[str, Probe] = {}


def probe(backend: str) -> Probe:
    if backend not in _cache:
        _cache[backend] = _BY_NAME[backend].probe()
    return _cache[backend]


def probe_all() -> list[Probe]:
    return [probe(b) for b in BACKENDS]


def choose(isolation: str) -> str:
    """The backend to use; BuildError naming, per backend, why it does not work and what to change."""
    if isolation != "auto":
        if isolation not in BACKENDS:
            raise BuildError(f"--isolation: unknown backend {isolation!r} (auto, {', '.join(BACKENDS)})")
        p = probe(isolation)
        if not p.ok:
            raise BuildError(f"--isolation {isolation} does not work here: {p.why} ({p.fix})")
        return isolation
    reasons = []
    for b in BACKENDS:
        p = probe(b)
        if p.ok:
            return b
        reasons.append(f"  {b}: {p.why}; {p.fix}")
    raise BuildError("fakeRootCommands cannot run here, no backend works:\n" + "\n".join(reasons))


def _max_user_namespaces() -> int | None:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        return None


def _userns_disabled() -> tuple[str, str] | None:
    """(why, fix) where user namespaces are switched off altogether."""
    if _max_user_namespaces() == 0:
        return (
            "user namespaces are disabled (user.max_user_namespaces = 0)",
            "ask an administrator: sysctl -w user.max_user_namespaces=15000",
        )
    return None


def _cannot_enter(backend: str, mode: Mode) -> Probe | None:
    why = try_enter(mode)
    if why:
        return Probe(backend, False, f"cannot create the namespace: {why}", RESTRICTED)
    return None


def _setuid_ok(tool: str) -> str | None:
    path = shutil.which(tool)
    if path is None:
        return f"{tool} is not installed"
    st = os.stat(path)
    if os.getuid() != 0 and not (st.st_mode & stat.S_ISUID or _has_file_caps(path)):
        return f"{path} is neither setuid root nor has file capabilities"
    return None


def _has_file_caps(path: str) -> bool:
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def _fakeroot_missing(backend: str) -> Probe | None:
    if shutil.which("fakeroot") is None:
        return Probe(backend, False, "fakeroot is not installed", "install fakeroot (apt-get install fakeroot)")
    return None


def _fakeroot_broken(backend: str, fix: str) -> Probe | None:
    ok, out = _fakeroot_works()
    if not ok or out != "0":
        return Probe(backend, False, f"fakeroot does not work here: {out or 'no output'}", fix)
    return None


def _last_line(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].removeprefix("nsbuild: sandbox: ") if lines else ""


def _fakeroot_works() -> tuple[bool, str]:
    try:
        res = subprocess.run(
            ["fakeroot", "--", "id", "-u"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if res.returncode != 0:
        return False, _last_line(res.stderr) or f"exit status {res.returncode}"
    return True, res.stdout.strip()
