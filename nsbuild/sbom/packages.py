"""The packages an image holds, each with the layer that holds it.

Layers are read in order with OCI layer semantics: a file in a later layer replaces an earlier one,
a whiteout (`.wh.NAME`) removes NAME and everything under it from the layers below, an opaque
whiteout (`.wh..wh..opq`) everything below in its directory. What is read: the package databases of
dpkg (`var/lib/dpkg/status`, and distroless' `var/lib/dpkg/status.d/*`), apk
(`lib/apk/db/installed`, apk-tools 3: `usr/lib/apk/db/installed`), Python distributions
(`*.dist-info/METADATA`, `*.egg-info/PKG-INFO`), the entries of the Nix store directory and, when
present, the Nix database includeNixDB writes (`nix/var/nix/db/db.sqlite`), for NAR hashes and references.

Each layer is decompressed into a temporary file and walked by nsbuild.tar.tarscan (the strict
reader base images are checked with), so a malformed layer is refused, never half-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from email.parser import HeaderParser
from pathlib import Path
from typing import Any, BinaryIO

from nsbuild.core.compress import open_decompressed
from nsbuild.errors import BuildError
from nsbuild.sbom.nix import PathInfo, parse_drv_name, path_infos, read_nix_db, split_store_name
from nsbuild.sbom.purl import purl
from nsbuild.tar.tarscan import Member, TarFormatError, iter_members

DPKG_STATUS = "var/lib/dpkg/status"
DPKG_STATUS_D = "var/lib/dpkg/status.d/"  # distroless: one paragraph per file, no dpkg itself
APK_INSTALLED = ("lib/apk/db/installed", "usr/lib/apk/db/installed")
PYTHON_METADATA = (".dist-info/METADATA", ".egg-info/PKG-INFO")
NIX_DB = "nix/var/nix/db/db.sqlite"  # nsbuild.rootfs.nixdb.STATE_DIR, whatever the storeDir
_SEPARATORS = re.compile(r"[-_.]+")
MAX_RECORD = 256 << 20  # a package database larger than this is not one
MAX_RECORDS = 1 << 30  # all of them together: an image from elsewhere may be made to exhaust memory
DEFAULT_STORE_DIR = "/nix/store"


@dataclass(frozen=True)
class LayerBlob:
    """One layer of the image: its manifest digest and the blob (plain, gzip or zstd) on disk."""

    digest: str
    path: Path


@dataclass(frozen=True)
class Package:
    """One package the image holds. `kind`: deb, apk, pypi or nix; `path`: where its record is (the
    database file, the METADATA file, or the store path itself); `layer`: the digest of the layer that
    holds that record; for nix, `nar_hash` (hex, "" when unknown) and `references` (store paths)."""

    kind: str
    name: str
    version: str
    purl: str
    path: str
    layer: str
    arch: str = ""
    nar_hash: str = ""
    references: tuple[str, ...] = ()

    @property
    def sort_key(self) -> tuple[str, ...]:
        return (self.kind, self.name, self.version, self.arch, self.path, self.layer)


@dataclass
class _Scan:
    """The merged view while layers are read: record files and store entries, by image path."""

    store_prefix: str
    records: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # path → (layer index, bytes)
    store: dict[str, int] = field(default_factory=dict)  # store entry name → layer index
    # Every directory a record was ever under: most entries of a layer are no such directory, and
    # only those need the walk over the records (an entry in the set that no longer is one is harmless).
    record_dirs: set[str] = field(default_factory=set)
    read_total: int = 0

    def add_record(self, path: str, index: int, data: bytes) -> None:
        self.records[path] = (index, data)
        self.read_total += len(data)
        if self.read_total > MAX_RECORDS:
            raise BuildError(f"the package databases of the image hold more than {MAX_RECORDS >> 20} MiB")
        parent = posixpath.dirname(path)
        while parent and parent not in self.record_dirs:
            self.record_dirs.add(parent)
            parent = posixpath.dirname(parent)

    def whiteout(self, path: str) -> None:
        """Remove `path` and everything under it (from the layers below the current one)."""
        self.records.pop(path, None)
        if path in self.record_dirs or not path:
            under = path + "/" if path else ""
            for key in [k for k in self.records if k.startswith(under)]:
                del self.records[key]
        under = path + "/"
        if path == self.store_prefix.rstrip("/") or self.store_prefix.startswith(under):
            self.store.clear()
        elif path.startswith(self.store_prefix):
            self.store.pop(path[len(self.store_prefix) :].split("/", 1)[0], None)

    def opaque(self, directory: str) -> None:
        """An opaque directory: what the layers below put under it is gone (the directory stays)."""
        under = directory + "/" if directory else ""
        for key in [k for k in self.records if k.startswith(under)]:
            del self.records[key]
        if self.store_prefix.startswith(under) or under == self.store_prefix:
            self.store.clear()
        elif under.startswith(self.store_prefix):
            # inside one entry: that entry is this layer's now (its own members add it back)
            self.store.pop(under[len(self.store_prefix) :].split("/", 1)[0], None)


def is_record(path: str) -> bool:
    if path in (DPKG_STATUS, NIX_DB) or path in APK_INSTALLED:
        return True
    if path.startswith(DPKG_STATUS_D):
        return "/" not in path[len(DPKG_STATUS_D) :] and not path.endswith(".md5sums")
    return path.endswith(PYTHON_METADATA) and path.count("/") >= 1


def _norm(name: str) -> str:
    path = posixpath.normpath("/" + name).lstrip("/")
    return "" if path == "." else path


def _plain_tar(blob: Path, work: Path) -> Path:
    """The layer as an uncompressed tar file (the blob itself when it is one)."""
    with open(blob, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"\x1f\x8b" and magic != b"\x28\xb5\x2f\xfd":
        return blob
    fd, name = tempfile.mkstemp(prefix="layer-", suffix=".tar", dir=work)
    try:
        with os.fdopen(fd, "wb") as out, open_decompressed(blob) as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except (OSError, EOFError) as exc:
        raise BuildError(f"layer {blob}: cannot decompress: {exc}") from None
    return Path(name)


def _read_member(f: BinaryIO, member: Member) -> bytes:
    if member.size > MAX_RECORD:
        raise BuildError(f"{member.name}: {member.size} bytes, too large for a package database")
    f.seek(member.data_offset)
    return f.read(member.size)


def _scan_layer(scan: _Scan, index: int, tar: Path) -> None:
    with open(tar, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        members = list(_members(f, total, tar))
        for member in members:
            path = _norm(member.name)
            directory, base = posixpath.split(path)
            if base == ".wh..wh..opq":
                scan.opaque(directory)
            elif base.startswith(".wh."):
                scan.whiteout(posixpath.join(directory, base[4:]))
        regular: dict[str, Member] = {}  # this layer's files, for hard links to them
        for member in members:
            path = _norm(member.name)
            base = posixpath.basename(path)
            if base.startswith(".wh.") or not path:
                continue
            if not member.isdir():
                scan.whiteout(path)  # a later layer's entry replaces what was there, whatever it was
            if member.isreg():
                regular[path] = member
            target = regular.get(_norm(member.linkname)) if member.islnk() else member
            if is_record(path) and target is not None and target.isreg():
                scan.add_record(path, index, _read_member(f, target))
            if path.startswith(scan.store_prefix) and len(path) > len(scan.store_prefix):
                scan.store[path[len(scan.store_prefix) :].split("/", 1)[0]] = index


def _members(f: BinaryIO, total: int, tar: Path) -> Iterator[Member]:
    try:
        yield from iter_members(f, total)
    except TarFormatError as exc:
        raise BuildError(f"layer {tar}: not a sound tar archive: {exc}") from None


# --- package databases ---------------------------------------------------------------------------


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    """deb822 paragraphs (dpkg status): `Field: value`, continuation lines start with a blank."""
    fields: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif line[0] in " \t":
            if last:
                fields[last] += "\n" + line.strip()
        else:
            key, _, value = line.partition(":")
            last = key.strip()
            fields[last] = value.strip()
    if fields:
        yield fields


def dpkg_packages(data: bytes, layer: str, path: str = DPKG_STATUS) -> list[Package]:
    """The packages dpkg has unpacked (`dpkg-query -W` lists them): not those removed with their
    configuration files kept, nor those it only knows of."""
    out = []
    for st in _stanzas(data.decode("utf-8", "replace")):
        # distroless writes status.d without dpkg: a paragraph there without Status is installed
        default = "" if path == DPKG_STATUS else "install ok installed"
        state = st.get("Status", default).split()
        if "Package" not in st or len(state) != 3 or state[2] in ("not-installed", "config-files"):
            continue
        arch = st.get("Architecture", "")
        name, version = st["Package"], st.get("Version", "")
        qualifiers = {"arch": arch} if arch else {}
        out.append(Package("deb", name, version, purl("deb", "debian", name, version, qualifiers), path, layer, arch))
    return out


def apk_packages(data: bytes, layer: str, path: str = APK_INSTALLED[0]) -> list[Package]:
    """apk's installed database: `K:value` lines, a blank line between packages."""
    out = []
    for block in data.decode("utf-8", "replace").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if len(line) > 1 and line[1] == ":":
                fields.setdefault(line[0], line[2:])
        if "P" not in fields:
            continue
        name, version, arch = fields["P"], fields.get("V", ""), fields.get("A", "")
        qualifiers = {"arch": arch} if arch else {}
        out.append(Package("apk", name, version, purl("apk", "alpine", name, version, qualifiers), path, layer, arch))
    return out


