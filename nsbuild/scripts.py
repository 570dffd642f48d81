"""extraCommands: bash as the calling user, in the customisation layer's root, clean environment."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from nsbuild.errors import BuildError

# The environment scripts see, documented in the README: nothing else leaks in from the caller.
PASSED_THROUGH = ("PATH",)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


def script_env(*, work: Path, spec_dir: Path, mtime: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    home = work / "home"
    home.mkdir(exist_ok=True)
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(
        {
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
            "SOURCE_DATE_EPOCH": str(mtime),
            "NSBUILD_SPEC_DIR": str(spec_dir),
            "TERM": "dumb",
        }
    )
    env.update(extra or {})
    return env


def run_bash(script: str, *, cwd: Path, env: dict[str, str], what: str, log_dir: Path) -> None:
    """Run a script with `bash -e`; its output is kept and shown if it fails."""
    if not script.strip():
        return
    with tempfile.NamedTemporaryFile("w+b", dir=log_dir, prefix="script-", suffix=".log") as log:
        # A session of its own, so every process the script leaves behind can be killed with it.
        proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-e", "-c", script],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: os.umask(0o022),
        )
        try:
            status = proc.wait()
        finally:
            _kill_group(proc.pid)
        if status != 0:
            log.seek(0)
            output = log.read().decode("utf-8", "replace")
            tail = "\n".join(output.splitlines()[-40:])
            how = f"signal {-status}" if status < 0 else f"status {status}"
            raise BuildError(f"{what} failed with exit {how}" + (f"; its output:\n{tail}" if tail else " (no output)"))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
