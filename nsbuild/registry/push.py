"""Push an Image to a registry (OCI distribution spec, "push" workflow).

Blobs first (config and layers, each once): HEAD and skip what the registry has; mount from another
repository of the same registry when a BlobRecord says the blob is there; else upload — one PUT for
small blobs, PATCH chunks for large ones, resuming from the registry's `Range` after a dropped
connection. The manifest goes last, so a tag never names a blob that is not there yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import requests

from nsbuild.errors import BuildError, UsageError
from nsbuild.image.image import Image, docker_manifest, sha256_digest
from nsbuild.registry.client import (
    RETRY_STATUSES,
    RegistryClient,
    RegistryConnectionError,
    RegistryError,
    RegistryOptions,
    format_errors,
    registry_errors,
)
from nsbuild.registry.reference import Reference, parse_reference

DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_JOBS = 4  # blobs in flight at once (skopeo copies up to 6 layers at a time)
_LOST_UPLOAD = {"BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN"}
_RANGE_RE = re.compile(r"^(?:bytes=)?0-(\d+)$")


@dataclass(frozen=True)
class ProgressEvent:
    """`action`: exists | mounted | uploading | uploaded | manifest. `done`/`total` are bytes."""

    action: str
    digest: str
    done: int
    total: int


Progress = Callable[[ProgressEvent], None]


@dataclass
class _Tally:
    """What a push counts while its threads run; frozen into a PushResult at the end."""

    uploaded_blobs: list[str] = field(default_factory=list)
    skipped_blobs: list[str] = field(default_factory=list)
    mounted_blobs: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    resumed_uploads: int = 0
    restarted_uploads: int = 0


@dataclass(frozen=True)
class PushResult:
    reference: str  # what was pushed, e.g. 127.0.0.1:5000/app:1.0
    digest: str  # the manifest digest (what `REPO@DIGEST` pulls)
    manifest_media_type: str
    uploaded_blobs: list[str] = field(default_factory=list)
    skipped_blobs: list[str] = field(default_factory=list)
    mounted_blobs: list[str] = field(default_factory=list)
    uploaded_bytes: int = 0
    resumed_uploads: int = 0  # chunked uploads continued from the registry's Range after a failure
    restarted_uploads: int = 0  # uploads begun again from byte 0 after a failure
    retries: int = 0  # requests sent again after a reset, a timeout, 429 or 5xx

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "mediaType": self.manifest_media_type,
            "uploadedBlobs": self.uploaded_blobs,
            "skippedBlobs": self.skipped_blobs,
            "mountedBlobs": self.mounted_blobs,
            "uploadedBytes": self.uploaded_bytes,
        }


class BlobRecord:
    """Which repositories of which registries are known to hold a blob (for cross-repo mounts).

    A small JSON file `{"registry": {"sha256:..": ["repo", ...]}}` the caller keeps next to its cache;
    with no path it lives in memory only. It is a hint: a failed mount falls back to an upload.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._data: dict[str, dict[str, list[str]]] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                data = {}  # a damaged hint file only costs uploads
            if isinstance(data, dict):
                self._data = {
                    str(reg): {str(d): [str(r) for r in repos] for d, repos in blobs.items() if isinstance(repos, list)}
                    for reg, blobs in data.items()
                    if isinstance(blobs, dict)
                }

    def repositories(self, registry: str, digest: str) -> list[str]:
        return list(self._data.get(registry, {}).get(digest, []))

    def add(self, registry: str, repository: str, digest: str) -> None:
        repos = self._data.setdefault(registry, {}).setdefault(digest, [])
        if repository in repos:
            repos.remove(repository)
        repos.insert(0, repository)  # most recent first: the likeliest to still be there
        del repos[8:]

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blobrecord.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f, sort_keys=True, indent=1)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


