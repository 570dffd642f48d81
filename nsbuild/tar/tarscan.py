"""A strict reader of tar headers, for archives from elsewhere (base images and their layers).

Python's tarfile is lenient where a hostile archive can exploit it: a negative size (base-256, or an
octal field with a sign) sends it backwards into an endless loop, a field it cannot parse silently ends
the archive early (so the model of a layer and a container runtime disagree about what is in it), and
it keeps every header in memory.  This reader walks the headers front to back, once, in constant
memory per entry, and refuses anything that is not an unambiguous tar: a bad checksum, a number that
is not octal or positive base-256, a size beyond the end of the file, data on an entry type that has
none, an unknown entry type, chained or conflicting extended headers, a NUL in a name, a non-zero
block after the end-of-archive marker, a missing marker.

For an archive it accepts, the names, types, sizes and link targets it reports are the ones tarfile
reports for the same bytes (the sandbox unpacks with tarfile once a layer has been checked; a test
mutates archives at random and compares the two), so what was checked is what gets unpacked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_EXTENDED = 1 << 20  # a PAX or GNU long-name header larger than this is not a name
REGULAR = (b"0", b"\0", b"7")
HEADER_ONLY = (b"1", b"2", b"3", b"4", b"5", b"6")
EXTENDED = (b"x", b"g", b"L", b"K")
OCTAL = re.compile(rb"[0-7]*")
DECIMAL = re.compile(r"[0-9]{1,19}")
# PAX keys that change what an entry is; a global header may not set them (tarfile and Go disagree on
# whether they apply), and GNU sparse files are not layer content.
PAX_ENTRY_KEYS = ("path", "linkpath", "size", "uid", "gid")


class TarFormatError(ValueError):
    """The archive is not a tar this reader accepts; the message says where and why."""


@dataclass(slots=True)
class Member:
    name: str
    type: bytes
    size: int
    offset: int  # of the first header belonging to the entry (extended headers included)
    data_offset: int
    linkname: str
    mode: int
    uid: int
    gid: int
    devmajor: int
    devminor: int
    pax: dict[str, str] | None
    # The ustar values (PAX may override them: nsbuild.tar.tarinput reads those records itself).
    mtime: int = 0
    uname: str = ""
    gname: str = ""

    def isreg(self) -> bool:
        return self.type in REGULAR

    def isdir(self) -> bool:
        return self.type == b"5"

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"

    def ischr(self) -> bool:
        return self.type == b"3"

    def isblk(self) -> bool:
        return self.type == b"4"

    def isfifo(self) -> bool:
        return self.type == b"6"


def _nts(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


_NUMBERS: dict[bytes, int] = {}  # field bytes → value: most headers repeat their modes, ids and times


def _number(field: bytes, what: str, *, signed: bool = False) -> int:
    """An octal field (spaces/NULs around it) or GNU base-256 (0x80 positive, 0xff negative)."""
    known = _NUMBERS.get(field)
    if known is not None:
        return known
    value = _parse_number(field, what, signed)
    if value >= 0 and len(_NUMBERS) < 65536:
        _NUMBERS[field] = value
    return value


def _parse_number(field: bytes, what: str, signed: bool) -> int:
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        if not signed:
            raise TarFormatError(f"negative {what} (base-256)")
        return int.from_bytes(field[1:], "big") - 256 ** (len(field) - 1)
    text = _nts(field).strip(b" \t\n\v\f\r")
    if not OCTAL.fullmatch(text):
        raise TarFormatError(f"{what} field {bytes(field)!r} is not an octal number")
    return int(text or b"0", 8)


def _numbers(block: bytes) -> None:
    """The numeric fields nsbuild does not use; tarfile parses (and stops at) them all."""
    for lo, hi, what in (
        (100, 108, "mode"),
        (108, 116, "uid"),
        (116, 124, "gid"),
        (329, 337, "device major"),
        (337, 345, "device minor"),
    ):
        _number(block[lo:hi], what)
    _number(block[136:148], "mtime", signed=True)


def _check_checksum(block: bytes) -> None:
    stored = _number(block[148:156], "checksum")
    unsigned = 256 + sum(block) - sum(block[148:156])
    if stored == unsigned:
        return
    # Some old tars summed signed chars: accept that too, as tarfile and GNU tar do.
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b >= 128)
    if stored != signed:
        raise TarFormatError(f"bad header checksum (stored {stored}, computed {unsigned})")


def _decode(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise TarFormatError(f"NUL byte in {what}")
    return raw.decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """`LEN KEY=VALUE\\n` records; NUL padding may follow the last one. hdrcharset=BINARY (nsbuild writes
    it for names that are not UTF-8) changes nothing: names are decoded as tarfile does, UTF-8 with
    surrogate escapes."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        if space < 0 or not data[pos:space].isdigit():
            raise TarFormatError("malformed PAX record (no length)")
        length = int(data[pos:space])
        end = pos + length
        if length < 5 or end > len(data) or data[end - 1] != 0x0A:
            raise TarFormatError("malformed PAX record (wrong length)")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not key or not eq:
            raise TarFormatError("malformed PAX record (no key=value)")
        name = key.decode("utf-8", "surrogateescape")
        if name.startswith("GNU.sparse."):
            raise TarFormatError(f"unsupported PAX record {name!r}")
        if name in ("path", "linkpath"):
            out[name] = _decode(value, f"PAX {name}")
        else:
            out[name] = value.decode("utf-8", "surrogateescape")
        pos = end
    if any(data[pos:]):
        raise TarFormatError("malformed PAX header (data after the NUL padding)")
    for number in ("size", "uid", "gid"):
        if number in out and not DECIMAL.fullmatch(out[number]):
            raise TarFormatError(f"PAX {number} {out[number][:40]!r} is not a non-negative decimal number")
    return out