def python_package(data: bytes, path: str, layer: str) -> Package | None:
    """A distribution's METADATA (core metadata, email-header form): Name and Version."""
    headers = HeaderParser().parsestr(data.decode("utf-8", "replace"), headersonly=True)
    name, version = headers.get("Name"), headers.get("Version")
    if not name:
        return None
    name, version = str(name).strip(), str(version or "").strip()
    return Package("pypi", name, version, purl("pypi", "", pypi_name(name), version), path, layer)


def pypi_name(name: str) -> str:
    """The purl name of a PyPI project: normalised as PEP 503 does (lower case, runs of -_. as one -)."""
    return _SEPARATORS.sub("-", name).lower()


def nix_package(store_dir: str, entry: str, layer: str, info: PathInfo | None) -> Package:
    _, full_name = split_store_name(entry)
    name, version = parse_drv_name(full_name)
    if not name:  # `<hash>-1.0`: Nix's split leaves no name; the documents need one
        name, version = full_name, ""
    path = f"{store_dir.rstrip('/')}/{entry}"
    return Package(
        "nix",
        name,
        version,
        purl("nix", "", name, version),
        path,
        layer,
        nar_hash=info.nar_hash if info else "",
        references=info.references if info else (),
    )


# --- the image -----------------------------------------------------------------------------------


