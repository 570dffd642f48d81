"""Hand-made OCI image layouts: bases whose every byte a test chooses (hostile ones included).

nsbuild's own writer is what is under test, so these layouts are written from the image-layout
spec directly: blobs named by their digest (or deliberately not), a manifest, an index.json naming it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI layout under construction at `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True)

    def put(self, data: bytes) -> str:
        """Store `data` under its own digest and return that digest."""
        digest = sha256(data)
        (self.blobs / digest.split(":")[1]).write_bytes(data)
        return digest

    def put_file(self, path: Path) -> str:
        with open(path, "rb") as f:
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        shutil.copyfile(path, self.blobs / digest.split(":")[1])
        return digest

    def put_as(self, digest: str, data: bytes) -> None:
        """Store `data` under a name that may not be its digest (a damaged or forged blob)."""
        (self.blobs / digest.split(":")[1]).write_bytes(data)

    def finish(self, config: bytes, layers: list[dict[str, Any]], ref_name: str = "t") -> str:
        """Write the manifest (config stored here, `layers` as descriptors), index.json and oci-layout;
        return the manifest's digest."""
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": self.put(config), "size": len(config)},
                "layers": layers,
            }
        ).encode()
        digest = self.put(manifest)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": ref_name},
                }
            ],
        }
        (self.root / "index.json").write_text(json.dumps(index))
        (self.root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        return digest


def layer_descriptor(digest: str, size: int, media_type: str = OCI_LAYER) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def image_config(diff_ids: list[str], **extra: Any) -> bytes:
    """A linux/amd64 config over layers with these diff_ids."""
    doc: dict[str, Any] = {"architecture": "amd64", "os": "linux", "config": {}}
    doc.update(extra)
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    return json.dumps(doc).encode()
