"""fromImage: read a docker-archive (plain, gz, zstd) or an OCI layout (dir or archive).

A base image is input from elsewhere: members are looked up by exact name, never extracted by their
own path; every blob is copied into our own blob directory under its verified digest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from nsbuild.core.compress import compression_of, open_decompressed
from nsbuild.core.platform import platform_name, variant_matches
from nsbuild.core.refs import parse_ref
from nsbuild.errors import BuildError
from nsbuild.image.image import sha256_digest
from nsbuild.layer.layer import (
    MEDIA_BY_COMPRESSOR,
    MEDIA_TAR,
    Blob,
    Layer,
    copy_verified,
    decompress_verified,
)
from nsbuild.tar.tarscan import Member, TarFormatError, check_file, scan_file

REF_NAME = "org.opencontainers.image.ref.name"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_JSON = 64 << 20  # a manifest or config larger than this is not an image


@dataclass(frozen=True)
class BaseImage:
    config: dict[str, Any]
    layers: list[Layer]
    history: list[dict[str, Any]] = field(default_factory=list)
    raw_config: bytes | None = None  # the config's bytes as stored (`nsbuild push` keeps its digest)
    manifest_digest: str = ""  # an OCI base's manifest (what an SBOM names the base by); "" unknown


class _Slice:
    """The data of one member of an archive file, read as a file."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self.f = f
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        if len(data) != n:
            raise BuildError("the archive changed while it was read")
        self.left -= n
        return data


class _Reader:
    """Named files of an image: a directory, or the members of a (decompressed) tar archive, indexed
    by nsbuild.tar.tarscan (strict headers; a malformed archive is refused before anything is read)."""

    def __init__(self, root: Path | None = None, archive: Path | None = None) -> None:
        self.root = root
        self.archive = archive
        self.members: dict[str, Member] = {}
        if archive is not None:
            for m in scan_file(archive):
                self.members[os.path.normpath(m.name).lstrip("/")] = m

    def exists(self, name: str) -> bool:
        if self.archive is not None:
            return name in self.members
        assert self.root is not None
        return (self.root / name).is_file()

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self.archive is not None:
            member = self.members.get(name)
            if member is None or not member.isreg():
                raise BuildError(f"{name}: missing from the archive (or not a regular file)")
            with open(self.archive, "rb") as f:
                f.seek(member.data_offset)
                yield _Slice(f, member.size)  # type: ignore[misc]
            return
        assert self.root is not None
        path = self.root / name
        if path.is_symlink() or not path.is_file():
            raise BuildError(f"{path}: missing (or not a regular file)")
        with open(path, "rb") as f:
            yield f

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise BuildError(f"{name}: larger than {MAX_JSON >> 20} MiB, not an image file")
        return parse_json(data, name)