def scan_layers(
    layers: Iterable[LayerBlob],
    *,
    store_dir: str = DEFAULT_STORE_DIR,
    nix_info: Mapping[str, Mapping[str, Any]] | None = None,
    work_dir: Path | None = None,
) -> list[Package]:
    """Every package of the image whose layers are `layers` (base first), sorted. Store paths get
    their NAR hash and references from `nix_info` ({store path: {"narHash", "references"}}), else
    from the Nix database in the image, else none."""
    layer_list = list(layers)
    scan = _Scan(store_prefix=_norm(store_dir) + "/")
    with tempfile.TemporaryDirectory(prefix="nsbuild-sbom-", dir=work_dir) as tmp:
        for index, layer in enumerate(layer_list):
            tar = _plain_tar(layer.path, Path(tmp))
            try:
                _scan_layer(scan, index, tar)
            finally:
                if tar != layer.path:
                    tar.unlink()
        infos = _infos(scan, Path(tmp), store_dir, nix_info)
    return _packages(scan, [lay.digest for lay in layer_list], store_dir, infos)


def _infos(
    scan: _Scan, tmp: Path, store_dir: str, nix_info: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, PathInfo]:
    if nix_info is not None:
        try:
            return path_infos(nix_info, store_dir)
        except (ValueError, TypeError, AttributeError) as exc:
            raise BuildError(f"store path information: {exc}") from None
    if NIX_DB not in scan.records:
        return {}
    db = tmp / "db.sqlite"
    db.write_bytes(scan.records[NIX_DB][1])
    try:
        return read_nix_db(db)
    except Exception as exc:  # sqlite3.Error and friends: the image's database is unreadable
        raise BuildError(f"/{NIX_DB} in the image cannot be read: {exc}") from None


