"""extraCommands: bash as the calling user, in the customisation layer's root, clean environment."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from nsbuild.errors import BuildError
from nsbuild.sandbox.boundary import hide_own_process
from nsbuild.sandbox.runner import Command, run

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
    """Run a script with `bash -e`; its output is kept and shown if it fails.

    It runs as the caller, in a pid namespace of the caller's own ids where one can be made (mode
    "self", nsbuild.sandbox.lifetime), so every process it starts, `setsid -f` and double forks
    included, ends with it or with nsbuild, however nsbuild ends."""
    if not script.strip():
        return
    hide_own_process()  # the script runs as the caller: our environ must be closed to it
    with tempfile.NamedTemporaryFile("w+b", dir=log_dir, prefix="script-", suffix=".log") as log:
        res = run(
            Command(
                "self",
                ["bash", "--noprofile", "--norc", "-e", "-c", script],
                network="host",
                env=env,
                cwd=str(cwd),
                stdout=log.fileno(),
                stderr=subprocess.STDOUT,
                umask=0o022,
            )
        )
        status = res.returncode
        if status != 0:
            log.seek(0)
            output = log.read().decode("utf-8", "replace")
            tail = "\n".join(output.splitlines()[-40:])
            shown = f"; its output:\n{tail}" if tail else " (no output)"
            raise BuildError(f"{what} failed with exit status {status}{shown}")