@dataclass(frozen=True)
class _BlobSource:
    digest: str
    size: int
    path: Path | None = None
    data: bytes | None = None

    def read(self, offset: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[offset : offset + length]
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


@dataclass
class _Session:
    """An upload in progress: the registry's current Location and the bytes it holds."""

    location: str | None
    offset: int


class _Transient(Exception):
    """An upload step failed in a way a new attempt may fix."""


def _manifest_for(image: Image, manifest_format: str) -> tuple[bytes, str]:
    if manifest_format == "oci":
        manifest = image.manifest
    elif manifest_format == "docker":
        try:
            manifest = docker_manifest(image)
        except ValueError as e:
            raise BuildError(f"cannot push a Docker v2 manifest: {e}") from None
    else:
        raise UsageError(f"--manifest-format must be oci or docker, not {manifest_format!r}")
    media_type = json.loads(manifest).get("mediaType")
    if not media_type:
        raise BuildError("the image manifest has no mediaType")
    return manifest, str(media_type)


def _blob_sources(image: Image, manifest: bytes) -> list[_BlobSource]:
    """The blobs the manifest names, in its order (config first), each once, with their bytes' home."""
    by_digest: dict[str, _BlobSource] = {
        image.config_digest: _BlobSource(image.config_digest, len(image.config), data=image.config)
    }
    for layer in image.layers:
        if layer.compressed.path is None:
            raise BuildError(f"layer {layer.digest} was not kept on disk; it cannot be pushed")
        by_digest.setdefault(layer.digest, _BlobSource(layer.digest, layer.size, path=layer.compressed.path))
    doc = json.loads(manifest)
    out: list[_BlobSource] = []
    seen: set[str] = set()
    for desc in [doc["config"], *doc.get("layers", [])]:
        digest = desc["digest"]
        if digest in seen:
            continue
        seen.add(digest)
        src = by_digest.get(digest)
        if src is None:
            raise BuildError(f"the manifest names blob {digest}, which the image does not hold")
        if src.path is not None:
            try:
                actual = src.path.stat().st_size
            except OSError as e:
                raise BuildError(f"layer blob {src.path} cannot be read: {e.strerror}") from None
            if actual != src.size:
                raise BuildError(f"layer blob {src.path} has {actual} bytes, the manifest says {src.size}")
        out.append(src)
    return out


def _parse_range(value: str | None) -> int | None:
    """Bytes the registry holds, from `Range: 0-END` (inclusive). `0-0` is ambiguous (0 or 1 byte)."""
    if not value:
        return None
    m = _RANGE_RE.match(value.strip())
    if not m:
        return None
    end = int(m.group(1))
    return None if end == 0 else end + 1


class _Pusher:
    def __init__(
        self,
        client: RegistryClient,
        result: _Tally,
        progress: Progress | None,
        chunk_size: int,
        monolithic_max: int,
    ) -> None:
        self.client = client
        self.repo = client.ref.repository
        self.result = result
        self.chunk_size = chunk_size
        self.monolithic_max = monolithic_max
        # Blobs go up in parallel threads; the result and the caller's callback see one at a time.
        self._lock = threading.Lock()
        self._progress = progress

    def progress(self, event: ProgressEvent) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(event)

    def _add(self, name: str, value: int | str) -> None:
        with self._lock:
            current = getattr(self.result, name)
            if isinstance(current, list):
                current.append(value)
            else:
                setattr(self.result, name, current + value)

    def exists(self, digest: str) -> bool:
        resp = self.client.request("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        self.client.raise_for(resp, f"checking blob {digest}")
        return False

    def start_upload(self, mount: tuple[str, str] | None = None) -> tuple[str | None, bool]:
        """POST a new upload session (or a mount). Returns (location, mounted)."""
        params = {"mount": mount[0], "from": mount[1]} if mount else None
        resp = self.client.request("POST", f"/v2/{self.repo}/blobs/uploads/", params=params, data=b"")
        resp.close()
        if mount and resp.status_code == 201:
            return None, True
        if resp.status_code != 202:
            self.client.raise_for(resp, "starting a blob upload")
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"registry {self.client.registry}: upload started without a Location")
        return self.client.url(location), False

    def _check_status(self, resp: requests.Response, expected: int, what: str) -> None:
        if resp.status_code == expected:
            return
        if resp.status_code in RETRY_STATUSES:
            raise _Transient(f"HTTP {resp.status_code}")
        codes = {code for code, _ in registry_errors(resp)}
        if resp.status_code == 416 or (resp.status_code == 404 and codes & _LOST_UPLOAD):
            # The registry dropped or moved the upload (e.g. distribution cancels one whose size no
            # longer matches its state after a cut request): begin the blob again.
            raise _Transient(f"HTTP {resp.status_code} {', '.join(sorted(codes))}".rstrip())
        self.client.raise_for(resp, what)

    def _finish(self, location: str, src: _BlobSource, body: bytes) -> None:
        try:
            resp = self.client.request(
                "PUT",
                location,
                params={"digest": src.digest},
                data=body,
                headers={"Content-Type": "application/octet-stream"},
                retry=False,
            )
        except RegistryConnectionError as e:
            raise _Transient(str(e)) from None
        resp.close()
        self._check_status(resp, 201, f"upload of {src.digest}")
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != src.digest:
            raise RegistryError(f"registry {self.client.registry} stored {src.digest} as {got}")

    def upload(self, src: _BlobSource, location: str | None) -> None:
        policy = self.client.options.retry
        failures = 0
        session = _Session(location, 0)
        while True:
            try:
                if session.location is None:
                    session = _Session(self.start_upload()[0], 0)
                assert session.location is not None
                if src.size <= self.monolithic_max:
                    self._finish(session.location, src, src.read(0, src.size))
                else:
                    self._patch_all(src, session)
                    self._finish(session.location, src, b"")
                self._add("uploaded_bytes", src.size)
                self.progress(ProgressEvent("uploaded", src.digest, src.size, src.size))
                return
            except _Transient as e:
                failures += 1
                if failures >= policy.attempts:
                    raise BuildError(
                        f"registry {self.client.registry}: upload of {src.digest} failed {failures} times: {e}"
                    ) from None
                self.client._sleep(policy.delay(failures - 1))
                if self.exists(src.digest):
                    # The cut came after the registry committed the blob (e.g. the final PUT's answer).
                    self._add("uploaded_bytes", src.size)
                    self.progress(ProgressEvent("uploaded", src.digest, src.size, src.size))
                    return
                if session.location is not None and src.size > self.monolithic_max:
                    session = self._resume_point(session.location)
                    if session.location is not None:
                        self._add("resumed_uploads", 1)
                        continue
                session = _Session(None, 0)
                self._add("restarted_uploads", 1)

    def _patch_all(self, src: _BlobSource, session: _Session) -> None:
        """PATCH the rest of the blob from `session.offset`, keeping `session` current so that a
        failure leaves the last Location the registry gave us (its upload state) for the resume."""
        assert session.location is not None
        while session.offset < src.size:
            chunk = src.read(session.offset, min(self.chunk_size, src.size - session.offset))
            end = session.offset + len(chunk) - 1
            try:
                resp = self.client.request(
                    "PATCH",
                    session.location,
                    data=chunk,
                    retry=False,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{session.offset}-{end}",
                    },
                )
            except RegistryConnectionError as e:
                raise _Transient(str(e)) from None
            resp.close()
            self._check_status(resp, 202, f"upload of {src.digest}")
            # A relative Location is relative to the URL that answered (an upload host may not be the registry).
            session.location = urljoin(resp.url or session.location, resp.headers.get("Location") or session.location)
            held = _parse_range(resp.headers.get("Range"))
            session.offset = held if held is not None else end + 1
            self.progress(ProgressEvent("uploading", src.digest, session.offset, src.size))

    def _resume_point(self, location: str) -> _Session:
        """Ask the registry how much of the upload it holds; no location means start a new upload."""
        try:
            resp = self.client.request("GET", location)
        except RegistryConnectionError:
            return _Session(None, 0)
        resp.close()
        held = _parse_range(resp.headers.get("Range")) if resp.status_code == 204 else None
        if held is None:
            return _Session(None, 0)
        return _Session(urljoin(resp.url or location, resp.headers.get("Location") or location), held)

    def push_blob(self, src: _BlobSource, mount_from: list[str]) -> None:
        if self.exists(src.digest):
            self._add("skipped_blobs", src.digest)
            self.progress(ProgressEvent("exists", src.digest, src.size, src.size))
            return
        location = None
        for other in mount_from:
            if other == self.repo:
                continue
            self.client.add_scope(other, "pull")
            location, mounted = self.start_upload((src.digest, other))
            if mounted:
                self._add("mounted_blobs", src.digest)
                self.progress(ProgressEvent("mounted", src.digest, src.size, src.size))
                return
            break  # the registry opened a plain upload instead; use it
        self.upload(src, location)
        self._add("uploaded_blobs", src.digest)

    def _confirm_manifest(self, digest: str, media_type: str) -> None:
        """The registry did not say what it stored: ask for the manifest by digest. Success is
        reported only once the registry holds exactly our bytes."""
        resp = self.client.request("HEAD", f"/v2/{self.repo}/manifests/{digest}", headers={"Accept": media_type})
        resp.close()
        got = resp.headers.get("Docker-Content-Digest")
        if resp.status_code != 200 or (got and got != digest):
            raise RegistryError(
                f"registry {self.client.registry} accepted the manifest but does not serve {self.repo}@{digest} "
                f"(HEAD answered HTTP {resp.status_code}{f', digest {got}' if got else ''})",
                resp.status_code,
            )

    def put_manifest(self, reference: str, manifest: bytes, media_type: str) -> str:
        resp = self.client.request(
            "PUT",
            f"/v2/{self.repo}/manifests/{reference}",
            data=manifest,
            headers={"Content-Type": media_type},
        )
        resp.close()
        if resp.status_code not in (200, 201):
            errors = registry_errors(resp)
            if 400 <= resp.status_code < 500 and errors:
                text = format_errors(errors)
                raise RegistryError(
                    self.client.redact(
                        f"registry {self.client.registry} rejected the manifest for {self.repo}:{reference}: {text}"
                    ),
                    resp.status_code,
                    errors[0][0],
                )
            self.client.raise_for(resp, f"pushing the manifest to {self.repo}:{reference}")
        digest = sha256_digest(manifest)
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise RegistryError(f"registry {self.client.registry} stored the manifest as {got}, expected {digest}")
        if not got:
            self._confirm_manifest(digest, media_type)
        self.progress(ProgressEvent("manifest", digest, len(manifest), len(manifest)))
        return digest


