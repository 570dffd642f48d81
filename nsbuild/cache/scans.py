"""The SBOM's package scans, remembered in the layer cache (`<cache>/sbom/<identity>.json`), so that a
rebuild of an unchanged image reads none of its layers again (issue 17).

The identity (nsbuild.sbom.packages.scan_identity) names the layers by their blob digests and covers
everything else the scan depends on; the documents themselves are rendered afresh from the packages,
so they are byte for byte what a full scan gives. An entry is used only when it is intact: it names
the identity it was recorded for, the sha256 of its package list matches, and every package is in one
of the image's layers. Anything else (truncated, edited, copied from another image's entry) is ignored,
and the layers are scanned and the entry rewritten. Like the layer entries, an entry is trusted as far
as the account that can write the cache: whoever can rewrite it can also rewrite its checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild import sbom  # loads the scanner's module only when an entry is read or written

if TYPE_CHECKING:
    from nsbuild.sbom import Package

SCANS_DIR = "sbom"


def _checksum(packages: Any) -> str:
    return hashlib.sha256(json.dumps(packages, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class PackageScans:
    def __init__(self, cache_root: Path) -> None:
        self.dir = cache_root / SCANS_DIR

    def _entry(self, identity: str) -> Path:
        if len(identity) != 64 or not all(c in "0123456789abcdef" for c in identity):
            raise ValueError(f"not a scan identity: {identity!r}")
        return self.dir / f"{identity}.json"

    def get(self, identity: str, layers: Sequence[str]) -> tuple[Package, ...] | None:
        """The packages recorded for `identity` (an image whose layers are the digests `layers`), or
        None: no entry, or one that is not intact."""
        path = self._entry(identity)
        try:
            entry = json.loads(path.read_bytes())
            if not isinstance(entry, dict) or entry.get("identity") != identity:
                return None
            if entry.get("sha256") != _checksum(entry.get("packages")):
                return None
            packages = sbom.packages_from_json(entry["packages"], layers)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # last use, for `cache prune`
        return packages

    def put(self, identity: str, packages: Iterable[Package]) -> None:
        """Best effort: an entry that cannot be written only costs the next build a scan."""
        path = self._entry(identity)
        data = sbom.packages_to_json(packages)
        text = json.dumps({"identity": identity, "sha256": _checksum(data), "packages": data}, sort_keys=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # pid: swept once dead
        try:
            self.dir.mkdir(exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def prune(self, now: float, older_than_s: float) -> int:
        """Drop the entries unused for `older_than_s` seconds; how many."""
        removed = 0
        for p in self.dir.glob("*.json"):
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    removed += 1
        return removed