class _Pending:
    """Extended headers seen before the entry they describe."""

    def __init__(self) -> None:
        self.offset: int | None = None
        self.pax: dict[str, str] | None = None
        self.longname: str | None = None
        self.longlink: str | None = None

    def add(self, kind: bytes, data: bytes, offset: int, globals_: dict[str, str]) -> None:
        if self.offset is None:
            self.offset = offset  # a global header too: tarfile wants an entry after every extended header
        if kind == b"g":
            records = _pax_records(data)
            bad = [k for k in PAX_ENTRY_KEYS if k in records]
            if bad:
                raise TarFormatError(f"a global PAX header sets {bad[0]!r}")
            globals_.update(records)
            return
        slot = {b"x": "pax", b"L": "longname", b"K": "longlink"}[kind]
        if getattr(self, slot) is not None:
            raise TarFormatError("two extended headers of the same kind for one entry")
        if kind == b"x":
            self.pax = _pax_records(data)
        else:
            setattr(self, slot, _decode(_nts(data), "a GNU long name"))
        if self.pax is not None and (
            ("path" in self.pax and self.longname is not None) or ("linkpath" in self.pax and self.longlink is not None)
        ):
            raise TarFormatError("both a PAX and a GNU long name for one entry")


def _entry(block: bytes, offset: int, pending: _Pending, globals_: dict[str, str]) -> Member:
    kind = block[156:157]
    name = _decode(_nts(block[0:100]), "the name")
    if kind == b"\0" and name.endswith("/"):
        kind = b"5"  # a V7 directory, as tarfile reads it
    if kind == b"5":
        name = name.rstrip("/")
    if block[345]:
        name = _decode(_nts(block[345:500]), "the name prefix") + "/" + name
    size = _number(block[124:136], "size")
    uid = _number(block[108:116], "uid")
    gid = _number(block[116:124], "gid")
    mtime = _number(block[136:148], "mtime", signed=True)  # tarfile stops at a header it cannot parse
    linkname = _decode(_nts(block[157:257]), "the link name") if block[157] else ""
    if pending.longname is not None:
        name = pending.longname.removesuffix("/") if kind == b"5" else pending.longname
    if pending.longlink is not None:
        linkname = pending.longlink
    pax = {**globals_, **(pending.pax or {})} or None
    if pax:
        if "path" in pax:
            name = pax["path"].rstrip("/")
        linkname = pax.get("linkpath", linkname)
        size = int(pax.get("size", size))
        uid, gid = int(pax.get("uid", uid)), int(pax.get("gid", gid))
    return Member(
        name=name,
        type=kind,
        size=size,
        offset=offset if pending.offset is None else pending.offset,
        data_offset=offset + BLOCK,
        linkname=linkname,
        mode=_number(block[100:108], "mode"),
        uid=uid,
        gid=gid,
        devmajor=_number(block[329:337], "device major"),
        devminor=_number(block[337:345], "device minor"),
        pax=pax,
        mtime=mtime,
        uname=_nts(block[265:297]).decode("utf-8", "surrogateescape"),
        gname=_nts(block[297:329]).decode("utf-8", "surrogateescape"),
    )


