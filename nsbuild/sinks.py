"""Sinks: write a finished Image as a docker-archive, an OCI layout directory or an OCI archive.

Sinks never read the source trees: they consume layer values and their blobs.  File outputs are
atomic: a temporary file beside the destination, renamed at the end, removed on any failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from nsbuild.compress import Compressor
from nsbuild.errors import BuildError, UsageError
from nsbuild.image import MEDIA_OCI_MANIFEST, Image, canonical_json
from nsbuild.layer import Blob
from nsbuild.owners import Owner
from nsbuild.tarwriter import BLOCK, Entry, encode_header

REF_NAME = "org.opencontainers.image.ref.name"
ARCHIVE_OWNER = Owner(0, 0, "", "")
COPY_CHUNK = 1 << 20


class _TarStream:
    """The outer archive (docker-archive / oci-archive): a few members, written in order."""

    def __init__(self, out: object, mtime: int) -> None:
        self.out = out
        self.mtime = mtime
        self.dirs: set[str] = set()
        # Blob bytes go file-to-file in the kernel when the archive is a plain file (no compression).
        self.fd: int | None = None
        try:
            fd = out.fileno()  # type: ignore[attr-defined]
            if os.path.isfile(f"/proc/self/fd/{fd}") and os.lseek(fd, 0, os.SEEK_CUR) >= 0:
                self.fd = fd
        except (AttributeError, OSError, ValueError):
            pass

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.write(data)  # type: ignore[attr-defined]

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                entry = Entry(name=d.encode(), kind="dir", mode=0o755, uid=0, gid=0)
                self._write(encode_header(entry, ARCHIVE_OWNER, self.mtime))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._parents(name)
        entry = Entry(name=name.encode(), kind="file", mode=0o644, uid=0, gid=0, size=len(data))
        self._write(encode_header(entry, ARCHIVE_OWNER, self.mtime) + data + b"\0" * (-len(data) % BLOCK))

    def add_blob(self, name: str, blob: Blob) -> None:
        if blob.path is None:
            raise BuildError(f"internal: blob {blob.digest} was not kept on disk")
        self._parents(name)
        entry = Entry(name=name.encode(), kind="file", mode=0o644, uid=0, gid=0, size=blob.size)
        self._write(encode_header(entry, ARCHIVE_OWNER, self.mtime))
        with open(blob.path, "rb") as f:
            remaining = blob.size
            if self.fd is not None:
                self.out.flush()  # type: ignore[attr-defined]
                remaining = _kernel_copy(f.fileno(), self.fd, remaining)
            while remaining:
                chunk = f.read(min(COPY_CHUNK, remaining))
                if not chunk:
                    raise BuildError(f"{blob.path}: blob shorter than recorded ({blob.size} bytes)")
                self._write(chunk)
                remaining -= len(chunk)
        self._write(b"\0" * (-blob.size % BLOCK))

    def close(self) -> None:
        self._write(b"\0" * (2 * BLOCK))


def _kernel_copy(src: int, dst: int, size: int) -> int:
    """copy_file_range (reflink or in-kernel copy); returns what is left to copy the slow way."""
    try:
        while size:
            n = os.copy_file_range(src, dst, min(size, 1 << 30))
            if n == 0:
                break
            size -= n
    except OSError:
        pass
    return size


def docker_archive_members(image: Image, repo_tag: str | None) -> tuple[list[tuple[str, Blob]], dict]:
    layer_names: list[str] = []
    members: list[tuple[str, Blob]] = []
    seen: set[str] = set()
    for layer in image.layers:
        name = layer.diff_id.split(":", 1)[1] + "/layer.tar"
        layer_names.append(name)
        if name not in seen:
            seen.add(name)
            members.append((name, layer.tar))
    config_name = image.config_digest.split(":", 1)[1] + ".json"
    manifest = [{"Config": config_name, "RepoTags": [repo_tag] if repo_tag else [], "Layers": layer_names}]
    return members, {"config": config_name, "manifest": manifest}


def write_docker_archive(image: Image, out: BinaryIO, *, compressor: str, mtime: int,
                         repo_tag: str | None = None) -> None:
    """docker-archive as `docker save` and dockerTools write it; the whole stream optionally compressed."""
    repo_tag = check_repo_tag(repo_tag or image.reference)
    sink: object = out
    comp = None
    if compressor != "none":
        comp = Compressor(compressor, out)
        sink = comp
    tar = _TarStream(sink, mtime)
    members, meta = docker_archive_members(image, repo_tag)
    for name, blob in members:
        tar.add_blob(name, blob)
    tar.add_bytes(meta["config"], image.config)
    tar.add_bytes("manifest.json", canonical_json(meta["manifest"]))
    repo, _, tag = repo_tag.rpartition(":")
    top = image.layers[-1].diff_id.split(":", 1)[1] if image.layers else ""
    tar.add_bytes("repositories", canonical_json({repo: {tag: top}}))
    tar.close()
    if comp is not None:
        comp.close()


def _oci_blobs(image: Image) -> list[tuple[str, Blob | bytes]]:
    blobs: list[tuple[str, Blob | bytes]] = []
    seen: set[str] = set()
    for layer in image.layers:
        if layer.digest not in seen:
            seen.add(layer.digest)
            blobs.append((layer.digest, layer.compressed))
    blobs.append((image.config_digest, image.config))
    blobs.append((image.manifest_digest, image.manifest))
    return blobs


# org.opencontainers.image.ref.name grammar (image-spec annotations.md).
_REF_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
REF_NAME_RE = re.compile(rf"^{_REF_COMPONENT}(?:/{_REF_COMPONENT})*$")


def check_ref_name(tag: str) -> str:
    """An OCI layout's ref.name, before anything is written: readers reject or mangle other names."""
    if not REF_NAME_RE.match(tag):
        raise UsageError(f"{tag!r} is not a valid OCI reference name (letters, digits and separators "
                         "-._:@+ between them, '/' between components)")
    return tag


