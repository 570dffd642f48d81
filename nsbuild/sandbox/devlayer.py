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


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    devices = {name.encode("utf-8", "surrogateescape"): spec for name, spec in job.get("devices", {}).items()}
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
    return layerjob.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
