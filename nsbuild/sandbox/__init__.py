"""Where fakeRootCommands run: the backends, how to tell whether they work here, and picking one.

Backends, in the order `--isolation auto` tries them:
  userns           user+mount+net+pid namespaces with the caller's full subordinate id map (newuidmap);
                   chown to any mapped id is real on disk; overlayfs captures the changes.
  userns-fakeroot  a namespace with one id (no subordinate ids needed); fakeroot inside records what the
                   kernel refuses (chown to other ids, device nodes); copy-and-diff captures changes.
  fakeroot         no namespaces at all (LD_PRELOAD only): static binaries cannot be faked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nsbuild.errors import BuildError
from nsbuild.sandbox.ids import current_user, full_map
from nsbuild.sandbox.runner import run, try_enter
from nsbuild.sandbox.tree import remove

BACKENDS = ("userns", "userns-fakeroot", "fakeroot")
# Stage1 mode per backend, and whether the script runs under fakeroot.
# The fakeroot backend runs as the caller: in a pid namespace of its own ids where one can be made.
MODE = {"userns": "userns", "userns-fakeroot": "single", "fakeroot": "self"}
USES_FAKEROOT = {"userns": False, "userns-fakeroot": True, "fakeroot": True}


@dataclass(frozen=True)
class Probe:
    backend: str
    ok: bool
    why: str = ""  # why it does not work here
    fix: str = ""  # what the user can change


_cache: dict[str, Probe] = {}


def _max_user_namespaces() -> int | None:
    try:
        return int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
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


def _userns_blocked(why: str) -> Probe | None:
    n = _max_user_namespaces()
    if n == 0:
        return Probe(
            "",
            False,
            "user namespaces are disabled (user.max_user_namespaces = 0)",
            "ask an administrator: sysctl -w user.max_user_namespaces=15000",
        )
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


def _probe_userns() -> Probe:
    b = "userns"
    blocked = _userns_blocked("")
    if blocked:
        return Probe(b, False, blocked.why, blocked.fix)
    name, _, _ = current_user()
    for tool in ("newuidmap", "newgidmap"):
        bad = _setuid_ok(tool)
        if bad:
            return Probe(b, False, bad, "install the uidmap package (apt-get install uidmap)")
    if full_map() is None:
        return Probe(
            b,
            False,
            f"user {name} has no subordinate id range in /etc/subuid and /etc/subgid",
            f"ask an administrator: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}",
        )
    why = try_enter("userns")
    if why:
        return Probe(
            b,
            False,
            f"cannot create the namespace: {why}",
            "user namespaces may be restricted by seccomp, AppArmor "
            "(kernel.apparmor_restrict_unprivileged_userns) or a container runtime",
        )
    return Probe(b, True)


def _probe_userns_fakeroot() -> Probe:
    b = "userns-fakeroot"
    blocked = _userns_blocked("")
    if blocked:
        return Probe(b, False, blocked.why, blocked.fix)
    if shutil.which("fakeroot") is None:
        return Probe(b, False, "fakeroot is not installed", "install fakeroot (apt-get install fakeroot)")
    why = try_enter("single")
    if why:
        return Probe(
            b,
            False,
            f"cannot create the namespace: {why}",
            "user namespaces may be restricted by seccomp, AppArmor "
            "(kernel.apparmor_restrict_unprivileged_userns) or a container runtime",
        )
    ok, out = _fakeroot_works()
    if not ok or out != "0":
        return Probe(
            b,
            False,
            f"fakeroot does not work here: {out or 'no output'}",
            "check that fakeroot's faked daemon can run (SysV IPC)",
        )
    return Probe(b, True)


def _probe_fakeroot() -> Probe:
    b = "fakeroot"
    if shutil.which("fakeroot") is None:
        return Probe(b, False, "fakeroot is not installed", "install fakeroot (apt-get install fakeroot)")
    ok, out = _fakeroot_works()
    if not ok or out != "0":
        return Probe(
            b,
            False,
            f"fakeroot does not work here: {out or 'no output'}",
            "check that fakeroot's faked daemon can run (SysV IPC) and LD_PRELOAD is allowed",
        )
    return Probe(b, True)


_PROBES = {"userns": _probe_userns, "userns-fakeroot": _probe_userns_fakeroot, "fakeroot": _probe_fakeroot}


def probe(backend: str) -> Probe:
    if backend not in _cache:
        _cache[backend] = _PROBES[backend]()
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


def remove_tree(path: Path) -> None:
    """Remove a scratch tree; what the caller cannot remove itself (files owned by its subordinate ids,
    left by the userns backend) is removed from inside a user namespace with the same id map."""
    path = Path(path)
    with contextlib.suppress(OSError):
        remove(path)
    if os.path.lexists(path) and os.getuid() != 0 and full_map() is not None:
        with contextlib.suppress(BuildError):
            run(
                "userns",
                ["rm", "-rf", "--", str(path)],
                env={"PATH": "/usr/bin:/bin"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
