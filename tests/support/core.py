"""Helpers for the core tests (tests/test_core_*.py): specs, builds, fake stores, layer readers.

Nothing here imports nsbuild: images are read back with Python's tarfile, a raw header parser of our
own and the real tools in support.verifiers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .users import UserKey, describe, run_nsbuild
from .verifiers import image_layers, plain_archive

NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
DEFAULT_CREATED = "1970-01-01T00:00:01Z"
DEFAULT_EPOCH = 1
BUSYBOX = Path("/bin/busybox")
# The busybox the sandbox tests put into images as /bin/busybox (a string: it goes into specs as it is).
HOST_BUSYBOX = "/usr/bin/busybox" if os.path.exists("/usr/bin/busybox") else "/bin/busybox"
EXAMPLE_SPEC = Path(__file__).resolve().parents[2] / "fixtures" / "example" / "spec.json"
# Every build in these tests: no layer cache (a cache hit would make a reproducibility check vacuous
# and hide a broken writer), no progress noise.
BUILD_FLAGS = ("--no-cache", "-q")


def nix_hash(seed: str) -> str:
    """32 characters of Nix's base32 alphabet, derived from a seed (stable across runs)."""
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(NIX_BASE32[b % 32] for b in digest[:32])


class FakeStore:
    """A directory shaped like a Nix store: `<hash>-<name>` entries whose files mention each other.

    store = FakeStore(tmp / "store")
    lib = store.add("libfoo", {"lib/libfoo.so": b"\\x7fELF..."})
    app = store.add("app", {"bin/app": "#!/bin/sh\\n"}, refs=[lib])
    """

    def __init__(self, root: Path) -> None:
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)

    def path_of(self, name: str) -> Path:
        return self.dir / f"{nix_hash(name)}-{name}"

    def add(
        self,
        name: str,
        files: Mapping[str, bytes | str] | None = None,
        refs: Sequence[Path] = (),
        *,
        file_mode: int = 0o644,
    ) -> Path:
        """A store directory; the first file (or `nix-support/refs`) names every path in `refs`."""
        top = self.path_of(name)
        top.mkdir()
        files = dict(files or {"share/doc/README": f"{name}\n"})
        if refs:
            # References are found by scanning contents, so write the full paths into a file.
            key = "nix-support/propagated" if "nix-support/propagated" not in files else "nix-support/refs2"
            files[key] = "".join(f"{r}\n" for r in refs)
        for rel, data in files.items():
            p = top / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data.encode() if isinstance(data, str) else data)
            p.chmod(file_mode)
        return top

    def add_file(self, name: str, data: bytes | str, refs: Sequence[Path] = ()) -> Path:
        """A store path that is a single file (a script, say)."""
        top = self.path_of(name)
        body = data.encode() if isinstance(data, str) else data
        body += b"".join(f"\n# {r}".encode() for r in refs)
        top.write_bytes(body)
        top.chmod(0o755)
        return top

    def add_symlink(self, name: str, target: Path) -> Path:
        """A store path that is itself a symlink to another store path (absolute, as Nix makes them)."""
        top = self.path_of(name)
        top.symlink_to(target)
        return top


def require_busybox() -> None:
    if not os.path.exists(HOST_BUSYBOX):
        pytest.skip("busybox is not installed (busybox-static)")


def write_spec(directory: Path, spec: Mapping[str, Any], name: str = "spec.json") -> Path:
    path = Path(directory) / name
    path.write_text(json.dumps(spec, indent=2))
    path.chmod(0o644)
    return path


def build(
    spec: Path,
    output: str | os.PathLike[str],
    *extra: str,
    user: UserKey = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    umask: int | None = None,
    tz: str | None = None,
    check: bool = True,
    json_result: bool = False,
) -> subprocess.CompletedProcess:
    """`nsbuild layered SPEC -o OUTPUT --no-cache -q [EXTRA]`; fails the test unless it exits 0 when
    `check`. With json_result, `--json` is added and proc.result holds the parsed result."""
    args = ["layered", str(spec), "-o", os.fspath(output), *BUILD_FLAGS, *extra]
    if json_result:
        args.append("--json")
    proc = run_nsbuild(args, user, env=env, cwd=cwd, umask=umask, tz=tz)
    if check and proc.returncode != 0:
        raise AssertionError(describe(proc))
    if json_result and proc.returncode == 0:
        proc.result = json.loads(proc.stdout)  # type: ignore[attr-defined]
    return proc


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A layer tar made without nsbuild's writer: regular files (mode 0644, mtime 1) in name order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# --- reading images back --------------------------------------------------------------------------


