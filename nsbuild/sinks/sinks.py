"""Sinks: write a finished Image as a docker-archive, an OCI layout directory or an OCI archive.

Sinks never read the source trees: they consume layer values and their blobs.  File outputs are
atomic: a temporary file beside the destination, renamed at the end, removed on any failure.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO, Protocol

from nsbuild.core.refs import split_registry_host
from nsbuild.errors import BuildError, UsageError
from nsbuild.image.image import Image, sha256_digest
from nsbuild.layer.layer import Blob
from nsbuild.sandbox.sweep import locked_temp_file, sweep_temp_files
from nsbuild.sinks.archive import (
    OCI_LAYOUT,
    REF_NAME,
    ImageArchive,
    Referrer,
    oci_index,
    stale_referrers,
)
from nsbuild.spec.spec import NAME_RE, TAG_RE

__all__ = [
    "REF_NAME",
    "ArchiveOutput",
    "AtomicFile",
    "Referrer",
    "atomic_output",
    "check_destination",
    "check_ref_name",
    "check_repo_tag",
    "write_docker_archive",
    "write_oci_dir",
]


def write_docker_archive(
    image: Image, out: BinaryIO, *, compressor: str, mtime: int, repo_tag: str | None = None
) -> None:
    """docker-archive as `docker save` and dockerTools write it; the whole stream optionally compressed
    (the layers then carry blobs of that compression: see nsbuild.sinks.archive)."""
    repo_tag = check_repo_tag(repo_tag or image.reference)
    archive = ImageArchive(out, kind="docker", envelope=compressor, mtime=mtime, positions=len(image.layers))
    archive.finish(image, repo_tag)


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
        raise UsageError(
            f"{tag!r} is not a valid OCI reference name (letters, digits and separators "
            "-._:@+ between them, '/' between components)"
        )
    return tag


def check_repo_tag(repo_tag: str) -> str:
    """NAME:TAG for a docker-archive's RepoTags, as docker/podman load accept it."""
    name, sep, tag = repo_tag.rpartition(":")
    if not sep or "/" in tag:
        raise UsageError(f"{repo_tag!r}: expected NAME:TAG")
    _, path = split_registry_host(name)
    if not NAME_RE.match(name) or path != path.lower():
        raise UsageError(
            f"{name!r} is not a valid repository name (lower-case letters, digits, '.', '_', "
            "'-', '/', optionally after a registry host)"
        )
    if not TAG_RE.match(tag):
        raise UsageError(
            f"{tag!r} is not a valid tag (up to 128 of letters, digits, '_', '.', '-', not starting with '.' or '-')"
        )
    return repo_tag


# A docker-archive's name says whether the file is compressed as a whole, as tar and gzip users read it.
ENVELOPE_BY_SUFFIX = {".tar.gz": "gz", ".tgz": "gz", ".tar.zst": "zstd", ".tar.zstd": "zstd", ".tzst": "zstd"}


def docker_envelope(path: Path) -> str:
    """The compression of a docker-archive file as a whole, from its name: any other name is a plain
    tar (whose layer files carry the spec's compressor)."""
    name = path.name.lower()
    return next((kind for suffix, kind in ENVELOPE_BY_SUFFIX.items() if name.endswith(suffix)), "none")


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
            # Another writer's temporary oci-layout, an instant before it is in place, does not count.
            if not (path / "oci-layout").exists() and any(
                not p.name.startswith(".oci-layout.") for p in path.iterdir()
            ):
                raise UsageError(
                    f"{path}: a non-empty directory that is not an OCI layout (no oci-layout "
                    "file); refusing to write into it"
                )
        return
    path = path.absolute()
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; name the archive file to write (e.g. {path}/image.tar)")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: output directory does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"{path.parent}: cannot write here (permission denied)")


def write_oci_dir(image: Image, dest: Path, *, tag: str, referrers: Sequence[Referrer] = ()) -> None:
    """Add the image to an OCI layout (created if missing), replacing an image with the same tag.

    Several builds may write into one layout at once (`make -j8`): each holds an exclusive flock on the
    layout directory itself (no extra file in the layout) while it adds its blobs and rewrites
    index.json from the index as it is then, so no tag is lost."""
    check_ref_name(tag)
    check_destination("oci-dir", dest)
    with _locked_layout(dest) as created:
        try:
            check_destination("oci-dir", dest)  # again, now that no other writer is in the middle
            _fill_oci_dir(image, dest, tag, referrers)
        except BaseException as exc:
            if created and not (dest / "index.json").exists():
                shutil.rmtree(dest, ignore_errors=True)  # nobody else finished an image in it yet
            if isinstance(exc, OSError):
                raise BuildError(f"{dest}: cannot write the OCI layout: {exc.strerror or exc}") from None
            raise


