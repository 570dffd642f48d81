"""Pull an image from a registry into a content-addressed blob directory.

`dest_dir/blobs/sha256/<hex>` holds every blob (index, manifest, config, layers) under its digest, as
in an OCI layout, so a second pull, or another image sharing layers, downloads nothing it already has.
Each blob is hashed while it streams in and renamed into place only when digest and size match.

Nothing from the registry is trusted before it is checked: a manifest or index asked for by digest
must hash to it, one asked for by tag must hash to the `Docker-Content-Digest` the registry sent
(when it sent one) and to the size its descriptor gave; every document must be a JSON object of the
expected shape (descriptors with sha256 digests and whole sizes); manifests and configs are capped
at 4 MiB. Any failure is one line naming the digest, and nothing lands in the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from nsbuild.core.platform import host_platform, variant_matches
from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, sha256_digest
from nsbuild.layer.layer import file_digest
from nsbuild.registry.client import (
    RegistryClient,
    RegistryError,
    RegistryOptions,
    json_or_none,
    registry_errors,
)
from nsbuild.registry.push import DEFAULT_JOBS, ProgressEvent
from nsbuild.registry.reference import Reference, parse_reference

MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST)
MANIFEST_TYPES = (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
ACCEPT = ", ".join([MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST])
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # as for manifests: configs are small, a huge one is an attack
_READ_SIZE = 256 * 1024
_HEX = frozenset("0123456789abcdef")


def is_sha256(value: object) -> bool:
    return (
        isinstance(value, str)
        and value.startswith("sha256:")
        and len(value) == 71
        and all(c in _HEX for c in value[7:])
    )


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def descriptor(desc: object, what: str) -> tuple[str, int, str]:
    """(digest, size, mediaType) of a descriptor, or a one-line BuildError saying what is wrong."""
    if not isinstance(desc, dict):
        raise BuildError(f"{what} is not a JSON object")
    digest, size, media = desc.get("digest"), desc.get("size"), desc.get("mediaType", "")
    if not is_sha256(digest):
        raise BuildError(f"{what} has no valid sha256 digest ({_shown(digest)})")
    if not _whole(size):
        raise BuildError(f"{what} {digest} has no valid size ({_shown(size)})")
    if not isinstance(media, str):
        raise BuildError(f"{what} {digest} has a mediaType that is not a string")
    return str(digest), int(size), media  # type: ignore[arg-type]


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True) if isinstance(value, str | int | float | None) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _plain(value: object) -> str:
    return value if isinstance(value, str) and len(value) <= 80 and value.isprintable() else _shown(value)


def parse_document(body: bytes, what: str) -> dict[str, Any]:
    """A manifest, index or config: a JSON object, or a one-line BuildError (wrong type, too deep, not JSON)."""
    doc = json_or_none(body)
    if doc is None:
        raise BuildError(f"{what} is not JSON (or is nested too deeply)")
    if not isinstance(doc, dict):
        kind = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(doc), "null")
        raise BuildError(f"{what} is a JSON {kind}, not an object")
    return doc


@dataclass(frozen=True)
class PulledBlob:
    digest: str
    size: int
    media_type: str
    path: Path


@dataclass
class PulledImage:
    reference: Reference  # as asked for
    digest: str  # digest of the image manifest (the platform's one when the tag named an index)
    index_digest: str | None  # digest the tag resolved to when it named an index / manifest list
    manifest: bytes
    config: bytes
    config_digest: str
    layers: list[PulledBlob]
    downloaded_blobs: list[str] = field(default_factory=list)
    cached_blobs: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    resumed_downloads: int = 0  # downloads continued with a Range request after a cut connection

    @property
    def resolved_digest(self) -> str:
        """What the reference resolved to (`REPO@this` pulls the same image on any platform)."""
        return self.index_digest or self.digest

    @property
    def pinned(self) -> str:
        """`registry/repo@sha256:...` of the platform manifest: what to record in history."""
        return f"{self.reference.registry}/{self.reference.repository}@{self.digest}"


class _Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
            raise BuildError(f"unsupported or invalid digest {digest!r} in the image")
        return self.dir / hexpart

    def has(self, digest: str, size: int | None) -> bool:
        try:
            st = self.path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def put_bytes(self, digest: str, data: bytes) -> Path:
        path = self.path(digest)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        return path


def _platform_name(p: dict[str, Any]) -> str:
    parts = [str(p.get("os", "?")), str(p.get("architecture", "?"))]
    if p.get("variant"):
        parts.append(str(p["variant"]))
    return "/".join(parts)


def _variant_matches(arch: str, wanted: str | None, have: str | None) -> bool:
    return variant_matches(arch, wanted, have)


def index_entries(index: dict[str, Any], what: str) -> list[dict[str, Any]]:
    """The index's `manifests`, each an object whose `platform` (if any) is an object of strings. Only
    the entry chosen must be a valid descriptor: an exotic entry for another platform is not our business."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise BuildError(f"{what}: 'manifests' is not a list")
    for i, desc in enumerate(entries):
        if not isinstance(desc, dict):
            raise BuildError(f"{what}: manifests[{i}] is not a JSON object")
        platform_ = desc.get("platform")
        if platform_ is not None and not (
            isinstance(platform_, dict)
            and all(isinstance(v, str) for k, v in platform_.items() if k != "features" and k != "os.features")
        ):
            raise BuildError(f"{what}: manifests[{i}].platform is not an object of strings")
    return entries


