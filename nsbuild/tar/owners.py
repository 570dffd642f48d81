"""Who owns an entry in a layer: the spec's owner, or ids recorded by a fake-root script."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    uname: str
    gname: str


def read_names(path: Path | None) -> dict[int, str]:
    """id → name from a passwd or group file (first entry wins, as getpwuid does)."""
    names: dict[int, str] = {}
    if path is None:
        return names
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return names
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            names.setdefault(int(fields[2]), fields[0])
    return names


class OwnerPolicy:
    """Maps the ids lstat shows to the ids and names written to the tar."""

    def __init__(self, root: Owner, fixed: bool, users: dict[int, str], groups: dict[int, str]) -> None:
        self.root = root
        self.fixed = fixed
        self.users = users
        self.groups = groups
        self._cache: dict[tuple[int, int], Owner] = {}

    @classmethod
    def fixed_owner(cls, owner: Owner) -> OwnerPolicy:
        """Every entry gets `owner` (content layers, and scripts that ran without fake root)."""
        return cls(owner, True, {}, {})

    @classmethod
    def mapped(cls, root: Owner, passwd: Path | None = None, group: Path | None = None) -> OwnerPolicy:
        """Namespace-root becomes `root`; other ids are kept, named from the image's own files."""
        return cls(root, False, read_names(passwd), read_names(group))

    def resolve(self, uid: int, gid: int) -> Owner:
        if self.fixed:
            return self.root
        key = (uid, gid)
        owner = self._cache.get(key)
        if owner is None:
            out_uid, uname = (self.root.uid, self.root.uname) if uid == 0 else (uid, self.users.get(uid, ""))
            out_gid, gname = (self.root.gid, self.root.gname) if gid == 0 else (gid, self.groups.get(gid, ""))
            owner = self._cache[key] = Owner(out_uid, out_gid, uname, gname)
        return owner

    def to_json(self) -> dict[str, object]:
        return {
            "fixed": self.fixed,
            "uid": self.root.uid,
            "gid": self.root.gid,
            "uname": self.root.uname,
            "gname": self.root.gname,
            "users": {str(k): v for k, v in self.users.items()},
            "groups": {str(k): v for k, v in self.groups.items()},
        }