def parse_json(data: bytes, what: str, kind: type = object) -> Any:
    """JSON from a base image: a syntax error, nesting that exhausts the recursion limit, a number of
    thousands of digits or a value of the wrong type is one line, never a traceback."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise BuildError(f"{what}: invalid JSON: {reason}") from None
    if not isinstance(value, kind):
        raise BuildError(
            f"{what}: expected a JSON {'object' if kind is dict else kind.__name__}, got {type(value).__name__}"
        )
    return value


def _decompressed_blob(blob: Blob, dest_dir: Path, expected_diff_id: str | None, what: str) -> Blob:
    assert blob.path is not None
    if compression_of(blob.path) == "none":
        if expected_diff_id is not None and blob.digest != expected_diff_id:
            raise BuildError(f"{what}: digest {blob.digest} does not match the config's diff_id {expected_diff_id}")
        check_layer_tar(blob, what)
        return blob
    tar = decompress_verified(blob.path, dest_dir, expected_diff_id, what)
    check_layer_tar(tar, what)
    return tar


# What the image config's runtime part holds, as far as nsbuild merges it into the new image.
BASE_CONFIG_LISTS = ("Env", "Cmd", "Entrypoint", "Shell", "OnBuild")
BASE_CONFIG_OBJECTS = ("Labels", "ExposedPorts", "Volumes", "Healthcheck")
BASE_CONFIG_STRINGS = ("User", "WorkingDir", "StopSignal")


def _check_base_config(config: dict[str, Any], what: str) -> None:
    """The base config's values nsbuild reads have the types the image spec gives them (a number for
    Env must be one line here, not a TypeError where the configs are merged)."""
    runtime = config.get("config")
    if runtime is not None and not isinstance(runtime, dict):
        raise BuildError(f"{what}: config: expected an object, got {type(runtime).__name__}")
    history = config.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        raise BuildError(f"{what}: history: expected a list of objects")
    for key, value in (runtime or {}).items():
        if value is None:
            continue
        if key in BASE_CONFIG_LISTS and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise BuildError(f"{what}: config.{key}: expected a list of strings")
        if key in BASE_CONFIG_OBJECTS and not isinstance(value, dict):
            raise BuildError(f"{what}: config.{key}: expected an object")
        if key in BASE_CONFIG_STRINGS and not isinstance(value, str):
            raise BuildError(f"{what}: config.{key}: expected a string")
    labels = (runtime or {}).get("Labels") or {}
    if not all(isinstance(v, str) for v in labels.values()):
        raise BuildError(f"{what}: config.Labels: expected string values")


def _check_digest(value: Any, what: str) -> str:
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise BuildError(f"{what}: {value!r} is not a sha256 digest")
    return value


def load_base(
    text: str,
    blob_dir: Path,
    work_dir: Path,
    *,
    architecture: str,
    image_name: str | None = None,
    image_tag: str | None = None,
    label: str = "fromImage",
    variant: str | None = None,
) -> BaseImage:
    """The image at `text`; errors start with `label: ` (the spec attribute or the command's argument,
    none when `label` is empty)."""
    p = f"{label}: " if label else ""
    ref = parse_ref(text)
    if ref.format == "registry":
        # Every caller pulls a docker:// image itself (nsbuild.sources.pull) before files are read.
        raise ValueError(f"load_base reads archives and layouts, not {text!r}")
    if ref.format == "load":
        raise BuildError(f"{p}{text!r}: a local podman/docker store is not read; export the image to a file")
    path = ref.path
    if not path.exists():
        raise BuildError(f"{p}no such file or directory: {path}")
    fmt = ref.format
    if fmt == "auto":
        fmt = "oci-dir" if path.is_dir() else "archive"
    if fmt == "oci-dir":
        if not (path / "oci-layout").is_file():
            raise BuildError(f"{p}{path} is a directory but not an OCI layout (no oci-layout file)")
        with _malformed(path, p):
            return _load_oci(_Reader(root=path), blob_dir, (architecture, variant), image_tag or ref.tag, p)
    with _open_archive(path, work_dir, p) as reader, _malformed(path, p):
        if reader.exists("manifest.json"):
            return _load_docker(reader, blob_dir, image_name or ref.name, image_tag or ref.tag, p)
        if reader.exists("index.json") and reader.exists("oci-layout"):
            return _load_oci(reader, blob_dir, (architecture, variant), image_tag or ref.tag, p)
        raise BuildError(f"{p}{path} is neither a docker-archive (no manifest.json) nor an OCI archive (no index.json)")


@contextmanager
def _malformed(path: Path, p: str) -> Iterator[None]:
    """A manifest, index or config whose values have the wrong types (a list where an object belongs, a
    number for a name): one line naming the image, whatever line of the loader tripped over it."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        raise BuildError(f"{p}{path}: malformed manifest, index or config ({exc})") from None


@contextmanager
def _open_archive(path: Path, work_dir: Path, p: str) -> Iterator[_Reader]:
    plain = path
    if compression_of(path) != "none":
        # Random access to members needs the plain tar; decompress once into our work dir.
        plain = work_dir / "base-archive.tar"
        try:
            with open_decompressed(path) as src, open(plain, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, EOFError) as exc:
            plain.unlink(missing_ok=True)
            raise BuildError(f"{p}{path}: cannot decompress: {exc}") from None
    try:
        try:
            reader = _Reader(archive=plain)
        except TarFormatError as exc:
            raise BuildError(f"{p}{path}: not a readable tar archive: {exc}") from None
        yield reader
    finally:
        if plain != path:
            plain.unlink(missing_ok=True)