def choose_manifest(
    index: dict[str, Any], ref: Reference, os_name: str, architecture: str, variant: str | None
) -> dict[str, Any]:
    candidates = []
    for desc in index_entries(index, f"image {ref}: index"):
        p = desc.get("platform") or {}
        if (
            p.get("os") == os_name
            and p.get("architecture") == architecture
            and _variant_matches(architecture, variant, p.get("variant"))
        ):
            candidates.append(desc)
    if not candidates:
        available = sorted(
            {_platform_name(d.get("platform") or {}) for d in index.get("manifests") or []} - {"unknown/unknown"}
        )
        wanted = "/".join([os_name, architecture] + ([variant] if variant else []))
        raise BuildError(
            f"image {ref} has no {wanted} manifest (available: {', '.join(available) or 'none'}); "
            "set architecture (and variant) in the spec"
        )
    # With no variant asked for, prefer the entry that names none, then the highest (arm v8 > v7).
    if variant is None:
        plain = [d for d in candidates if not (d.get("platform") or {}).get("variant")]
        if plain:
            return plain[0]
        return sorted(candidates, key=lambda d: str(d["platform"].get("variant")), reverse=True)[0]
    return candidates[0]


class _Puller:
    def __init__(self, client: RegistryClient, store: _Store, result_progress: Callable[[ProgressEvent], None]):
        self.client = client
        self.repo = client.ref.repository
        self.store = store
        self._progress = result_progress
        # Layers come down in parallel threads: counters and the callback are shared.
        self._lock = threading.Lock()
        self.downloaded: list[str] = []
        self.cached: list[str] = []
        self.downloaded_bytes = 0
        self.resumed = 0

    def progress(self, event: ProgressEvent) -> None:
        with self._lock:
            self._progress(event)

    def _repository_missing(self) -> bool:
        """Whether a manifest 404 means the repository itself is unknown (distribution says
        MANIFEST_UNKNOWN either way; its tag list tells them apart)."""
        try:
            resp = self.client.request("GET", f"/v2/{self.repo}/tags/list")
        except BuildError:
            return False
        with resp:
            if resp.status_code == 404:
                return True
            if resp.status_code == 200:
                body = json_or_none(resp.content)
                return not (isinstance(body, dict) and body.get("tags"))
        return False

    def manifest(self, reference: str, size: int | None = None) -> tuple[bytes, str, str]:
        """(body, media type, digest) of /manifests/REFERENCE, verified (see the module docstring)
        before it is parsed or stored; `size` is the descriptor's, when a descriptor named it."""
        pinned = reference.startswith("sha256:")
        if pinned and not is_sha256(reference):
            raise BuildError(f"image {self.client.ref}: invalid manifest digest {_shown(reference)}")
        body, sent_digest, content_type = self._get_manifest(reference)
        digest = sha256_digest(body)
        where = f"registry {self.client.registry}: manifest {self.repo}@{reference if pinned else digest}"
        if pinned and digest != reference:
            raise BuildError(f"{where} arrived with digest {digest}; refusing it")
        if not pinned and is_sha256(sent_digest) and sent_digest != digest:
            raise BuildError(
                f"registry {self.client.registry}: manifest {self.repo}:{reference} was announced as {sent_digest} "
                f"but its bytes are {digest}; refusing it"
            )
        if size is not None and len(body) != size:
            raise BuildError(f"{where} has {len(body)} bytes, its descriptor says {size}; refusing it")
        doc = parse_document(body, where)
        # The body's own mediaType is authoritative when present (some registries send text/plain).
        media_type = doc.get("mediaType") or content_type
        if not isinstance(media_type, str):
            raise BuildError(f"{where} has a mediaType that is not a string")
        if media_type in MEDIA_DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
            raise BuildError(
                f"image {self.client.ref} uses the Docker schema 1 manifest format, which is not supported"
            )
        if media_type not in INDEX_TYPES + MANIFEST_TYPES:
            # An OCI manifest may omit mediaType; tell it from the index by its shape.
            media_type = MEDIA_OCI_INDEX if "manifests" in doc else MEDIA_OCI_MANIFEST
        self.store.put_bytes(digest, body)
        return body, media_type, digest

    def _get_manifest(self, reference: str) -> tuple[bytes, str | None, str]:
        """The body of /manifests/REFERENCE (at most 4 MiB, read by the client) and the digest the
        registry announced for it; a 404 says whether the repository or the tag is missing."""
        resp = self.client.request("GET", f"/v2/{self.repo}/manifests/{reference}", headers={"Accept": ACCEPT})
        with resp:
            if resp.status_code == 404:
                codes = {c for c, _ in registry_errors(resp)}
                if "NAME_UNKNOWN" in codes or self._repository_missing():
                    raise RegistryError(
                        f"registry {self.client.registry}: repository {self.repo} not found",
                        404,
                        "NAME_UNKNOWN",
                    )
                raise RegistryError(
                    f"registry {self.client.registry}: {self.repo}:{reference} not found (no such tag or digest)",
                    404,
                    "MANIFEST_UNKNOWN",
                )
            if resp.status_code != 200:
                self.client.raise_for(resp, f"fetching manifest {self.repo}:{reference}")
            content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            return resp.content, resp.headers.get("Docker-Content-Digest"), content_type

    def blob(self, digest: str, size: int, media_type: str) -> PulledBlob:
        path = self.store.path(digest)
        if self.store.has(digest, size):
            with self._lock:
                self.cached.append(digest)
            self.progress(ProgressEvent("exists", digest, size, size))
            return PulledBlob(digest, size, media_type, path)
        policy = self.client.options.retry
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.store.dir)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = _Sink(out)
                failures = 0
                while True:
                    try:
                        self._download(digest, size, sink)
                        break
                    except (requests.RequestException, _Retryable) as e:
                        failures += 1
                        if failures >= policy.attempts:
                            raise BuildError(
                                f"registry {self.client.registry}: download of {digest} failed: "
                                f"{self.client.describe(e)}"
                            ) from None
                        self.client._sleep(policy.delay(failures - 1))
            got = "sha256:" + sink.hasher.hexdigest()
            written = tmp.stat().st_size
            if written != size or got != digest:
                raise BuildError(
                    f"registry {self.client.registry}: blob {digest} of {self.repo} arrived as {got} "
                    f"({written} bytes, expected {size}); refusing it"
                )
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with self._lock:
            self.downloaded.append(digest)
            self.downloaded_bytes += size
        return PulledBlob(digest, size, media_type, path)

    def _download(self, digest: str, size: int, sink: _Sink) -> None:
        """Append the blob's missing bytes to the sink, resuming with a Range request after a failure."""
        out = sink.out
        have = out.tell()
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self.client.request("GET", f"/v2/{self.repo}/blobs/{digest}", headers=headers, stream=True)
        with resp:
            if have and resp.status_code == 206:
                with self._lock:
                    self.resumed += 1
            elif have and resp.status_code == 200:
                # The registry ignored Range: start over.
                sink.reset()
            elif resp.status_code not in (200, 206):
                if resp.status_code in (429, 500, 502, 503, 504):
                    raise _Retryable(f"HTTP {resp.status_code}")
                self.client.raise_for(resp, f"download of blob {digest}")
            for chunk in resp.iter_content(_READ_SIZE):
                sink.write(chunk)
                if out.tell() > size:
                    raise BuildError(f"registry {self.client.registry}: blob {digest} is larger than its {size} bytes")
                self.progress(ProgressEvent("downloading", digest, out.tell(), size))
        if out.tell() < size:
            raise _Retryable(f"connection closed after {out.tell()} of {size} bytes")


