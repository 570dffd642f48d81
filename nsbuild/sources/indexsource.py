"""An image index in an OCI layout or archive (`nsbuild push`, `nsbuild inspect`), read as untrusted
input: every document and blob is copied into our own directory under its verified digest and size
before it is parsed or used, descriptors must have the types the image spec gives them, and each
manifest an index names must be an image manifest (a nested index is refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nsbuild.core.refs import parse_ref
from nsbuild.errors import BuildError
from nsbuild.image.index import (
    CONFIG_OF_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Attached,
    BlobFile,
    ImageIndex,
    Platform,
    PlatformManifest,
)
from nsbuild.layer.layer import copy_verified
from nsbuild.sources.baseimage import DIGEST_RE, MAX_JSON, REF_NAME, _open_archive, _Reader, parse_json

MAX_PLATFORMS = 256  # more entries than any real index has: refused before anything is read


class _Layout:
    """The blobs of one layout or archive, each read once into `blob_dir` and checked."""

    def __init__(self, reader: _Reader, blob_dir: Path, where: str) -> None:
        self.reader = reader
        self.blob_dir = blob_dir
        self.where = where

    def blob(self, desc: Any, what: str) -> BlobFile:
        digest, size = _descriptor(desc, f"{self.where}: {what}")
        name = "blobs/sha256/" + digest.split(":", 1)[1]
        if not self.reader.exists(name):
            raise BuildError(f"{self.where}: {what} {digest} is not in the layout")
        with self.reader.open(name) as f:
            blob = copy_verified(f, self.blob_dir, digest, f"{self.where}: {what}")
        if blob.size != size:
            raise BuildError(f"{self.where}: {what} {digest} has {blob.size} bytes, its descriptor says {size}")
        return BlobFile(digest, size, path=blob.path)

    def small(self, desc: Any, what: str) -> bytes:
        """A blob read into memory: a document, never more than MAX_JSON bytes."""
        _, size = _descriptor(desc, f"{self.where}: {what}")
        if size > MAX_JSON:
            raise BuildError(f"{self.where}: {what} claims {size} bytes, not an image document")
        blob = self.blob(desc, what)
        assert blob.path is not None
        return blob.path.read_bytes()

    def document(self, desc: Any, what: str) -> tuple[bytes, dict[str, Any]]:
        data = self.small(desc, what)
        return data, parse_json(data, f"{self.where}: {what} {desc['digest']}", dict)


def _descriptor(desc: Any, what: str) -> tuple[str, int]:
    if not isinstance(desc, dict):
        raise BuildError(f"{what}: the descriptor is not a JSON object")
    digest, size, media = desc.get("digest"), desc.get("size"), desc.get("mediaType", "")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise BuildError(f"{what}: no valid sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BuildError(f"{what} {digest}: no valid size")
    if not isinstance(media, str):
        raise BuildError(f"{what} {digest}: the mediaType is not a string")
    return digest, size


def read_layout_index(text: str, work: Path) -> ImageIndex | None:
    """The index the tag of `text` (oci:DIR[:TAG], oci-archive:FILE[:TAG], a layout path) names, its
    blobs verified into `work`; None when it names a single image, or `text` is no OCI layout."""
    ref = parse_ref(text)
    if ref.format not in ("oci-dir", "oci-archive", "auto") or not ref.path.exists():
        return None
    blob_dir = work / "blobs"
    if ref.path.is_dir():
        if not (ref.path / "oci-layout").is_file():
            return None
        return _read(_Layout(_Reader(root=ref.path), blob_dir, str(ref.path)), ref.tag)
    if ref.format == "auto" and ref.path.suffix not in (".tar", ""):
        return None
    with _open_archive(ref.path, work, "") as reader:
        if not (reader.exists("index.json") and reader.exists("oci-layout")):
            return None
        return _read(_Layout(reader, blob_dir, str(ref.path)), ref.tag)


def _read(layout: _Layout, tag: str | None) -> ImageIndex | None:
    top = layout.reader.json("index.json")
    entries = top.get("manifests") if isinstance(top, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BuildError(f"{layout.where}: index.json lists no manifests")
    tagged = [e for e in entries if _ref_name(e) == tag] if tag else [e for e in entries if "artifactType" not in e]
    if len(tagged) != 1:
        return None  # the single-image reader says what is wrong with the choice
    if tagged[0].get("mediaType") not in INDEX_TYPES:
        return None
    raw, index = layout.document(tagged[0], "index")
    media = index.get("mediaType", tagged[0]["mediaType"])
    if media not in INDEX_TYPES:
        raise BuildError(f"{layout.where}: index {tagged[0]['digest']} has media type {media!r}, not an index's")
    children = index.get("manifests")
    if not isinstance(children, list) or not children or len(children) > MAX_PLATFORMS:
        raise BuildError(f"{layout.where}: the index lists no manifests (or more than {MAX_PLATFORMS})")
    platforms = tuple(_platform_image(layout, i, desc, entries) for i, desc in enumerate(children))
    return ImageIndex(platforms, media_type=media, raw=raw)


def _ref_name(entry: dict[str, Any]) -> str | None:
    annotations = entry.get("annotations")
    return annotations.get(REF_NAME) if isinstance(annotations, dict) else None


def _platform_image(layout: _Layout, i: int, desc: dict[str, Any], entries: list[dict]) -> PlatformManifest:
    what = f"index manifests[{i}]"
    plat = desc.get("platform") if isinstance(desc, dict) else None
    if not isinstance(plat, dict) or not all(
        isinstance(plat.get(k, ""), str) for k in ("os", "architecture", "variant")
    ):
        raise BuildError(f"{layout.where}: {what} has no platform object of strings")
    if not plat.get("os") or not plat.get("architecture"):
        raise BuildError(f"{layout.where}: {what}: the platform names no os and architecture")
    media = desc.get("mediaType")
    if media not in MANIFEST_TYPES:
        raise BuildError(
            f"{layout.where}: {what} has media type {media!r}: not an image manifest (nested indexes are refused)"
        )
    raw, manifest = layout.document(desc, what)
    if manifest.get("mediaType", media) != media:
        raise BuildError(f"{layout.where}: {what}: the manifest's mediaType is not its descriptor's")
    config = manifest.get("config")
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_OF_MANIFEST[media]:
        raise BuildError(f"{layout.where}: {what}: the config descriptor is missing or of the wrong media type")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise BuildError(f"{layout.where}: {what}: 'layers' is not a list")
    blobs = [layout.blob(config, f"{what} config")]
    blobs += [layout.blob(d, f"{what} layer {n}") for n, d in enumerate(layers)]
    unique = tuple({b.digest: b for b in blobs}.values())
    platform = Platform(plat["os"], plat["architecture"], plat.get("variant") or None)
    referrers = tuple(_referrers(layout, raw, desc["digest"], entries))
    return PlatformManifest(platform, raw, media, unique, referrers)


def _referrers(layout: _Layout, manifest: bytes, digest: str, entries: list[dict]) -> list[Attached]:
    """The artifacts index.json lists whose subject is this manifest (SBOMs and provenance)."""
    out = []
    for entry in entries:
        if "artifactType" not in entry or entry.get("mediaType") not in MANIFEST_TYPES:
            continue
        raw, doc = layout.document(entry, "referrer")
        subject = doc.get("subject")
        if not isinstance(subject, dict) or subject.get("digest") != digest:
            continue
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise BuildError(f"{layout.where}: referrer {entry['digest']}: 'layers' is not a list")
        parts = [raw] + [layout.small(d, "referrer blob") for d in [doc.get("config"), *layers]]
        out.append(Attached(dict(entry), tuple(parts)))
    return out


def index_report(media_type: str, digest: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """`nsbuild inspect` of an index: its type and digest, and per entry the platform and manifest."""
    platforms = []
    for desc in entries:
        plat = desc.get("platform") or {}
        name = "/".join(str(plat[k]) for k in ("os", "architecture", "variant") if plat.get(k)) or "unknown"
        platforms.append(
            {
                "platform": name,
                **{k: plat[k] for k in ("os", "architecture", "variant") if plat.get(k)},
                "digest": desc.get("digest"),
                "size": desc.get("size"),
                "mediaType": desc.get("mediaType"),
                **({"artifactType": desc["artifactType"]} if "artifactType" in desc else {}),
            }
        )
    return {"index": {"mediaType": media_type, "digest": digest, "platforms": platforms}}


def render_index(report: dict[str, Any]) -> str:
    index = report["index"]
    lines = [f"index {index['digest']} ({index['mediaType']}), {len(index['platforms'])} platforms"]
    width = max((len(p["platform"]) for p in index["platforms"]), default=0)
    lines += [f"  {p['platform']:<{width}}  {p['digest']}  {p['mediaType']}" for p in index["platforms"]]
    return "\n".join(lines) + "\n"
