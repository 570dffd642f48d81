"""Run the layer writer in a process of its own.

The sandbox starts this inside the user namespace or under fakeroot, where lstat shows the ids and
modes the script recorded; the parent only ever sees the finished tar.

    python -m nsbuild.sandbox.layerjob JOB.json   →   {"diff_id": ..., "size": ..., "entries": ...} on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nsbuild.core.compress import HashingWriter
from nsbuild.errors import NsbuildError
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.tarwriter import Source, write_tar


def policy_from_job(owner: dict) -> OwnerPolicy:
    root = Owner(int(owner["uid"]), int(owner["gid"]), str(owner["uname"]), str(owner["gname"]))
    if owner.get("mode", "fixed") == "fixed":
        return OwnerPolicy.fixed_owner(root)
    passwd, group = owner.get("passwd"), owner.get("group")
    return OwnerPolicy.mapped(root, Path(passwd) if passwd else None, Path(group) if group else None)


def run_job(job: dict) -> dict:
    sources = [Source(Path(host), target) for host, target in job["sources"]]
    devices = {
        name.encode("utf-8", "surrogateescape"): (kind, int(major), int(minor))
        for name, (kind, major, minor) in job.get("devices", {}).items()
    }
    with open(job["out"], "wb", buffering=0) as f:
        hashed = HashingWriter(f)
        stats = write_tar(
            sources,
            hashed,
            mtime=int(job["mtime"]),
            owner=policy_from_job(job["owner"]),
            overlay_whiteouts=bool(job.get("overlay_whiteouts", False)),
            devices=devices,
        )
    return {"diff_id": hashed.digest, "size": hashed.size, "entries": stats.entries}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m nsbuild.sandbox.layerjob JOB.json", file=sys.stderr)
        return 2
    try:
        job = json.loads(Path(argv[0]).read_text())
        result = run_job(job)
    except NsbuildError as exc:
        print(f"nsbuild: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"nsbuild: writing layer: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