class _Retryable(Exception):
    pass


class _Sink:
    """A temporary blob file and the running hash of what it holds."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.hasher = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.hasher.update(data)

    def reset(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.hasher = hashlib.sha256()


def fetch_manifest(client: RegistryClient, store_root: Path, reference: str) -> tuple[bytes, str, str]:
    """(body, media type, digest) of one manifest or index of the client's repository, as it is (no
    platform resolution), also kept in `store_root/blobs/sha256/`. A 404 is a RegistryError with status 404."""
    return _Puller(client, _Store(store_root), _no_progress).manifest(reference)


def fetch_blob(client: RegistryClient, store_root: Path, digest: str, size: int, media_type: str = "") -> PulledBlob:
    """One blob of the client's repository into `store_root/blobs/sha256/`, verified while it streams in.

    Unlike pull_image, which trusts a blob of the right size already there, a blob found on disk is
    hashed again and downloaded anew when its bytes are not `digest` (the store may be shared with
    other writers)."""
    puller = _Puller(client, _Store(store_root), _no_progress)
    blob = puller.blob(digest, size, media_type)
    if puller.cached and file_digest(blob.path) != digest:
        blob.path.unlink(missing_ok=True)
        blob = puller.blob(digest, size, media_type)
    return blob


def _no_progress(event: ProgressEvent) -> None:
    pass


def _resolve(
    puller: _Puller, source: Reference, os_name: str, architecture: str, variant: str | None
) -> tuple[bytes, str, str, str | None]:
    """(manifest body, media type, digest, index digest or None) for the reference, through one index
    at most (a nested or self-naming index is refused: resolving it could never end)."""
    body, media_type, digest = puller.manifest(source.reference)
    if media_type not in INDEX_TYPES:
        return body, media_type, digest, None
    index = parse_document(body, f"image {source}: index {digest}")
    chosen = choose_manifest(index, source, os_name, architecture, variant)
    chosen_digest, chosen_size, _ = descriptor(chosen, f"image {source}: index {digest} entry")
    if chosen_digest == digest:
        raise BuildError(f"image {source}: index {digest} names itself as its {architecture} manifest")
    body, media_type, manifest_digest = puller.manifest(chosen_digest, chosen_size)
    if media_type in INDEX_TYPES:
        raise BuildError(
            f"image {source}: index {digest} names another index ({manifest_digest}); nested indexes are not supported"
        )
    return body, media_type, manifest_digest, digest


def _check_architecture(cfg: dict[str, Any], source: Reference, architecture: str, variant: str | None) -> None:
    """A single manifest (no index to choose from) must be for the architecture asked for."""
    have_arch, have_variant = cfg.get("architecture"), cfg.get("variant")
    if have_arch and (have_arch != architecture or not _variant_matches(architecture, variant, have_variant)):
        wanted = architecture + (f"/{variant}" if variant else "")
        got = _plain(have_arch) + (f"/{_plain(have_variant)}" if have_variant else "")
        raise BuildError(f"image {source} is for {got}, not {wanted}; set architecture in the spec")


Descriptor = tuple[str, int, str]  # (digest, size, mediaType), checked


def _manifest_parts(body: bytes, where: str) -> tuple[Descriptor, list[Descriptor]]:
    """An image manifest's config and layer descriptors, each checked; a config over 4 MiB is refused
    before a byte of it is fetched."""
    doc = parse_document(body, where)
    config_digest, config_size, config_media = descriptor(doc.get("config"), f"{where}: config")
    if config_size > MAX_CONFIG_BYTES:
        raise BuildError(f"{where}: config {config_digest} claims {config_size} bytes, more than 4 MiB")
    layer_descs = doc.get("layers") or []
    if not isinstance(layer_descs, list):
        raise BuildError(f"{where}: 'layers' is not a list")
    wanted = [descriptor(d, f"{where}: layers[{i}]") for i, d in enumerate(layer_descs)]
    return (config_digest, config_size, config_media), wanted


def _fetch_layers(puller: _Puller, wanted: list[Descriptor], jobs: int) -> list[PulledBlob]:
    """The layer blobs, `jobs` at a time, in manifest order; the first failure stops the others."""
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(wanted))), thread_name_prefix="nsbuild-pull") as pool:
        futures = [pool.submit(puller.blob, *w) for w in wanted]
        try:
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def pull_image(
    ref: str | Reference,
    *,
    dest_dir: Path,
    architecture: str | None = None,
    variant: str | None = None,
    os_name: str = "linux",
    options: RegistryOptions | None = None,
    progress: Callable[[ProgressEvent], None] | None = None,
    jobs: int = DEFAULT_JOBS,
) -> PulledImage:
    """Pull `ref` (`[docker://]HOST[:PORT]/REPO[:TAG|@sha256:..]`) into `dest_dir/blobs/sha256/`.

    An index / manifest list is resolved to the `os_name`/`architecture`/`variant` entry (default: this
    machine's); a single manifest whose config names another architecture than the one asked for is
    refused. `jobs` layers download at a time. Raises BuildError with one line on any failure.
    """
    source = parse_reference(ref) if isinstance(ref, str) else ref
    if architecture is None:
        architecture, host_variant = host_platform()
        variant = variant or host_variant
    store = _Store(dest_dir)
    with RegistryClient(source, options, actions=("pull",)) as client:
        puller = _Puller(client, store, progress or _no_progress)
        body, media_type, digest, index_digest = _resolve(puller, source, os_name, architecture, variant)
        config_desc, wanted = _manifest_parts(body, f"image {source}: manifest {digest}")
        config_blob = puller.blob(*config_desc)
        config = config_blob.path.read_bytes()
        cfg = parse_document(config, f"image {source}: config {config_blob.digest}")
        if index_digest is None:
            _check_architecture(cfg, source, architecture, variant)
        layers = _fetch_layers(puller, wanted, jobs)
    return PulledImage(
        reference=source,
        digest=digest,
        index_digest=index_digest,
        manifest=body,
        config=config,
        config_digest=config_blob.digest,
        layers=layers,
        downloaded_blobs=puller.downloaded,
        cached_blobs=puller.cached,
        downloaded_bytes=puller.downloaded_bytes,
        resumed_downloads=puller.resumed,
    )
