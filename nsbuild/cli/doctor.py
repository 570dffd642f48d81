"""`nsbuild doctor`: which fakeRootCommands backends work here, and why the others do not."""

from __future__ import annotations

import shutil
from pathlib import Path

from nsbuild.sandbox.backends import BACKENDS, Probe, probe_all
from nsbuild.sandbox.ids import SUBGID, SUBUID, current_user, subid_ranges
from nsbuild.sandbox.lifetime import pid_namespace_available

DESCRIPTIONS = {
    "userns": "user namespace with your subordinate ids (chown is real, overlayfs captures changes)",
    "userns-fakeroot": "single-id user namespace with fakeroot inside (no subordinate ids needed)",
    "fakeroot": "fakeroot only, no namespaces (static binaries cannot be faked; no enableFakechroot)",
}


def _facts() -> list[str]:
    name, uid, gid = current_user()
    out = [f"user: {name} (uid {uid}, gid {gid})"]
    try:
        out.append("user.max_user_namespaces: " + Path("/proc/sys/user/max_user_namespaces").read_text().strip())
    except OSError:
        out.append("user.max_user_namespaces: unknown (no /proc/sys/user/max_user_namespaces)")
    for label, path in (("subuid", SUBUID), ("subgid", SUBGID)):
        ranges = subid_ranges(path, name, uid)
        shown = ", ".join(f"{s}-{s + c - 1}" for s, c in ranges) or "none"
        out.append(f"{label} ranges ({path}): {shown}")
    for tool in ("newuidmap", "newgidmap", "fakeroot"):
        out.append(f"{tool}: {shutil.which(tool) or 'not found'}")
    out.append(_process_guarantee())
    return out


def _process_guarantee() -> str:
    if pid_namespace_available():
        return "script processes: end with the build (pid namespace; setsid and double forks included)"
    return (
        "script processes: end with the build through child subreapers only (no user namespace here); "
        "a process another daemon starts for a script (systemd-run, at) can outlive it"
    )


def render(probes: list[Probe], chosen: str | None) -> str:
    lines = ["nsbuild doctor: fakeRootCommands backends (tried in this order by --isolation auto)", ""]
    for p in probes:
        mark = "ok  " if p.ok else "FAIL"
        lines.append(f"  [{mark}] {p.backend:<16} {DESCRIPTIONS[p.backend]}")
        if not p.ok:
            lines.append(f"         why: {p.why}")
            lines.append(f"         fix: {p.fix}")
    lines.append("")
    if chosen:
        lines.append(f"--isolation auto uses: {chosen}")
    else:
        lines.append(
            "no backend works here: fakeRootCommands and enableFakechroot cannot run (builds without them still work)"
        )
    lines.append("")
    lines.extend(_facts())
    return "\n".join(lines)


def run_doctor() -> tuple[str, bool]:
    """(report text, whether at least one backend works)."""
    probes = probe_all()
    chosen = next((p.backend for p in probes if p.ok), None)
    assert [p.backend for p in probes] == list(BACKENDS)
    return render(probes, chosen), chosen is not None