@dataclass(frozen=True)
class PushTuning:
    """How blobs travel: up to `monolithic_max` bytes (default: `chunk_size`) in one PUT, larger
    ones in PATCHes of `chunk_size`; `jobs` blobs at a time."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    monolithic_max: int | None = None
    jobs: int = DEFAULT_JOBS


@dataclass(frozen=True)
class _Push:
    """One push: the manifest, the blobs it needs, and how to reach the registry."""

    target: Reference
    manifest: bytes
    media_type: str
    sources: list[_BlobSource]
    options: RegistryOptions | None
    progress: Progress | None
    blob_record: BlobRecord | None
    tuning: PushTuning


def _push(job: _Push) -> PushResult:
    target, tuning = job.target, job.tuning
    digest = sha256_digest(job.manifest)
    if target.digest and target.digest != digest and not target.tag:
        raise UsageError(f"cannot push to {target}: the manifest's digest is {digest}")
    tally = _Tally()
    with RegistryClient(target, job.options, actions=("pull", "push")) as client:
        client.ping()  # once, before the threads share the client
        monolithic_max = tuning.chunk_size if tuning.monolithic_max is None else tuning.monolithic_max
        pusher = _Pusher(client, tally, job.progress, tuning.chunk_size, monolithic_max)
        _push_blobs(pusher, job)
        order = {src.digest: i for i, src in enumerate(job.sources)}
        for blobs in (tally.uploaded_blobs, tally.skipped_blobs, tally.mounted_blobs):
            blobs.sort(key=order.__getitem__)
        # The manifest last: a tag never names a blob that is not there yet.
        pusher.put_manifest(target.tag or digest, job.manifest, job.media_type)
        result = PushResult(
            str(target),
            digest,
            job.media_type,
            uploaded_blobs=tally.uploaded_blobs,
            skipped_blobs=tally.skipped_blobs,
            mounted_blobs=tally.mounted_blobs,
            uploaded_bytes=tally.uploaded_bytes,
            resumed_uploads=tally.resumed_uploads,
            restarted_uploads=tally.restarted_uploads,
            retries=client.retries,
        )
    if job.blob_record is not None:
        for src in job.sources:
            job.blob_record.add(target.registry, target.repository, src.digest)
        job.blob_record.save()
    return result


def _push_blobs(pusher: _Pusher, job: _Push) -> None:
    """Every blob of the push, `tuning.jobs` at a time; the first failure stops the others."""
    record, registry = job.blob_record, job.target.registry
    jobs = max(1, min(job.tuning.jobs, len(job.sources)))
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="nsbuild-push") as pool:
        futures = [
            pool.submit(pusher.push_blob, src, record.repositories(registry, src.digest) if record else [])
            for src in job.sources
        ]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def push_image(
    image: Image,
    ref: str | Reference,
    *,
    manifest_format: str = "oci",
    options: RegistryOptions | None = None,
    progress: Progress | None = None,
    blob_record: BlobRecord | None = None,
    tuning: PushTuning = PushTuning(),
) -> PushResult:
    """Push `image` to `ref` (`[docker://]HOST[:PORT]/REPO[:TAG|@DIGEST]`) and return what happened.

    `blob_record` (read and updated) enables cross-repository mounts."""
    target = parse_reference(ref) if isinstance(ref, str) else ref
    manifest, media_type = _manifest_for(image, manifest_format)
    sources = _blob_sources(image, manifest)
    return _push(_Push(target, manifest, media_type, sources, options, progress, blob_record, tuning))


def push_manifest(
    ref: str | Reference,
    manifest: bytes,
    media_type: str,
    *,
    blobs: dict[str, bytes | Path] | None = None,
    options: RegistryOptions | None = None,
    progress: Progress | None = None,
    blob_record: BlobRecord | None = None,
    tuning: PushTuning = PushTuning(),
) -> PushResult:
    """Push any manifest (an index, an artifact such as a layer-cache record) after the `blobs` it
    needs ({digest: bytes or file}); blobs it names but that are not given must already be there."""
    target = parse_reference(ref) if isinstance(ref, str) else ref
    sources = []
    for digest, content in (blobs or {}).items():
        if isinstance(content, bytes):
            src = _BlobSource(digest, len(content), data=content)
        else:
            src = _BlobSource(digest, Path(content).stat().st_size, path=Path(content))
        sources.append(src)
    return _push(_Push(target, manifest, media_type, sources, options, progress, blob_record, tuning))
