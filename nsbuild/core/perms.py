"""The `perms` rules of a spec as values: what each rule says, checked once, in one canonical form.

A rule names entries by `path` (that image path and everything below it) or by `regex` (a Python
regular expression matched in full against the entry's absolute image path), and sets any of `uid`,
`gid`, `uname`, `gname`, `mode` (non-directories, never symlinks) and `dirMode` (directories).
nsbuild.tar.perms applies them while a layer tar is written; the spec, the cache keys and the
sandbox job all carry them in the form `PermRule.to_json` gives.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from nsbuild.errors import SpecError

MAX_ID = 2**32 - 2  # as the spec's uid/gid: (uid_t)-1 means "no change" to chown, never an owner
MAX_NAME_BYTES = 32  # the ustar uname/gname field
MAX_MODE = 0o7777
MAX_RULES = 4096
FIELDS = ("path", "regex", "uid", "gid", "uname", "gname", "mode", "dirMode")
SETTERS = ("uid", "gid", "uname", "gname", "mode", "dirMode")
_OCTAL = re.compile(r"(?:0o)?[0-7]{1,6}")


@dataclass(frozen=True)
class PermRule:
    """One rule: exactly one of `path` (normalised: absolute, no trailing slash but for "/") and
    `regex`; None for a field the rule leaves as it was."""

    path: str | None = None
    regex: str | None = None
    uid: int | None = None
    gid: int | None = None
    uname: str | None = None
    gname: str | None = None
    mode: int | None = None
    dir_mode: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The canonical form (set fields only, modes as four octal digits): what cache keys hash and
        the sandbox job carries; parse_rule reads it back to the same rule."""
        values = {
            "path": self.path,
            "regex": self.regex,
            "uid": self.uid,
            "gid": self.gid,
            "uname": self.uname,
            "gname": self.gname,
            "mode": None if self.mode is None else f"{self.mode:04o}",
            "dirMode": None if self.dir_mode is None else f"{self.dir_mode:04o}",
        }
        return {k: v for k, v in values.items() if v is not None}


def parse_perms(key: str, value: Any) -> tuple[PermRule, ...]:
    """The rules of a `perms` value (a list of objects); a SpecError names the field at fault, e.g.
    perms[1].mode."""
    if not isinstance(value, list):
        raise SpecError(key, f"expected a list of rules, got {_type_name(value)}")
    if len(value) > MAX_RULES:
        raise SpecError(key, f"{len(value)} rules; at most {MAX_RULES}")
    return tuple(parse_rule(f"{key}[{i}]", item) for i, item in enumerate(value))


def parse_rule(key: str, value: Any) -> PermRule:
    if not isinstance(value, dict):
        raise SpecError(key, f'expected an object such as {{"path": "/app", "uid": 1000}}, got {_type_name(value)}')
    for name in value:
        if name not in FIELDS:
            hint = difflib.get_close_matches(name, FIELDS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; a rule takes {', '.join(FIELDS)}"
            raise SpecError(f"{key}.{name}", f"unknown key{extra}")
    if ("path" in value) == ("regex" in value):
        raise SpecError(key, 'a rule takes exactly one of "path" and "regex"')
    if not any(value.get(name) is not None for name in SETTERS):
        raise SpecError(key, f"the rule sets nothing (give any of {', '.join(SETTERS)})")
    return PermRule(
        path=_path(f"{key}.path", value["path"]) if "path" in value else None,
        regex=_regex(f"{key}.regex", value["regex"]) if "regex" in value else None,
        uid=_id(f"{key}.uid", value.get("uid")),
        gid=_id(f"{key}.gid", value.get("gid")),
        uname=_name(f"{key}.uname", value.get("uname")),
        gname=_name(f"{key}.gname", value.get("gname")),
        mode=_mode(f"{key}.mode", value.get("mode")),
        dir_mode=_mode(f"{key}.dirMode", value.get("dirMode")),
    )


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise SpecError(key, f"expected an absolute path in the image such as /app, got {_shown(value)}")
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise SpecError(key, f"'.' and '..' are not allowed in {value!r}")
    return "/" + "/".join(parts)


def _regex(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(key, f"expected a regular expression (Python re syntax), got {_shown(value)}")
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise SpecError(key, f"not a valid regular expression: {exc}") from None
    return value


def _id(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(key, f"expected a whole number, got {_type_name(value)}")
    if not 0 <= value <= MAX_ID:
        raise SpecError(key, f"expected a number from 0 to {MAX_ID}, got {value}")
    return value


def _name(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(key, f"expected a string, got {_type_name(value)}")
    if any(c in value for c in ":\n\0") or len(value.encode()) > MAX_NAME_BYTES:
        raise SpecError(
            key, f"expected a name of at most {MAX_NAME_BYTES} bytes without ':' or newlines, got {value!r}"
        )
    return value


def _mode(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not _OCTAL.fullmatch(value):
            raise SpecError(key, f'expected an octal mode such as "0755" or "4755", got {value!r}')
        number = int(value.removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        # JSON has no octal numbers: 755 would be the mode 0o1363, never what was meant.
        raise SpecError(
            key,
            f'expected the mode as an octal string such as "0755", got the number {value} (JSON numbers are decimal)',
        )
    else:
        raise SpecError(key, f'expected an octal mode as a string such as "0755", got {_type_name(value)}')
    if not 0 <= number <= MAX_MODE:
        raise SpecError(key, f"expected a mode from 0000 to 7777 (octal), got {value!r}")
    return number


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else _type_name(value)
