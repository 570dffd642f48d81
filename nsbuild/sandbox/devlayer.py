"""`python -m nsbuild.sandbox.devlayer JOB.json`: nsbuild.layerjob, plus device nodes a user namespace
could not create.

The kernel refuses mknod of char/block devices in a user namespace; the userns backend's `mknod` shim
leaves an empty regular file and records (type, major, minor). JOB["devices"] maps the layer-relative
name to [kind, major, minor]; such a placeholder is written as that device, exactly as the fakeroot
backends write a faked one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from nsbuild import layerjob, tarwriter


def run_job(job: dict) -> dict:
    """layerjob.run_job with JOB["devices"] placeholders written as device nodes."""
    devices = {name.encode("utf-8", "surrogateescape"): spec for name, spec in job.get("devices", {}).items()}
    if not devices:
        return layerjob.run_job(job)
    plain = tarwriter.iter_entries

    def with_devices(sources: list[tarwriter.Source], *, overlay_whiteouts: bool = False) -> Iterator:
        for entry in plain(sources, overlay_whiteouts=overlay_whiteouts):
            dev = devices.get(entry.name)
            if dev is not None and entry.kind == "file" and entry.size == 0:
                kind, major, minor = dev
                entry = dataclasses.replace(entry, kind=kind, devmajor=int(major), devminor=int(minor),
                                            host=None, xattrs={})
            yield entry

    tarwriter.iter_entries = with_devices  # write_tar looks it up at call time
    try:
        return layerjob.run_job(job)
    finally:
        tarwriter.iter_entries = plain


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    print(json.dumps(run_job(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
