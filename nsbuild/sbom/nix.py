"""What Nix itself says about a store path: its name and version, its NAR hash, its references.

The name/version split is Nix's `parseDrvName` (`builtins.parseDrvName`, `nix-env -q`): the version
begins after the first dash whose next character is not an ASCII letter; with no such dash the
whole name is the name and the version is empty.
"""

from __future__ import annotations

import base64
import binascii
import os
import sqlite3
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsbuild.plan.store import StorePath

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base32 alphabet (no e, o, u, t)
HASH_PART = 32  # characters of a store path's hash part
_LETTERS = frozenset(string.ascii_letters)  # isalpha() in the C locale Nix relies on


def parse_drv_name(name: str) -> tuple[str, str]:
    """(name, version) as Nix's parseDrvName splits a derivation name: `apache-httpd-2.0.48` →
    (`apache-httpd`, `2.0.48`), `bash--1-2` → (`bash`, `-1-2`), `hello` → (`hello`, ``)."""
    for i, char in enumerate(name[:-1]):
        if char == "-" and name[i + 1] not in _LETTERS:
            return name[:i], name[i + 1 :]
    return name, ""


def split_store_name(entry: str) -> tuple[str, str]:
    """`<hash>-<name>` → (hash part, name); a name without a hash part is returned whole."""
    if len(entry) > HASH_PART + 1 and entry[HASH_PART] == "-" and all(c in NIX32 for c in entry[:HASH_PART]):
        return entry[:HASH_PART], entry[HASH_PART + 1 :]
    return "", entry


def nix32_decode(text: str) -> bytes:
    """Nix's base32 (least significant 5-bit group last in the text) → bytes."""
    nbytes = len(text) * 5 // 8
    value = 0
    for i, char in enumerate(reversed(text)):
        digit = NIX32.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a Nix base32 digit")
        value |= digit << (5 * i)
    if value >> (8 * nbytes):
        raise ValueError("Nix base32 value has bits beyond its length")
    return value.to_bytes(nbytes, "little")


def sha256_hex(nar_hash: str) -> str:
    """A NAR hash in any form Nix prints (`sha256:<base16>`, `sha256:<nix32>`, SRI `sha256-<base64>`)
    as 64 hex digits; ValueError for anything else."""
    if nar_hash.startswith("sha256-"):
        try:
            raw = base64.b64decode(nar_hash[7:], validate=True)
        except binascii.Error:
            raise ValueError(f"not an SRI sha256 hash: {nar_hash!r}") from None
    else:
        body = nar_hash.removeprefix("sha256:")
        if len(body) == 64:
            try:
                raw = bytes.fromhex(body)
            except ValueError:
                raise ValueError(f"not a sha256 hash: {nar_hash!r}") from None
        elif len(body) == 52:
            raw = nix32_decode(body)
        else:
            raise ValueError(f"not a sha256 hash: {nar_hash!r}")
    if len(raw) != 32:
        raise ValueError(f"not a sha256 hash: {nar_hash!r}")
    return raw.hex()


@dataclass(frozen=True)
class PathInfo:
    """What a Nix database (or the caller) records for one store path."""

    nar_hash: str  # 64 hex digits, "" when unknown
    references: tuple[str, ...]  # full store paths, sorted, self-reference left out


def path_infos(given: Mapping[str, Mapping[str, Any]], store_dir: str) -> dict[str, PathInfo]:
    """The caller's {store path or entry name: {"narHash": ..., "references": [...]}}, keyed by full
    store path (`<store_dir>/<hash>-<name>`)."""
    out: dict[str, PathInfo] = {}
    for key, value in given.items():
        path = _full(key, store_dir)
        nar = value.get("narHash") or ""
        refs = sorted({_full(r, store_dir) for r in value.get("references") or []} - {path})
        out[path] = PathInfo(sha256_hex(nar) if nar else "", tuple(refs))
    return out


def nix_info_from_closure(
    closure: Mapping[str, StorePath], store_dir: str, nar_hashes: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """The build's closure (nsbuild.plan: entry name → StorePath, references as hash parts) in the form
    SbomRequest.nix_info takes; `nar_hashes` (entry name → hash, any form Nix prints) when known, e.g.
    from the registrations includeNixDB computed."""
    by_hash = {sp.hash_part: name for name, sp in closure.items()}
    prefix = store_dir.rstrip("/")
    out: dict[str, dict[str, Any]] = {}
    for name, sp in sorted(closure.items()):
        refs = sorted(f"{prefix}/{by_hash[h]}" for h in sp.references if h in by_hash and by_hash[h] != name)
        info: dict[str, Any] = {"references": refs}
        if nar_hashes and name in nar_hashes:
            info["narHash"] = nar_hashes[name]
        out[f"{prefix}/{name}"] = info
    return out


def _full(path: str, store_dir: str) -> str:
    return path if "/" in path else f"{store_dir.rstrip('/')}/{path}"


def read_nix_db(db_file: Path) -> dict[str, PathInfo]:
    """ValidPaths and Refs of a Nix local-store database (schema 10, as nsbuild.rootfs.nixdb and Nix
    write it), opened read-only and immutable: a copy taken out of a layer, never a live store."""
    uri = "file:" + os.path.abspath(db_file) + "?mode=ro&immutable=1"
    con = sqlite3.connect(uri, uri=True)
    try:
        paths = {i: (p, h) for i, p, h in con.execute("select id, path, hash from ValidPaths")}
        refs: dict[int, set[str]] = {}
        for referrer, reference in con.execute("select referrer, reference from Refs"):
            if referrer != reference and reference in paths:
                refs.setdefault(referrer, set()).add(paths[reference][0])
    finally:
        con.close()
    out = {}
    for i, (path, nar_hash) in paths.items():
        try:
            hex_hash = sha256_hex(nar_hash)
        except ValueError:
            hex_hash = ""  # another algorithm: Nix allows it, the SBOM leaves the hash out
        out[path] = PathInfo(hex_hash, tuple(sorted(refs.get(i, ()))))
    return out