def check_layer_tar(blob: Blob, what: str) -> None:
    """Every header of a base layer, before anything uses it (a layer reused byte for byte too: an
    image must not pass on a tar that readers disagree about)."""
    assert blob.path is not None
    try:
        check_file(blob.path)
    except TarFormatError as exc:
        raise BuildError(f"{what}: not a sound tar archive: {exc}") from None


def _load_docker(reader: _Reader, blob_dir: Path, name: str | None, tag: str | None, p: str) -> BaseImage:
    manifest = reader.json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise BuildError(f"{p}manifest.json holds no image")
    entry = _choose_docker_image(manifest, name, tag, p)
    config_name = entry.get("Config")
    if not isinstance(config_name, str):
        raise BuildError(f"{p}manifest.json: Config missing")
    with reader.open(os.path.normpath(config_name)) as f:
        config_bytes = f.read(MAX_JSON + 1)
    if len(config_bytes) > MAX_JSON:
        raise BuildError(f"{p}{config_name}: larger than {MAX_JSON >> 20} MiB, not an image config")
    config = parse_json(config_bytes, f"{p}{config_name}", dict)
    _check_base_config(config, f"{p}{config_name}")
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    layer_names = entry.get("Layers", [])
    if not isinstance(layer_names, list) or len(layer_names) != len(diff_ids):
        raise BuildError(
            f"{p}manifest.json lists {len(layer_names)} layers but the config has {len(diff_ids)} diff_ids"
        )
    layers = []
    for i, (lname, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True)):
        _check_digest(diff_id, f"{p}config diff_ids[{i}]")
        what = f"{p}layer {i} ({lname})"
        with reader.open(os.path.normpath(lname)) as f:
            raw = copy_verified(f, blob_dir, None, what)
        tar = _decompressed_blob(raw, blob_dir, diff_id, what)
        layers.append(Layer(diff_id=diff_id, tar=tar, compressed=tar, media_type=MEDIA_TAR, comment=f"base layer {i}"))
    return BaseImage(config, layers, list(config.get("history", [])), raw_config=config_bytes)


def _choose_docker_image(manifest: list[dict], name: str | None, tag: str | None, p: str) -> dict:
    if name is None and tag is None:
        if len(manifest) > 1:
            tags = [t for m in manifest for t in m.get("RepoTags") or []]
            raise BuildError(
                f"{p}the archive holds {len(manifest)} images ({', '.join(tags)}); "
                "choose one with fromImageName/fromImageTag or docker-archive:PATH:NAME:TAG"
            )
        return manifest[0]
    for m in manifest:
        for repo_tag in m.get("RepoTags") or []:
            rname, _, rtag = repo_tag.rpartition(":")
            name_ok = name is None or rname == name or rname.split("/")[-1] == name
            if name_ok and (tag is None or rtag == tag):
                return m
    tags = [t for m in manifest for t in m.get("RepoTags") or []]
    raise BuildError(
        f"{p}no image {name or '*'}:{tag or '*'} in the archive (it has: {', '.join(tags) or 'untagged images'})"
    )


def _is_artifact(desc: Any) -> bool:
    """An SBOM or attestation that index.json lists beside the image it refers to (OCI 1.1: an
    artifactType, no tag): never the image an untagged layout names."""
    return isinstance(desc, dict) and "artifactType" in desc


