"""`perms` applied while a layer tar is written: each entry's owner and mode after the spec's rules.

Semantics (the README's "Ownership and modes without scripts"):
- An entry's image path is "/" + its name in the layer (directories without a trailing slash).  A
  `path` rule matches that path and everything below it; a `regex` rule matches when the expression
  matches the whole path (re.fullmatch; names that are not UTF-8 are decoded with surrogateescape).
- Every rule that matches contributes the fields it sets, in spec order: a later rule wins per field;
  a field no matching rule sets keeps what the entry had (the spec's owner, or what a script chowned
  or chmodded).
- A rule that sets `uid` without `uname` sets the name to "" (and `gid` without `gname` the group
  name): a new numeric id under the old owner's name would be wrong, and GNU tar extracting as root
  goes by the name first.  Give `uname` too for a name.
- `mode` replaces the permission bits (setuid, setgid and sticky included) of every entry that is not
  a directory or a symlink; `dirMode` those of directories; symlinks keep their mode.
- A hard link is one file with two names: it gets what the rules give the name it links to.
- Whiteouts (.wh.*) are markers, not files: no rule touches them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nsbuild.core.perms import PermRule

SLASH = 0x2F
WHITEOUT = b".wh."


class EntryLike(Protocol):
    """What a rule reads of a tar entry (nsbuild.tar.tarwriter.Entry, whatever its origin)."""

    name: bytes
    kind: str
    mode: int
    uid: int
    gid: int
    linkname: bytes


@dataclass(frozen=True, slots=True)
class Effect:
    """What the matching rules set together (None: leave it)."""

    uid: int | None
    gid: int | None
    uname: str | None
    gname: str | None
    mode: int | None
    dir_mode: int | None

    @property
    def owns(self) -> bool:
        return not (self.uid is None and self.gid is None and self.uname is None and self.gname is None)


def _merged(rules: Sequence[PermRule]) -> Effect:
    values: dict[str, Any] = dict.fromkeys(("uid", "gid", "uname", "gname", "mode", "dir_mode"))
    for rule in rules:
        if rule.uid is not None:
            values["uid"], values["uname"] = rule.uid, ""
        if rule.gid is not None:
            values["gid"], values["gname"] = rule.gid, ""
        for name in ("uname", "gname", "mode", "dir_mode"):
            if getattr(rule, name) is not None:
                values[name] = getattr(rule, name)
    return Effect(**values)


class PermRules:
    """The rules compiled once; `apply` is called for every entry of a layer.  Path rules are indexed
    by their first component: an entry outside every rule's top directory costs one dict lookup for
    all of them, an entry inside one a prefix test per rule under that top; each regex rule costs one
    match."""

    def __init__(self, rules: Sequence[PermRule]) -> None:
        self.rules = tuple(rules)
        self._everywhere = tuple(i for i, r in enumerate(self.rules) if r.path == "/")
        by_top: dict[bytes, list[tuple[int, bytes]]] = {}
        for i, r in enumerate(self.rules):
            if r.path is not None and r.path != "/":
                name = r.path.lstrip("/").encode("utf-8", "surrogateescape")  # as the layer names it
                by_top.setdefault(name.partition(b"/")[0], []).append((i, name))
        self._by_top = {top: tuple(tests) for top, tests in by_top.items()}
        self._regexes = tuple((i, re.compile(r.regex)) for i, r in enumerate(self.rules) if r.regex is not None)
        self._effects: dict[tuple[int, ...], Effect] = {}

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.rules]

    def narrowed(self, sources: Iterable[tuple[str | os.PathLike[str], str]]) -> PermRules | None:
        """The rules that can match an entry of a layer made of `sources` ((host path, absolute image
        target) pairs; the targets' parents are entries too): every regex rule, each path rule on the
        way to a target, and each below one where that path exists in the source's host tree.  None
        when no rule is left: the layer's cache key stays what it is without rules, so a rule for
        /home/app rebuilds neither the store layers nor a root tree that has no home/app."""
        pairs = [(os.fspath(host), target.rstrip("/")) for host, target in sources]
        kept = [r for r in self.rules if r.path is None or any(_can_match(r.path, h, t) for h, t in pairs)]
        if len(kept) == len(self.rules):
            return self
        return PermRules(kept) if kept else None

    def matched(self, name: bytes) -> tuple[int, ...]:
        """The indexes of the rules matching the layer name `name` (no leading slash), in order."""
        found = self._everywhere
        mixed = False  # hits from more than one group: they interleave in spec order (later wins)
        tests = self._by_top.get(name.partition(b"/")[0])
        if tests is not None:
            size = len(name)
            hits = tuple(
                i
                for i, prefix in tests
                if name.startswith(prefix) and (size == len(prefix) or name[len(prefix)] == SLASH)
            )
            if hits:
                mixed = bool(found)
                found = found + hits if found else hits
        if self._regexes:
            text = "/" + name.decode("utf-8", "surrogateescape")
            hits = tuple(i for i, regex in self._regexes if regex.fullmatch(text) is not None)
            if hits:
                mixed = mixed or bool(found)
                found = found + hits if found else hits
        return tuple(sorted(found)) if mixed else found

    def apply(self, entry: EntryLike) -> Effect | None:
        """Set entry.mode as the rules say; return what they set of its owner (None: nothing).  The
        same Effect object for every entry the same rules match (the caller keys on it)."""
        kind = entry.kind
        name = entry.linkname if kind == "hardlink" else entry.name
        if WHITEOUT in name and name.rpartition(b"/")[2].startswith(WHITEOUT):
            return None
        matched = self.matched(name)
        if not matched:
            return None
        effect = self._effects.get(matched)
        if effect is None:
            effect = self._effects[matched] = _merged([self.rules[i] for i in matched])
        if kind == "dir":
            if effect.dir_mode is not None:
                entry.mode = effect.dir_mode
        elif kind != "symlink" and effect.mode is not None:
            entry.mode = effect.mode
        return effect if effect.owns else None


def compiled(rules: Sequence[PermRule]) -> PermRules | None:
    """The rules ready for the writer; None for no rules (the writer's path without any)."""
    return PermRules(rules) if rules else None


def _can_match(path: str, host: str, target: str) -> bool:
    """Whether the layer entry at `path` (or one below it) can come from the host tree `host` placed
    at `target` ("" is /).  The writer lists the host tree without following symlinks; lexists may
    follow one on the way and say yes where the tar has no such entry: that only keeps a rule."""
    path = path.rstrip("/")
    if not path or _within(target, path):
        return True  # the target itself, or one of its parents the layer holds too
    if not (not target or _within(path, target)):
        return False
    return os.path.lexists(os.path.join(host, path[len(target) :].lstrip("/")))


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer + "/")
