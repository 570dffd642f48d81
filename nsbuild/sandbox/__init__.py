"""Where fakeRootCommands run: the backends (nsbuild.sandbox.backends), and the scratch trees they leave."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from nsbuild.errors import BuildError
from nsbuild.sandbox.backends import BACKENDS, MODE, REGISTRY, USES_FAKEROOT, Backend, Probe, choose, probe, probe_all
from nsbuild.sandbox.ids import full_map
from nsbuild.sandbox.runner import Command, run
from nsbuild.sandbox.tree import remove

__all__ = [
    "BACKENDS",
    "MODE",
    "REGISTRY",
    "USES_FAKEROOT",
    "Backend",
    "Probe",
    "choose",
    "probe",
    "probe_all",
    "remove_tree",
]


def remove_tree(path: Path) -> None:
    """Remove a scratch tree; what the caller cannot remove itself (files owned by its subordinate ids,
    left by the userns backend) is removed from inside a user namespace with the same id map."""
    path = Path(path)
    with contextlib.suppress(OSError):
        remove(path)
    if os.path.lexists(path) and os.getuid() != 0 and full_map() is not None:
        with contextlib.suppress(BuildError):
            run(
                Command(
                    "userns",
                    ["rm", "-rf", "--", str(path)],
                    env={"PATH": "/usr/bin:/bin"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