@contextmanager
def _locked_layout(dest: Path) -> Iterator[bool]:
    """The layout directory, created if missing and flocked; yields whether this call created it.
    A directory removed by a failed first writer while we waited is made again."""
    for _ in range(10):
        created = False
        try:
            dest.mkdir()
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise BuildError(f"{dest}: cannot write the OCI layout: {exc.strerror or exc}") from None
        try:
            fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BuildError(f"{dest}: cannot write the OCI layout: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with suppress(FileNotFoundError):
                if os.stat(dest).st_ino == os.fstat(fd).st_ino:
                    yield created
                    return
        finally:
            os.close(fd)
    raise BuildError(f"{dest}: the OCI layout keeps disappearing while it is written")


def _fill_oci_dir(image: Image, dest: Path, tag: str, referrers: Sequence[Referrer]) -> None:
    # oci-layout first: a layout directory is never seen with blobs and without it.
    layout = dest / "oci-layout"
    if not layout.exists():
        _atomic_bytes(layout, OCI_LAYOUT)
    blob_dir = dest / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    extra: list[tuple[str, Blob | bytes]] = [(sha256_digest(b), b) for r in referrers for b in r.blobs]
    for digest, blob in [*_oci_blobs(image), *extra]:
        final = blob_dir / digest.split(":", 1)[1]
        size = len(blob) if isinstance(blob, bytes) else blob.size
        if final.exists() and final.stat().st_size == size:
            continue
        if isinstance(blob, bytes):
            _atomic_bytes(final, blob)
        else:
            _link_or_copy(blob, final)
    existing = kept_manifests(dest, tag)
    _atomic_bytes(dest / "index.json", oci_index(image, tag, existing, referrers))


def kept_manifests(dest: Path, tag: str) -> list[dict]:
    """The entries of the layout's index.json that writing `tag` again keeps (other tags and their
    referrers); none for a new layout. A file that is no OCI index is refused, never overwritten."""
    index_path = dest / "index.json"
    if not index_path.exists():
        return []
    try:
        manifests = json.loads(index_path.read_bytes()).get("manifests", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        manifests = None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise BuildError(f"{index_path}: exists but is not a valid OCI index")
    blob_dir = dest / "blobs" / "sha256"
    return stale_referrers(manifests, tag, lambda m: _subject(blob_dir, m))


def _subject(blob_dir: Path, desc: dict) -> str | None:
    """The subject digest of the manifest an index entry names (a referrer's), None if it has none."""
    digest = desc.get("digest")
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        return None
    try:
        manifest = json.loads((blob_dir / digest.split(":", 1)[1]).read_bytes())
    except (OSError, ValueError):
        return None
    subject = manifest.get("subject") if isinstance(manifest, dict) else None
    return subject.get("digest") if isinstance(subject, dict) else None


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


class Stamps(Protocol):
    """What is known of the files written before (nsbuild.cache.outputs, which owns the cache directory):
    whether `path` still holds the archive `identity`, and the record of a file written or touched."""

    def holds(self, path: Path, identity: str) -> bool: ...

    def record(self, path: Path, identity: str) -> None: ...

    def forget(self, path: Path) -> None: ...


class AtomicFile:
    """A temporary file beside `path`, unbuffered; commit() renames it over `path`, anything else removes it."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        check_destination("archive", self.path)
        prefix = f".{self.path.name}."
        # Temporary files of builds of this output that were killed outright (nsbuild.sandbox.sweep).
        sweep_temp_files(self.path.parent, prefix, ".tmp")
        try:
            fd, self.tmp, self._lock = locked_temp_file(self.path.parent, prefix, ".tmp")
        except FileNotFoundError:
            raise BuildError(f"{self.path.parent}: output directory does not exist") from None
        except PermissionError:
            raise BuildError(f"{self.path.parent}: cannot write here (permission denied)") from None
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=0)
        self.ended = False

    def commit(self) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_umask())
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise BuildError(f"{self.path}: cannot write: {exc.strerror or exc}") from None
        self._unlock()

    def discard(self) -> None:
        self.ended = True
        with suppress(OSError):
            self.file.close()
        with suppress(OSError):
            os.unlink(self.tmp)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock >= 0:
            with suppress(OSError):
                os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise BuildError(f"{self.path}: cannot write: {exc.strerror or exc}") from None


class ArchiveOutput:
    """An archive output file: written while the layers are built, in place when finished, or left
    alone when it already holds exactly these bytes (`stamps`: the cache's record of what it wrote)."""

    def __init__(
        self, path: Path, *, kind: str, envelope: str, mtime: int, positions: int, stamps: Stamps | None
    ) -> None:
        self.file = AtomicFile(path)
        self.archive = ImageArchive(
            self.file.file, kind=kind, envelope=envelope, mtime=mtime, positions=positions, name=str(self.file.path)
        )
        self.stamps = stamps

    def finish(self, image: Image, ref: str, referrers: Sequence[Referrer] = ()) -> bool:
        """Complete the archive and put it in place; False: the file already held it (left as it is)."""
        path = self.file.path
        identity = self.archive.identity(image, ref, referrers) if self.stamps is not None else ""
        if self.stamps is not None and self.archive.untouched and self.stamps.holds(path, identity):
            self.file.discard()
            # Up to date, as make must see it too: newer than the inputs that made it rebuild us.
            with suppress(OSError):
                os.utime(path)
                self.stamps.record(path, identity)
            return False
        self.archive.finish(image, ref, referrers)  # write errors name the file (ArchiveStream); the caller discards
        if self.stamps is not None:
            self.stamps.forget(path)
        self.file.commit()
        if self.stamps is not None:
            self.stamps.record(path, identity)
        return True


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path`, renamed over it only when the block finishes without error."""
    with AtomicFile(path) as out:
        yield out.file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
