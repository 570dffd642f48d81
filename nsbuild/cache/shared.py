"""The layer cache shared through a registry (--cache-from/--cache-to), and content fingerprints.

The distribution protocol itself lives in nsbuild.registry; this module decides what the shared
record holds, which of its layers a build may take, and where their blobs go (the layer cache).

Shared layer cache
------------------
The local cache's fingerprints hold host paths, inodes and ctimes: worthless on another runner.  For
sharing, a layer is named by a *content fingerprint*: the sha256 over, per tar entry in the order the
writer emits them, the exact tar header the writer would write (name, type, mode, owner after the
ownership policy, fixed mtime, link target, device numbers, xattrs) followed by the sha256 of the
file's bytes.  Two inputs with the same content fingerprint produce the same layer tar byte for byte
(the tar is those headers, that data and padding), whatever their host paths, inodes or file mtimes
(a fresh git checkout gives every file a new mtime, so stat data alone could never match across
runners).  It costs reading every file once; tar + compress + upload read them too and do much more.

The artifact is an OCI image manifest whose config (media type CACHE_CONFIG_MEDIA) maps content
fingerprints to diff_ids and blobs, and whose layers are those blobs, so the registry stores them
(and keeps them from garbage collection) next to the record.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from nsbuild.core.compress import compression_of
from nsbuild.core.progress import Progress
from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_OCI_MANIFEST, canonical_json, sha256_digest
from nsbuild.layer.contentkey import TarMismatch, content_hasher, file_record, verified_tar
from nsbuild.layer.layer import COMPRESSION_OF_MEDIA, MEDIA_BY_COMPRESSOR, Blob, Layer, check_blobs
from nsbuild.registry import (
    BlobRecord,
    PushResult,
    RegistryError,
    RegistryOptions,
    fetch_blob,
    fetch_manifest,
    push_manifest,
)
from nsbuild.registry.client import RegistryClient
from nsbuild.registry.pull import descriptor, is_sha256, parse_document
from nsbuild.registry.usage import TransferReporter, registry_reference
from nsbuild.tar.owners import OwnerPolicy
from nsbuild.tar.tarwriter import Source, encode_header, iter_entries

CACHE_CONFIG_MEDIA = "application/vnd.nsbuild.cache.config.v1+json"


CACHE_FORMAT = "nsbuild-cache-v1"


def content_fingerprint(
    sources: list[Source], *, mtime: int, owner: OwnerPolicy, overlay_whiteouts: bool = False
) -> str:
    """See the module docstring: the tar's headers in order, each file's data by its sha256
    (nsbuild.layer.contentkey.check_tar checks a downloaded tar against it)."""
    h = content_hasher(mtime=mtime, owner=owner, overlay_whiteouts=overlay_whiteouts)
    for entry in iter_entries(sources, overlay_whiteouts=overlay_whiteouts):
        h.update(encode_header(entry, owner.owner_of(entry), mtime))  # perms rules applied as write_tar does
        if entry.kind == "file" and entry.size and entry.host is not None:
            h.update(_content_digest(entry.host, entry.size))
    return h.hexdigest()


def remembered_content_fingerprint(
    cache_root: Path | None, local_key: str | None, sources: list[Source], *, mtime: int, owner: OwnerPolicy
) -> str:
    """content_fingerprint, remembered per local fingerprint in `<cache>/content/`: the local key
    covers every entry's stat data (ctime included), so while it matches, the content does too and an
    unchanged layer costs no reading."""
    memo = cache_root / "content" / local_key if cache_root is not None and local_key else None
    if memo is not None:
        with contextlib.suppress(OSError):
            value = memo.read_text().strip()
            if len(value) == 64:
                return value
    value = content_fingerprint(sources, mtime=mtime, owner=owner)
    if memo is not None:
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # pid: swept once dead
        try:
            memo.parent.mkdir(exist_ok=True)
            tmp.write_text(value + "\n")
            os.replace(tmp, memo)
        except OSError:
            with contextlib.suppress(OSError):  # only a hint: never fail the build nor leave a stray file
                tmp.unlink(missing_ok=True)
    return value


def _content_digest(host: bytes, size: int) -> bytes:
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BuildError(f"{os.fsdecode(host)}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").digest()
    # The size is in the header already; a file that changed size under us would give a tar that
    # does not match, so the build that follows reads it again anyway.
    return file_record(digest, size)


class RemoteCache:
    """`--cache-from`: a record fetched once, blobs downloaded (verified) when a fingerprint matches."""

    def __init__(self, text: str, options: RegistryOptions | None, progress: Progress) -> None:
        self.ref = registry_reference(text, "--cache-from")
        self.options = options
        self.progress = progress
        self.entries: dict[str, dict[str, Any]] = {}
        self.client: RegistryClient | None = None

    def open(self) -> None:
        self.client = RegistryClient(self.ref, self.options, actions=("pull",))
        try:
            body = self._manifest()
        except BaseException:
            self.close()
            raise
        if body is None:
            self.progress.info(f"no shared cache at {self.ref} yet; building")
            return
        what = f"--cache-from {self.ref}"
        doc = parse_document(body, f"{what}: manifest")
        config = doc.get("config")
        digest, size, media = descriptor(config, f"{what}: manifest config")
        if media != CACHE_CONFIG_MEDIA:
            raise BuildError(f"{what}: not an nsbuild cache (config media type {media[:80]!r})")
        if size > 64 * 1024 * 1024:
            raise BuildError(f"{what}: the cache record {digest} claims {size} bytes; refusing it")
        assert self.client is not None
        blob = fetch_blob(self.client, self._scratch, digest, size, CACHE_CONFIG_MEDIA)
        record = parse_document(blob.path.read_bytes(), f"{what}: cache record {digest}")
        if not isinstance(record.get("layers") or {}, dict):
            raise BuildError(f"{what}: cache record {digest}: 'layers' is not an object")
        if record.get("format") != CACHE_FORMAT:
            self.progress.warn(
                f"--cache-from {self.ref}: cache format {record.get('format')!r} is not {CACHE_FORMAT}; ignoring it"
            )
            return
        self.entries = record.get("layers") or {}
        self.progress.info(f"shared cache {self.ref}: {len(self.entries)} layers recorded")

    def _manifest(self) -> bytes | None:
        assert self.client is not None
        # Cache records land in the workspace-independent tmp store first; blobs are fetched per layer.
        self._scratch = Path(tempfile.mkdtemp(prefix="nsbuild-cachefrom-"))
        try:
            body, _media, _digest = fetch_manifest(self.client, self._scratch, self.ref.reference)
        except RegistryError as exc:
            if exc.status == 404:
                return None
            raise
        return body

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def lookup(
        self,
        key: str,
        *,
        compression: str,
        need_tar: bool,
        store_root: Path,
        comment: str,
        mtime: int,
        owner: OwnerPolicy,
    ) -> Layer | None:
        """The layer for content fingerprint `key` from the registry, in the form this build needs
        (`compression`'s blob; the plain tar too when `need_tar`), or None.  Its tar is checked against
        `key` first (nsbuild.layer.contentkey): a record naming other content is refused, the layer built."""
        entry = self.entries.get(key)
        if not entry or self.client is None:
            return None
        if not _valid_cache_entry(entry):
            self.progress.warn(f"shared cache {self.ref}: the record of layer {key[:12]} is malformed; rebuilding it")
            return None
        rec = _recorded_blob(entry, compression)
        if rec is None:
            return None
        blob = self._fetch(rec, store_root)
        if blob is None:
            return None
        assert blob.path is not None  # fetched blobs are stored
        keep_tar = need_tar or compression == "none"
        try:
            if compression != "none" and compression_of(blob.path) != compression:
                raise TarMismatch(f"the blob is not {compression}-compressed")
            tar = verified_tar(
                blob,
                diff_id=str(entry.get("diff_id")),
                key=key,
                mtime=mtime,
                owner=owner,
                save_dir=store_root / "blobs" / "sha256" if keep_tar else None,
            )
        except TarMismatch as exc:
            self.progress.warn(
                f"shared cache {self.ref}: refusing the layer recorded for {comment}: {exc}; building it"
            )
            with contextlib.suppress(OSError):
                blob.path.unlink()
            return None
        compressed = tar if compression == "none" else blob
        return Layer(
            diff_id=tar.digest,
            tar=tar,
            compressed=compressed,
            media_type=MEDIA_BY_COMPRESSOR[compression],
            comment=comment,
        )

    def _fetch(self, rec: dict[str, Any], store_root: Path) -> Blob | None:
        """The recorded blob, stored under `store_root`; None when the registry no longer has it."""
        assert self.client is not None
        digest, size = str(rec["digest"]), int(rec["size"])
        try:
            pulled = fetch_blob(self.client, store_root, digest, size, str(rec.get("mediaType", "")))
        except RegistryError as exc:
            if exc.status == 404:
                self.progress.warn(f"shared cache {self.ref}: a recorded blob is gone ({exc}); rebuilding")
                return None
            raise
        return Blob(digest, size, pulled.path)


def _recorded_blob(entry: dict[str, Any], compression: str) -> dict[str, Any] | None:
    """The descriptor of the recorded form this build can use: `compression`'s, or for an
    uncompressed layer any form (it is decompressed while it is checked)."""
    forms: dict[str, dict[str, Any]] = entry.get("blobs") or {}
    if compression != "none":
        return forms.get(compression)
    return forms.get("none") or forms.get("gz") or forms.get("zstd")


def _valid_cache_entry(entry: object) -> bool:
    """A cache record entry has the shape lookup reads: a diff_id and descriptors of its blobs."""
    if not isinstance(entry, dict) or not is_sha256(entry.get("diff_id")):
        return False
    forms = entry.get("blobs") or {}
    tar_size = entry.get("tar_size", 0)
    if not isinstance(forms, dict) or not isinstance(tar_size, int) or isinstance(tar_size, bool) or tar_size < 0:
        return False
    try:
        for rec in forms.values():
            descriptor(rec, "cache blob")
    except BuildError:
        return False
    return True


def push_cache(
    text: str,
    layers: list[tuple[str, Layer]],
    *,
    options: RegistryOptions | None,
    progress: Progress,
    cache_dir: Path | None,
) -> PushResult:
    """`--cache-to`: the record of this build's content layers, as an artifact holding their blobs."""
    ref = registry_reference(text, "--cache-to")
    entries: dict[str, dict[str, Any]] = {}
    blobs: dict[str, Path] = {}
    descriptors: list[dict[str, Any]] = []
    for key, layer in layers:
        blob = layer.compressed
        if blob.path is None:
            continue
        form = COMPRESSION_OF_MEDIA.get(layer.media_type, "none")
        entries[key] = {
            "diff_id": layer.diff_id,
            "tar_size": layer.tar.size,
            "blobs": {form: {"digest": blob.digest, "size": blob.size, "mediaType": layer.media_type}},
        }
        if blob.digest not in blobs:
            blobs[blob.digest] = blob.path
            descriptors.append({"mediaType": layer.media_type, "digest": blob.digest, "size": blob.size})
    config = canonical_json({"format": CACHE_FORMAT, "layers": entries})
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": {"mediaType": CACHE_CONFIG_MEDIA, "digest": sha256_digest(config), "size": len(config)},
            "layers": descriptors,
            "annotations": {"org.opencontainers.image.description": "nsbuild layer cache"},
        }
    )
    check_blobs([Blob(digest, 0, path) for digest, path in blobs.items()])
    progress.info(f"pushing the layer cache ({len(entries)} layers) to {ref}")
    result = push_manifest(
        ref,
        manifest,
        MEDIA_OCI_MANIFEST,
        blobs={sha256_digest(config): config, **blobs},
        options=options,
        progress=TransferReporter(progress, "cache"),
        blob_record=blob_record(cache_dir),
    )
    progress.info(
        f"pushed the layer cache {result.reference}@{result.digest}: "
        f"{len(result.uploaded_blobs)} blobs uploaded, {len(result.skipped_blobs)} already there, "
        f"{len(result.mounted_blobs)} mounted"
    )
    return result


@contextlib.contextmanager
def opened_cache(text: str | None, options: RegistryOptions | None, progress: Progress):
    if not text:
        yield None
        return
    cache = RemoteCache(text, options, progress)
    cache.open()
    try:
        yield cache
    finally:
        cache.close()


class _HintRecord(BlobRecord):
    """A BlobRecord whose file is only a hint: failing to save it never fails a push."""

    def save(self) -> None:
        with contextlib.suppress(OSError):
            super().save()


def blob_record(cache_dir: Path | None) -> BlobRecord:
    """Where blobs were seen (for cross-repository mounts): `<cache>/blob-record.json`, else in memory."""
    return _HintRecord(cache_dir / "blob-record.json" if cache_dir is not None else None)
