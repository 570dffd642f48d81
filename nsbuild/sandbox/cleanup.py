"""Removing a scratch tree that a backend may have filled with files the caller does not own."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from nsbuild.errors import BuildError
from nsbuild.sandbox.ids import full_map
from nsbuild.sandbox.tree import remove


def remove_tree(path: Path) -> None:
    """Remove a scratch tree; what the caller cannot remove itself (files owned by its subordinate ids,
    left by the userns backend) is removed from inside a user namespace with the same id map."""
    path = Path(path)
    with contextlib.suppress(OSError):
        remove(path)
    if os.path.lexists(path) and os.getuid() != 0 and full_map() is not None:
        # Every build sweeps leftovers through here; the namespace machinery is loaded only in the
        # rare case that needs it, so a build without scripts starts without it.
        from nsbuild.sandbox.runner import Command, run

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