def _packages(scan: _Scan, digests: list[str], store_dir: str, infos: dict[str, PathInfo]) -> list[Package]:
    out: list[Package] = []
    for path, (index, data) in sorted(scan.records.items()):
        layer = digests[index]
        if path == DPKG_STATUS or path.startswith(DPKG_STATUS_D):
            out += dpkg_packages(data, layer, path)
        elif path in APK_INSTALLED:
            out += apk_packages(data, layer, path)
        elif path.endswith(PYTHON_METADATA):
            pkg = python_package(data, "/" + path, layer)
            if pkg is not None:
                out.append(pkg)
    prefix = store_dir.rstrip("/")
    for entry, index in sorted(scan.store.items()):
        if entry.endswith(".drv") or entry.startswith("."):
            continue  # derivations and Nix's own files (.links) are not packages of the image
        out.append(nix_package(store_dir, entry, digests[index], infos.get(f"{prefix}/{entry}")))
    out = [replace(p, path="/" + p.path.lstrip("/")) for p in out]
    return sorted(set(out), key=lambda p: p.sort_key)


# --- what decides a scan (for remembering it, nsbuild.cache.scans) -----------------------------------


def scan_identity(digests: Sequence[str], store_dir: str, nix_info: Mapping[str, Mapping[str, Any]] | None) -> str:
    """A digest of everything scan_layers' result depends on: the layers by their blob digests (a blob is
    hashed again before it is scanned, so a digest names exactly the bytes read), the store directory,
    the store path information given, and the scanner itself."""
    text = json.dumps([_scanner_digest(), list(digests), store_dir, nix_info], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_SCANNER: list[str] = []


def _scanner_digest() -> str:
    """The source text of the modules that read layers and records: a changed parser (even in a
    development tree, where the version stays) is never served results of the old one."""
    if not _SCANNER:
        h = hashlib.sha256()
        for func in (scan_layers, parse_drv_name, purl, iter_members):
            try:
                with open(str(sys.modules[func.__module__].__file__), "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
            except (OSError, TypeError):
                h.update(b"?")  # no source (a frozen build): the identity still names the layers
        _SCANNER.append(h.hexdigest())
    return _SCANNER[0]


_FIELDS = tuple(f.name for f in fields(Package))


def packages_to_json(packages: Iterable[Package]) -> list[dict[str, Any]]:
    return [asdict(p) for p in packages]


def packages_from_json(data: Any, layers: Iterable[str]) -> tuple[Package, ...]:
    """Packages as packages_to_json wrote them, checked: every field of its type, every layer one of
    `layers` (a result recorded for other layers is never taken for these), sorted as a scan sorts
    them; ValueError otherwise."""
    known = set(layers)
    if not isinstance(data, list):
        raise ValueError("not a list of packages")
    out = []
    for item in data:
        if not isinstance(item, dict) or tuple(sorted(item)) != tuple(sorted(_FIELDS)):
            raise ValueError("not a package record")
        refs = item["references"]
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise ValueError("references: not a list of strings")
        if not all(isinstance(item[k], str) for k in _FIELDS if k != "references"):
            raise ValueError("a package field is not a string")
        if item["layer"] not in known:
            raise ValueError(f"package {item['name']!r}: layer {item['layer']} is not one of the image's")
        out.append(Package(**{**item, "references": tuple(refs)}))
    if [p.sort_key for p in out] != sorted(p.sort_key for p in out) or len(set(out)) != len(out):
        raise ValueError("packages out of order or repeated")
    return tuple(out)
