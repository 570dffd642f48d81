"""Subordinate id ranges (/etc/subuid, /etc/subgid) and the id maps built from them."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")


@dataclass(frozen=True)
class IdMap:
    """Lines for newuidmap/newgidmap: (inside, outside, count) triples, inside ids contiguous from 0."""

    uids: list[tuple[int, int, int]]
    gids: list[tuple[int, int, int]]


def current_user() -> tuple[str, int, int]:
    uid, gid = os.getuid(), os.getgid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return name, uid, gid


def subid_ranges(path: Path, name: str, uid: int) -> list[tuple[int, int]]:
    """(start, count) ranges granted to the user (by name or number), in file order."""
    out: list[tuple[int, int]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, PermissionError):
        return out
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (name, str(uid)):
            continue
        if fields[1].isdigit() and fields[2].isdigit() and int(fields[2]) > 0:
            out.append((int(fields[1]), int(fields[2])))
    return out


def _chain(own: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    # Namespace id 0 is the caller; the subordinate ranges follow from 1 up, in file order.
    lines = [(0, own, 1)]
    inside = 1
    for start, count in ranges:
        lines.append((inside, start, count))
        inside += count
    return lines


def full_map() -> IdMap | None:
    """The caller's full map, or None when /etc/subuid or /etc/subgid grants it nothing."""
    name, uid, gid = current_user()
    if uid == 0:
        # Real root needs no helper: it may map the whole id space onto itself.
        return IdMap([(0, 0, 4294967295)], [(0, 0, 4294967295)])
    uranges = subid_ranges(SUBUID, name, uid)
    granges = subid_ranges(SUBGID, name, uid)
    if not uranges or not granges:
        return None
    return IdMap(_chain(uid, uranges), _chain(gid, granges))
