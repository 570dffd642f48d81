"""Who owns an entry in a layer: the spec's owner, or ids recorded by a fake-root script; then the
spec's `perms` rules (nsbuild.tar.perms)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nsbuild.tar.perms import Effect, EntryLike, PermRules


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

    def __init__(
        self,
        root: Owner,
        fixed: bool,
        users: dict[int, str],
        groups: dict[int, str],
        perms: PermRules | None = None,
    ) -> None:
        self.root = root
        self.fixed = fixed
        self.users = users
        self.groups = groups
        self.perms = perms  # None: no rules (write_tar then never calls owner_of)
        self._cache: dict[tuple[int, int], Owner] = {}
        # (id of the owner before, id of the Effect) → (both, kept alive so that their ids stay theirs; after)
        self._ruled: dict[tuple[int, int], tuple[Owner, Effect, Owner]] = {}

    @classmethod
    def fixed_owner(cls, owner: Owner, perms: PermRules | None = None) -> OwnerPolicy:
        """Every entry gets `owner` (content layers, and scripts that ran without fake root)."""
        return cls(owner, True, {}, {}, perms)

    @classmethod
    def mapped(
        cls, root: Owner, passwd: Path | None = None, group: Path | None = None, perms: PermRules | None = None
    ) -> OwnerPolicy:
        """Namespace-root becomes `root`; other ids are kept, named from the image's own files."""
        return cls(root, False, read_names(passwd), read_names(group), perms)

    def narrowed(self, sources: Iterable[tuple[str | os.PathLike[str], str]]) -> OwnerPolicy:
        """This policy for a layer made of `sources` ((host, target) pairs), without the rules that
        cannot match any of its entries (PermRules.narrowed): what the layer's cache keys hash."""
        if self.perms is None:
            return self
        perms = self.perms.narrowed(sources)
        if perms is self.perms:
            return self
        return OwnerPolicy(self.root, self.fixed, self.users, self.groups, perms)

    def owner_of(self, entry: EntryLike, given: Owner | None = None) -> Owner:
        """The owner `entry` is written with, the rules applied (which may set entry.mode too).
        `given`: the owner the entry carries itself (a member of an existing tar keeps its names)."""
        owner = given if given is not None else self.resolve(entry.uid, entry.gid)
        effect = self.perms.apply(entry) if self.perms is not None else None
        if effect is None:
            return owner
        key = (id(owner), id(effect))
        known = self._ruled.get(key)
        if known is None:
            after = Owner(
                owner.uid if effect.uid is None else effect.uid,
                owner.gid if effect.gid is None else effect.gid,
                owner.uname if effect.uname is None else effect.uname,
                owner.gname if effect.gname is None else effect.gname,
            )
            # One object per combination: write_tar reuses a header template while the owner object stays.
            known = self._ruled[key] = (owner, effect, owner if after == owner else after)
        return known[2]

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
        out: dict[str, object] = {
            "fixed": self.fixed,
            "uid": self.root.uid,
            "gid": self.root.gid,
            "uname": self.root.uname,
            "gname": self.root.gname,
            "users": {str(k): v for k, v in self.users.items()},
            "groups": {str(k): v for k, v in self.groups.items()},
        }
        if self.perms is not None:
            # Only with rules: the keys of layers without any stay what they always were.
            out["perms"] = self.perms.to_json()
        return out