@dataclass
class ImageView:
    """An image unpacked with GNU tar: its config and, per layer, the members (Python tarfile)."""

    config: dict[str, Any]
    layer_paths: list[Path]
    layers: list[list[tarfile.TarInfo]] = field(default_factory=list)
    plain_paths: list[Path] = field(default_factory=list)  # each layer as an uncompressed tar
    manifest: Any = None

    def names(self, i: int) -> list[str]:
        return [m.name for m in self.layers[i]]

    def find(self, name: str) -> list[tuple[int, tarfile.TarInfo]]:
        """(layer index, member) for every layer that holds `name` (no trailing slash)."""
        found = []
        for i, members in enumerate(self.layers):
            for m in members:
                if m.name.rstrip("/") == name.strip("/"):
                    found.append((i, m))
        return found

    def all_names(self) -> set[str]:
        return {m.name.rstrip("/") for members in self.layers for m in members}


def read_image(image: str | os.PathLike[str], work: str | os.PathLike[str], tag: str | None = None) -> ImageView:
    """Config and layer members of a docker-archive (any compression), OCI archive or OCI layout."""
    image, work = Path(image), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    layer_paths = image_layers(image, work / "outer", tag)
    root = image if image.is_dir() else work / "outer" / "image"
    if (root / "manifest.json").exists():
        manifest = json.loads((root / "manifest.json").read_text())
        config = json.loads((root / manifest[0]["Config"]).read_text())
    else:
        index = json.loads((root / "index.json").read_text())
        descs = index["manifests"]
        if tag is not None:
            descs = [d for d in descs if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
        manifest = json.loads((root / "blobs" / "sha256" / descs[0]["digest"].split(":")[1]).read_text())
        config = json.loads((root / "blobs" / "sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    view = ImageView(config, layer_paths, manifest=manifest)
    for i, p in enumerate(layer_paths):
        d = work / f"plain-{i}"
        d.mkdir(exist_ok=True)
        view.plain_paths.append(plain_archive(p, d))  # gzip/zstd decompressed by the real tools
        with tarfile.open(view.plain_paths[-1], "r:") as tar:
            view.layers.append(tar.getmembers())
    return view


@dataclass
class RawMember:
    """One member as its bytes say: ustar fields and the PAX records that preceded it."""

    name: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: bytes
    uname: bytes
    gname: bytes
    pax: dict[bytes, bytes]
    offset: int  # of the ustar header


def _num(field_bytes: bytes) -> int:
    if field_bytes[:1] == b"\x80":  # GNU base-256
        return int.from_bytes(field_bytes[1:], "big")
    s = field_bytes.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _pax_records(body: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    i = 0
    while i < len(body) and body[i : i + 1] != b"\0":
        space = body.index(b" ", i)
        length = int(body[i:space])
        record = body[space + 1 : i + length - 1]  # without the trailing newline
        if body[i + length - 1 : i + length] != b"\n":
            raise AssertionError(f"malformed PAX record at {i}: {body[i : i + length]!r}")
        key, _, value = record.partition(b"=")
        out[key] = value
        i += length
    return out


def raw_members(path: str | os.PathLike[str], *, limit_bytes: int | None = None) -> Iterator[RawMember]:
    """Walk a plain tar's headers by hand (seeking over data): what a strict reader sees, including
    every PAX key, so "no atime/ctime records" is checked on the bytes, not on tarfile's view."""
    with open(path, "rb") as f:
        pax: dict[bytes, bytes] = {}
        zeros = 0
        while True:
            offset = f.tell()
            block = f.read(512)
            if len(block) < 512:
                raise AssertionError(f"{path}: truncated at {offset} (no end-of-archive blocks)")
            if block == b"\0" * 512:
                zeros += 1
                if zeros == 2:
                    return
                continue
            if zeros:
                raise AssertionError(f"{path}: a lone zero block before {offset}")
            chk = _num(block[148:156])
            if chk != sum(block[:148]) + 8 * 32 + sum(block[156:]):
                raise AssertionError(f"{path}: bad header checksum at {offset}")
            typeflag = block[156:157]
            size = _num(block[124:136])
            if typeflag == b"x":
                body = f.read(size)
                f.seek(-size % 512, 1)
                pax = _pax_records(body)
                continue
            if typeflag in (b"g", b"L", b"K"):
                raise AssertionError(f"{path}: unexpected header type {typeflag!r} at {offset}")
            name = block[:100].split(b"\0", 1)[0]
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
            if b"size" in pax:
                size = int(pax[b"size"])
            member = RawMember(
                name=pax.get(b"path", name),
                typeflag=typeflag,
                mode=_num(block[100:108]),
                uid=int(pax[b"uid"]) if b"uid" in pax else _num(block[108:116]),
                gid=int(pax[b"gid"]) if b"gid" in pax else _num(block[116:124]),
                size=size,
                mtime=_num(block[136:148]),
                linkname=pax.get(b"linkpath", block[157:257].split(b"\0", 1)[0]),
                uname=pax.get(b"uname", block[265:297].split(b"\0", 1)[0]),
                gname=pax.get(b"gname", block[297:329].split(b"\0", 1)[0]),
                pax=pax,
                offset=offset,
            )
            yield member
            pax = {}
            if typeflag in (b"0", b"\0", b"7"):
                f.seek(size + (-size % 512), 1)
            if limit_bytes is not None and f.tell() > limit_bytes:
                return