def check_repo_tag(repo_tag: str) -> str:
    """NAME:TAG for a docker-archive's RepoTags, as docker/podman load accept it."""
    from nsbuild.spec import NAME_RE, TAG_RE

    name, sep, tag = repo_tag.rpartition(":")
    if not sep or "/" in tag:
        raise UsageError(f"{repo_tag!r}: expected NAME:TAG")
    first, slash, rest = name.partition("/")
    path = rest if slash and ("." in first or ":" in first or first == "localhost") else name
    if not NAME_RE.match(name) or path != path.lower():
        raise UsageError(f"{name!r} is not a valid repository name (lower-case letters, digits, '.', '_', "
                         "'-', '/', optionally after a registry host)")
    if not TAG_RE.match(tag):
        raise UsageError(f"{tag!r} is not a valid tag (up to 128 of letters, digits, '_', '.', '-', "
                         "not starting with '.' or '-')")
    return repo_tag


def _index(image: Image, tag: str, existing: list[dict] | None = None) -> bytes:
    manifests = [m for m in existing or [] if m.get("annotations", {}).get(REF_NAME) != tag]
    manifests.append({"mediaType": MEDIA_OCI_MANIFEST, "digest": image.manifest_digest,
                      "size": len(image.manifest), "annotations": {REF_NAME: tag}})
    return canonical_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": manifests})


OCI_LAYOUT = canonical_json({"imageLayoutVersion": "1.0.0"})


def write_oci_archive(image: Image, out: BinaryIO, *, tag: str, mtime: int) -> None:
    check_ref_name(tag)
    tar = _TarStream(out, mtime)
    tar.add_bytes("oci-layout", OCI_LAYOUT)
    tar.add_bytes("index.json", _index(image, tag))
    for digest, blob in _oci_blobs(image):
        name = "blobs/sha256/" + digest.split(":", 1)[1]
        if isinstance(blob, bytes):
            tar.add_bytes(name, blob)
        else:
            tar.add_blob(name, blob)
    tar.close()


def check_destination(fmt: str, path: Path, *, name: str | None = None, tag: str | None = None) -> None:
    """Refuse an output that cannot be written, before any layer is built (and again when writing)."""
    if name and tag:
        check_repo_tag(f"{name}:{tag}")
    elif tag and fmt != "docker-archive":
        check_ref_name(tag)
    if fmt == "oci-dir":
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise UsageError(f"{path}: exists and is not a directory (an OCI layout is a directory)")
            if not (path / "oci-layout").exists() and any(path.iterdir()):
                raise UsageError(f"{path}: a non-empty directory that is not an OCI layout (no oci-layout "
                                 "file); refusing to write into it")
        return
    path = path.absolute()
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; name the archive file to write (e.g. {path}/image.tar)")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: output directory does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{path.parent}: cannot write here (permission denied)")


def write_oci_dir(image: Image, dest: Path, *, tag: str) -> None:
    """Add the image to an OCI layout (created if missing), replacing an image with the same tag."""
    check_ref_name(tag)
    check_destination("oci-dir", dest)
    created = not dest.exists()
    try:
        blob_dir = dest / "blobs" / "sha256"
        blob_dir.mkdir(parents=True, exist_ok=True)
        layout = dest / "oci-layout"
        if not layout.exists():
            _atomic_bytes(layout, OCI_LAYOUT)
        for digest, blob in _oci_blobs(image):
            final = blob_dir / digest.split(":", 1)[1]
            size = len(blob) if isinstance(blob, bytes) else blob.size
            if final.exists() and final.stat().st_size == size:
                continue
            if isinstance(blob, bytes):
                _atomic_bytes(final, blob)
            else:
                _link_or_copy(blob, final)
        existing: list[dict] = []
        index_path = dest / "index.json"
        if index_path.exists():
            try:
                existing = json.loads(index_path.read_bytes()).get("manifests", [])
            except (json.JSONDecodeError, AttributeError):
                raise BuildError(f"{index_path}: exists but is not a valid OCI index") from None
        _atomic_bytes(index_path, _index(image, tag, existing))
    except BaseException as exc:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        if isinstance(exc, OSError):
            raise BuildError(f"{dest}: cannot write the OCI layout: {exc.strerror or exc}") from None
        raise


def _link_or_copy(blob: Blob, final: Path) -> None:
    assert blob.path is not None
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(blob.path, tmp)
    except OSError:
        shutil.copyfile(blob.path, tmp)
    os.replace(tmp, final)


def _atomic_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path`, renamed over it only when the block finishes without error."""
    path = path.absolute()
    check_destination("archive", path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileNotFoundError:
        raise BuildError(f"{path.parent}: output directory does not exist") from None
    except PermissionError:
        raise BuildError(f"{path.parent}: cannot write here (permission denied)") from None
    try:
        with os.fdopen(fd, "wb", buffering=COPY_CHUNK) as f:
            yield f
            f.flush()
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise BuildError(f"{path}: cannot write: {exc.strerror or exc}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
