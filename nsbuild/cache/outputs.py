"""What the layer cache remembers of the archives it helped write (`<cache>/outputs/`), so that an
output that already holds the image is left alone (nsbuild.sinks.sinks.ArchiveOutput)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class OutputStamps:
    """What this cache last wrote to each output file: the archive's identity and the file's stat.

    A rebuild that would write the same bytes into a file that nobody touched since (same inode, size,
    mtime and ctime: any write or rename moves ctime) leaves the file alone, as make does.
    """

    def __init__(self, cache_root: Path) -> None:
        self.dir = cache_root / "outputs"

    def _entry(self, path: Path) -> Path:
        return self.dir / (hashlib.sha256(os.fsencode(path.absolute())).hexdigest() + ".json")

    @staticmethod
    def _stat(path: Path) -> list[int] | None:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode]

    def holds(self, path: Path, identity: str) -> bool:
        try:
            entry = json.loads(self._entry(path).read_text())
        except (OSError, ValueError):
            return False
        st = self._stat(path)
        return st is not None and entry.get("identity") == identity and entry.get("stat") == st

    def record(self, path: Path, identity: str) -> None:
        """Best effort: a stamp that cannot be written only costs the next build a rewrite."""
        st = self._stat(path)
        if st is None:
            return
        entry = self._entry(path)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"path": str(path.absolute()), "identity": identity, "stat": st}))
            os.replace(tmp, entry)
        except OSError:
            tmp.unlink(missing_ok=True)

    def forget(self, path: Path) -> None:
        self._entry(path).unlink(missing_ok=True)
