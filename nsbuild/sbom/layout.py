"""The image an SBOM describes, as plain values: read from an OCI layout, or given by the build."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_OCI_MANIFEST, sha256_digest

REF_NAME = "org.opencontainers.image.ref.name"
BASE_DIGEST = "org.opencontainers.image.base.digest"
BASE_NAME = "org.opencontainers.image.base.name"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_JSON = 64 << 20


@dataclass(frozen=True)
class LayerFacts:
    """One layer: its blob digest (the manifest's), diff_id, media type, size, the blob on disk, and
    what it was made from (`source`: a content path, "base", "customisation", or "")."""

    digest: str
    diff_id: str
    media_type: str
    size: int
    path: Path | None = None
    source: str = ""
    base: bool = False


@dataclass(frozen=True)
class BaseFacts:
    """The base image (fromImage): its reference as given and its manifest digest ("" when unknown)."""

    name: str
    digest: str
    layers: int  # how many of the image's first layers are the base's


@dataclass(frozen=True)
class ImageFacts:
    name: str
    tag: str
    manifest: bytes
    media_type: str
    config: dict[str, Any]
    layers: tuple[LayerFacts, ...]
    base: BaseFacts | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def created(self) -> str:
        """The config's `created`, as UTC to the second (what SPDX and CycloneDX accept)."""
        return utc_seconds(self.config.get("created"))

    @property
    def architecture(self) -> str:
        return str(self.config.get("architecture") or "")


_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def utc_seconds(value: Any) -> str:
    m = _TIME_RE.match(value) if isinstance(value, str) else None
    if m is None:
        return "1970-01-01T00:00:00Z"  # an image without a (valid) creation time
    if m.group(3) == "Z":
        return m.group(1) + "Z"
    when = datetime.fromisoformat(m.group(1) + m.group(3)).astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _blob(root: Path, digest: Any, what: str) -> Path:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise BuildError(f"{root}: {what}: {digest!r} is not a sha256 digest")
    path = root / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.is_file():
        raise BuildError(f"{root}: {what}: blob {digest} is missing")
    return path


def _json(path: Path, what: str) -> Any:
    if path.stat().st_size > MAX_JSON:
        raise BuildError(f"{path}: {what} larger than {MAX_JSON >> 20} MiB")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise BuildError(f"{path}: {what}: invalid JSON ({str(exc)[:200]})") from None


def choose_manifest(root: Path, tag: str | None) -> dict[str, Any]:
    """The index.json descriptor of the image: the one tagged `tag`, else the only image manifest
    (artifacts attached to it, which carry a subject and no tag, are not candidates)."""
    index = _json(root / "index.json", "index.json")
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
    if tag is not None:
        chosen = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
    else:
        chosen = [m for m in manifests if m.get("mediaType") == MEDIA_OCI_MANIFEST and "artifactType" not in m]
    if len(chosen) != 1:
        names = sorted((m.get("annotations") or {}).get(REF_NAME, "?") for m in manifests)
        want = f"tagged {tag!r}" if tag else "(name one with a tag)"
        raise BuildError(f"{root}: no single image {want} in the layout (it has: {', '.join(names) or 'none'})")
    return chosen[0]


def read_layout(root: Path, tag: str | None = None, name: str = "") -> ImageFacts:
    """The image of an OCI layout directory, its layers' blobs in place; `name`: the repository (a
    layout records only tags), default the directory's name. Base layers are known by the
    manifest's base annotations (set for a pulled fromImage) and the config's history."""
    desc = choose_manifest(root, tag)
    manifest_path = _blob(root, desc.get("digest"), "manifest")
    manifest_bytes = manifest_path.read_bytes()
    manifest = _json(manifest_path, "manifest")
    if "layers" not in manifest:
        raise BuildError(f"{root}: the manifest is an index; pass the platform's image")
    config = _json(_blob(root, manifest.get("config", {}).get("digest"), "config"), "config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    descs = manifest.get("layers") or []
    if len(diff_ids) != len(descs):
        raise BuildError(f"{root}: the manifest lists {len(descs)} layers but the config has {len(diff_ids)} diff_ids")
    comments = _layer_comments(config, len(descs))
    layers = tuple(
        LayerFacts(
            digest=d["digest"],
            diff_id=diff_id,
            media_type=d.get("mediaType", ""),
            size=int(d.get("size", 0)),
            path=_blob(root, d.get("digest"), f"layer {i}"),
            source=comments[i],
        )
        for i, (d, diff_id) in enumerate(zip(descs, diff_ids, strict=True))
    )
    annotations = {str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()}
    ref_name = (desc.get("annotations") or {}).get(REF_NAME, "")
    facts = ImageFacts(
        name or ref_name or root.name,
        ref_name,
        manifest_bytes,
        desc.get("mediaType", ""),
        config,
        layers,
        None,
        annotations,
    )
    return with_base(facts, _base_from(facts))


def _layer_comments(config: dict[str, Any], count: int) -> list[str]:
    history = [h for h in config.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")]
    if len(history) != count:
        return [""] * count
    return [str(h.get("comment") or h.get("created_by") or "") for h in history]


def _base_from(facts: ImageFacts) -> BaseFacts | None:
    """nsbuild's history: the new layers are `created_by: nsbuild`, those below them the base's."""
    history = [h for h in facts.config.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")]
    count = 0
    if len(history) == len(facts.layers):
        while count < len(history) and history[count].get("created_by") != "nsbuild":
            count += 1
        if count == len(history):
            count = 0  # not an nsbuild image: nothing says which layers are a base's
    digest = facts.annotations.get(BASE_DIGEST, "")
    if not count and not digest:
        return None
    return BaseFacts(facts.annotations.get(BASE_NAME, ""), digest, count)


def with_base(facts: ImageFacts, base: BaseFacts | None) -> ImageFacts:
    """The same image with `base` as its base and its first `base.layers` layers marked as the base's."""
    count = base.layers if base else 0
    layers = tuple(
        LayerFacts(lay.digest, lay.diff_id, lay.media_type, lay.size, lay.path, lay.source, i < count)
        for i, lay in enumerate(facts.layers)
    )
    return ImageFacts(
        facts.name, facts.tag, facts.manifest, facts.media_type, facts.config, layers, base, facts.annotations
    )