def choose_platform(index: dict[str, Any], platform: tuple[str, str | None], p: str) -> dict[str, Any]:
    """The entry of an image index for linux/`platform` (architecture, variant or None: any, the
    plainest first), every entry checked first: a descriptor whose platform is not an object of
    strings is refused, as the registry puller refuses it."""
    architecture, variant = platform
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise BuildError(f"{p}the index's manifests is not a list")
    found: list[dict[str, Any]] = []
    names = []
    for i, desc in enumerate(entries):
        plat = desc.get("platform") if isinstance(desc, dict) else None
        if not isinstance(desc, dict) or not (
            isinstance(plat, dict) and all(isinstance(v, str) for k, v in plat.items() if "features" not in k)
        ):
            raise BuildError(f"{p}the index's manifests[{i}] has no platform object of strings")
        names.append(platform_name(plat.get("os", "?"), plat.get("architecture", "?"), plat.get("variant")))
        ours = plat.get("os", "linux") == "linux" and plat.get("architecture") == architecture
        if ours and variant_matches(architecture, variant, plat.get("variant")):
            found.append(desc)
    if not found:
        wanted = platform_name("linux", architecture, variant)
        raise BuildError(
            f"{p}no {wanted} image in the index (it has: {', '.join(names) or 'none'}); set architecture and variant"
        )
    # No variant asked for: the entry naming none, else the highest (arm v8 > v7), as the puller does.
    if variant is None:
        found.sort(key=lambda d: (not d["platform"].get("variant"), d["platform"].get("variant", "")), reverse=True)
    return found[0]


def _load_oci(reader: _Reader, blob_dir: Path, platform: tuple[str, str | None], tag: str | None, p: str) -> BaseImage:
    index = reader.json("index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise BuildError(f"{p}index.json lists no manifest")
    if tag is not None:
        names = [m.get("annotations", {}).get(REF_NAME, "?") for m in manifests]
        chosen = [m for m, n in zip(manifests, names, strict=True) if n == tag]
        if not chosen:
            raise BuildError(f"{p}no image tagged {tag!r} in the layout (it has: {', '.join(names)})")
        desc = chosen[0]
    elif len(images := [m for m in manifests if not _is_artifact(m)]) == 1:
        desc = images[0]
    else:
        raise BuildError(f"{p}the layout holds {len(images)} images; name one with oci:DIR:TAG")

    raw: dict[str, bytes] = {}

    def blob_json(d: dict, what: str) -> Any:
        digest = _check_digest(d.get("digest"), what)
        with reader.open("blobs/sha256/" + digest.split(":", 1)[1]) as f:
            blob = copy_verified(f, blob_dir, digest, what)
        assert blob.path is not None
        if blob.size > MAX_JSON:
            raise BuildError(f"{what}: larger than {MAX_JSON >> 20} MiB, not an image file")
        raw[what] = blob.path.read_bytes()
        return parse_json(raw[what], what, dict)

    manifest = blob_json(desc, f"{p}manifest")
    for _ in range(4):
        if "manifests" not in manifest:
            break
        manifest = blob_json(choose_platform(manifest, platform, p), f"{p}manifest")
    config = blob_json(manifest.get("config", {}), f"{p}config")
    _check_base_config(config, f"{p}config")
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    descs = manifest.get("layers", [])
    if len(descs) != len(diff_ids):
        raise BuildError(f"{p}the manifest lists {len(descs)} layers but the config has {len(diff_ids)} diff_ids")
    layers = []
    for i, (d, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        digest = _check_digest(d.get("digest"), f"{p}layer {i}")
        _check_digest(diff_id, f"{p}config diff_ids[{i}]")
        what = f"{p}layer {i} ({digest[:19]})"
        with reader.open("blobs/sha256/" + digest.split(":", 1)[1]) as f:
            compressed = copy_verified(f, blob_dir, digest, what)
        tar = _decompressed_blob(compressed, blob_dir, diff_id, what)
        media = MEDIA_BY_COMPRESSOR[compression_of(compressed.path or "")]
        layers.append(
            Layer(diff_id=diff_id, tar=tar, compressed=compressed, media_type=media, comment=f"base layer {i}")
        )
    history = list(config.get("history", []))
    digest = sha256_digest(raw[f"{p}manifest"])
    return BaseImage(config, layers, history, raw_config=raw.get(f"{p}config"), manifest_digest=digest)
