"""Image config, manifest and index: stable JSON built from layer values (DESIGN.md §1, §5)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nsbuild.layer.layer import MEDIA_TAR, MEDIA_TAR_GZIP, MEDIA_TAR_ZSTD, Layer

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# Not a Docker v2 type, but skopeo writes it (and keeps it when copying into an OCI layout).
MEDIA_DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

# The Docker names of the OCI layer types, one table both ways: the same bytes under either name.
DOCKER_LAYER_OF_OCI = {MEDIA_TAR: MEDIA_DOCKER_LAYER, MEDIA_TAR_GZIP: MEDIA_DOCKER_LAYER_GZIP}
OCI_LAYER_OF_DOCKER = {
    **{docker: oci for oci, docker in DOCKER_LAYER_OF_OCI.items()},
    MEDIA_DOCKER_LAYER_ZSTD: MEDIA_TAR_ZSTD,
}


def canonical_json(obj: Any) -> bytes:
    """Stable bytes: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    """A finished image: what every sink (archive, layout, registry) consumes.

    `name` is the repository (lower-cased, may carry a registry prefix), `tag` its tag. `layers` are in
    order, base layers first. `config` and `manifest` are the exact bytes whose digests are
    `config_digest` and `manifest_digest` (an OCI image manifest).
    """

    name: str
    tag: str
    layers: list[Layer]
    config: bytes
    manifest: bytes

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"


def oci_manifest(config: bytes, layers: list[Layer], annotations: dict[str, str] | None = None) -> bytes:
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(sorted(annotations.items()))
    return canonical_json(manifest)


def docker_manifest(image: Image) -> bytes:
    """Docker v2 schema 2 manifest for the same config and blobs (registry push with --manifest-format)."""
    layers = []
    for layer in image.layers:
        media = DOCKER_LAYER_OF_OCI.get(layer.media_type)
        if media is None:
            raise ValueError(f"layer {layer.digest} ({layer.media_type}) has no Docker v2 media type; use gz")
        layers.append({"mediaType": media, "digest": layer.digest, "size": layer.size})
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_DOCKER_MANIFEST,
            "config": {
                "mediaType": MEDIA_DOCKER_CONFIG,
                "digest": image.config_digest,
                "size": len(image.config),
            },
            "layers": layers,
        }
    )


# --- config ------------------------------------------------------------------------------------------


def rfc3339(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_env(base: list[str], child: list[str]) -> list[str]:
    """Key-wise: one entry per variable, the child's value wins, base order first."""
    merged: dict[str, str] = {}
    for item in base + child:
        key, _, _ = item.partition("=")
        merged[key] = item
    return list(merged.values())


def merge_config(base: dict[str, Any], child: dict[str, Any], env_mode: str = "merge") -> dict[str, Any]:
    """Child keys win; Env merged key-wise (layered) or concatenated (buildImage); maps merged."""
    out = dict(base)
    for key, value in child.items():
        if key == "Env":
            out[key] = (
                merge_env(base.get("Env") or [], value) if env_mode == "merge" else ((base.get("Env") or []) + value)
            )
        elif key in ("Labels", "ExposedPorts", "Volumes") and isinstance(base.get(key), dict):
            out[key] = {**base[key], **value}
        else:
            out[key] = value
    return out


def make_config(
    *,
    platform: tuple[str, str | None],
    created: int,
    config: dict[str, Any],
    base_config: dict[str, Any] | None,
    base_history: list[dict[str, Any]],
    layers: list[Layer],
    new_from: int,
    env_mode: str = "merge",
) -> bytes:
    """The image config: `layers[:new_from]` come from the base, the rest are new; `platform` is
    (GOARCH, variant or None)."""
    architecture, variant = platform
    base_inner = (base_config or {}).get("config") or {}
    history = [h for h in base_history if isinstance(h, dict)]
    if sum(1 for h in history if not h.get("empty_layer")) != new_from:
        # A base without a usable history gets one entry per layer, so the counts line up.
        history = [{"created": rfc3339(0), "comment": layer.comment} for layer in layers[:new_from]]
    created_s = rfc3339(created)
    for layer in layers[new_from:]:
        history.append({"created": created_s, "created_by": "nsbuild", "comment": layer.comment})
    doc: dict[str, Any] = {
        "architecture": architecture,
        "os": "linux",
        "created": created_s,
        "config": merge_config(base_inner, config, env_mode),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": history,
    }
    if variant:
        doc["variant"] = variant  # only when stated: a config without one keeps its bytes
    return canonical_json(doc)