def _read_exact(f: BinaryIO, n: int, at: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarFormatError(f"truncated at byte {at + len(data)} (the archive ends inside a header or entry)")
    return data


def iter_members(f: BinaryIO, total: int) -> Iterator[Member]:
    """The entries of the tar in `f` (positioned at its start, `total` bytes long); TarFormatError on
    the first thing that is wrong, with the byte offset."""
    pos = 0
    pending = _Pending()
    globals_: dict[str, str] = {}
    if total == 0:
        raise TarFormatError("empty file, not a tar archive")
    while True:
        if pos + BLOCK > total:
            raise TarFormatError(f"truncated at byte {pos} (no end-of-archive marker)")
        block = _read_exact(f, BLOCK, pos)
        if block == ZERO_BLOCK:
            if pending.offset is not None:
                raise TarFormatError(f"extended header at byte {pending.offset} describes no entry")
            _check_end(f, pos + BLOCK, total)
            return
        try:
            _check_checksum(block)
            kind = block[156:157]
            size = _number(block[124:136], "size")
            _numbers(block)  # in extended headers too: tarfile parses every header's numbers
            if kind not in REGULAR + HEADER_ONLY + EXTENDED:
                raise TarFormatError(f"unsupported entry type {kind!r}")
            data_end = pos + BLOCK + size
            if data_end > total:
                raise TarFormatError(
                    f"declares {size} bytes but the archive ends {total - pos - BLOCK} bytes "
                    "later (absurd size or truncated)"
                )
            if kind in EXTENDED:
                if size > MAX_EXTENDED:
                    raise TarFormatError(f"extended header of {size} bytes (more than {MAX_EXTENDED})")
                # With its padding: tarfile parses the whole blocks (records or a name in the padding count).
                padded = size + (-size % BLOCK)
                pending.add(kind, _read_exact(f, padded, pos + BLOCK), pos, globals_)
                pos += BLOCK + padded
                continue
            member = _entry(block, pos, pending, globals_)
        except TarFormatError as exc:
            raise TarFormatError(f"header at byte {pos}: {exc}") from None
        member = _checked_size(member, total, pos)
        pending = _Pending()
        yield member
        data = member.size if member.isreg() else 0
        pos += BLOCK + data + (-data % BLOCK)
        f.seek(pos)


def _checked_size(member: Member, total: int, pos: int) -> Member:
    """A size (perhaps from PAX) that fits the file and belongs to an entry that has data."""
    where = f"header at byte {pos} ({member.name[:200]!r})"
    if member.size and not member.isreg():
        raise TarFormatError(
            f"{where}: a {_KINDS.get(member.type, 'special')} entry declares {member.size} bytes of data"
        )
    if member.data_offset + member.size > total:
        raise TarFormatError(
            f"{where}: declares {member.size} bytes but the archive ends "
            f"{total - member.data_offset} bytes later (absurd size or truncated)"
        )
    return member


_KINDS = {b"1": "hard link", b"2": "symlink", b"3": "device", b"4": "device", b"5": "directory", b"6": "fifo"}


def _check_end(f: BinaryIO, pos: int, total: int) -> None:
    """After the first zero block: a second one (or the end of the file). Anything else would be entries
    that some readers see and others do not."""
    if pos >= total:
        return
    block = f.read(BLOCK)
    if any(block):
        raise TarFormatError(f"data after the end-of-archive marker at byte {pos - BLOCK}")


def scan_file(path: Path) -> Iterator[Member]:
    with open(path, "rb") as f:
        yield from iter_members(f, os.fstat(f.fileno()).st_size)


def check_file(path: Path) -> int:
    """Walk every header of the tar at `path`; the number of entries (TarFormatError when malformed)."""
    n = 0
    for _ in scan_file(path):
        n += 1
    return n
