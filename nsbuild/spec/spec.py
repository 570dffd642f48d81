"""spec.json: load, validate, fill defaults.  Every error names the field (DESIGN.md §2).

The attribute table below is the single source of truth: validation, defaults, which command takes
which attribute, and the JSON Schema printed by `nsbuild schema` all come from it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nsbuild.core.perms import PermRule, parse_perms
from nsbuild.core.platform import ARCHITECTURES, host_architecture, variant_problem
from nsbuild.core.refs import parse_ref, split_registry_host
from nsbuild.core.tarfiles import not_a_tar
from nsbuild.errors import SpecError, UsageError
from nsbuild.spec.imageconfig import check_image_config, healthcheck_schema
from nsbuild.spec.imageconfig import field as config_field

DEFAULT_DATE = "1970-01-01T00:00:01Z"
COMPRESSORS = ("none", "gz", "zstd")
MAX_LAYERS_LIMIT = 125  # overlayfs stacks at most ~128 lower dirs; Docker refuses beyond that
MAX_SPEC_BYTES = 8 << 20  # scripts included; a spec larger than this is a mistake (or /dev/zero)
MAX_DEPTH = 32  # nothing in a spec nests deeper than a few levels
MAX_INT_DIGITS = 20  # every number in a spec fits 64 bits
MAX_NAME = 255  # Docker's limit for a whole repository name
PATH_MAX = 4095  # bytes, as the kernel counts them (the terminating NUL excluded)
NAME_MAX = 255  # bytes of one path component
MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z: the last second an image config's "created" can hold
NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{NAME_COMPONENT}(?:/{NAME_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
ENV_RE = re.compile(r"^[^=]+=")
CONFIG_KEYS = {
    "User": "string",
    "ExposedPorts": "object",
    "Env": "array",
    "Entrypoint": "array",
    "Cmd": "array",
    "Volumes": "object",
    "WorkingDir": "string",
    "Labels": "object",
    "StopSignal": "string",
    "Healthcheck": "object",
    "OnBuild": "array",
    "Shell": "array",
    "ArgsEscaped": "boolean",
}

LAYERED = "layered"
IMAGE = "image"


@dataclass(frozen=True)
class ContentEntry:
    """One `contents`/`copyToRoot` entry: a host path and where it lands in the image."""

    path: Path
    target: str | None  # None: a store path at its own place, or a root tree at /
    field: str  # e.g. "contents[2]", for messages
    written: str = ""  # the path as the spec wrote it: history comments must not depend on the checkout
    tar: bool = False  # {"tar": …}: `path` is a tar whose members are a layer (nsbuild.tar.tarinput)
    keep_mtime: bool = False  # a tar's own mtimes instead of the spec's mtime


@dataclass(frozen=True)
class Spec:
    kind: str
    spec_path: Path
    name: str
    tag: str | None
    from_image: str | None
    from_image_name: str | None
    from_image_tag: str | None
    contents: list[ContentEntry]
    copy_to_root: list[ContentEntry]
    keep_contents_dirlinks: bool
    config: dict[str, Any]
    annotations: dict[str, str]  # OCI manifest annotations
    architecture: str
    created: int
    mtime: int
    uid: int
    gid: int
    uname: str
    gname: str
    max_layers: int
    extra_commands: str
    fake_root_commands: str
    enable_fakechroot: bool
    include_store_paths: bool
    include_nix_db: bool
    run_as_root: str | None
    disk_size: int
    build_vm_memory_size: int
    compressor: str
    store_dir: str
    perms: tuple[PermRule, ...] = ()  # applied to every entry of every new layer (nsbuild.tar.perms)
    raw: dict[str, Any] = field(default_factory=dict)
    variant: str | None = None  # the architecture's variant (arm v7, arm64 v8...); None: unstated

    @property
    def base_dir(self) -> Path:
        return self.spec_path.parent


# --- checkers --------------------------------------------------------------------------------------

Checker = Callable[[str, Any, "Context"], Any]


@dataclass
class Context:
    base_dir: Path
    env: dict[str, str]


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _string(key: str, value: Any, ctx: Context) -> str:
    if not isinstance(value, str):
        raise SpecError(key, f"expected a string, got {_type_name(value)}")
    return value


def _bool(key: str, value: Any, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise SpecError(key, f"expected true or false, got {_type_name(value)}")
    return value


def _int_range(lo: int, hi: int) -> Checker:
    def check(key: str, value: Any, ctx: Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(key, f"expected a whole number, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise SpecError(key, f"expected a number from {lo} to {hi}, got {value}")
        return value

    return check


def _choice(choices: tuple[str, ...]) -> Checker:
    def check(key: str, value: Any, ctx: Context) -> str:
        _string(key, value, ctx)
        if value not in choices:
            hint = difflib.get_close_matches(value, choices, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpecError(key, f"expected one of {', '.join(choices)}, got {value!r}{extra}")
        return value

    return check


def _name(key: str, value: Any, ctx: Context) -> str:
    _string(key, value, ctx)
    if len(value) > MAX_NAME:
        raise SpecError(key, f"{len(value)} characters; an image name has at most {MAX_NAME}")
    # A registry host keeps its case; the repository path is lower-cased as Docker requires.
    host, path = split_registry_host(value)
    name = value.lower() if host is None else f"{host}/{path.lower()}"
    if not NAME_RE.match(name):
        raise SpecError(
            key,
            f"{value!r} is not a valid image name ([registry/]path of lower-case letters, digits, '.', '_', '-', '/')",
        )
    return name


def _tag(key: str, value: Any, ctx: Context) -> str | None:
    if value is None:
        return None
    _string(key, value, ctx)
    if not TAG_RE.match(value):
        raise SpecError(
            key,
            f"{value!r} is not a valid tag (up to 128 of letters, digits, '_', '.', '-', not starting with '.' or '-')",
        )
    return value


def check_path_text(key: str, value: str) -> None:
    """A path the kernel can take: no NUL, at most PATH_MAX bytes, no component beyond NAME_MAX (refused
    here, naming the field, rather than as "File name too long" half-way through a build)."""
    if "\0" in value:
        raise SpecError(key, "contains a NUL byte")
    raw = os.fsencode(value)
    if len(raw) > PATH_MAX:
        raise SpecError(key, f"a path of {len(raw)} bytes; at most {PATH_MAX}")
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise SpecError(
            key,
            f"a path component of {len(longest)} bytes ({longest[:24].decode(errors='replace')}"
            f"...); at most {NAME_MAX}",
        )


def _optional_string(key: str, value: Any, ctx: Context) -> str | None:
    return None if value is None else _string(key, value, ctx)


def parse_date(key: str, value: Any) -> tuple[int, bool]:
    """ISO-8601 (UTC when no zone is given, so TZ never matters) or "now" → epoch seconds."""
    if not isinstance(value, str):
        raise SpecError(key, f'expected an ISO-8601 date or "now", got {_type_name(value)}')
    if value == "now":
        return int(datetime.now(UTC).timestamp()), True
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise SpecError(key, f'expected an ISO-8601 date such as {DEFAULT_DATE} or "now", got {value!r}') from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    seconds = int(parsed.timestamp())
    if seconds < 0:
        raise SpecError(key, f"dates before 1970 cannot be stored in a layer, got {value!r}")
    if seconds > MAX_EPOCH:
        raise SpecError(key, f"dates after 9999 cannot be stored in an image config, got {value!r}")
    return seconds, False


def _from_image(key: str, value: Any, ctx: Context) -> str | None:
    """A base image reference; a file or directory in it is relative to the spec and must exist."""
    if value is None:
        return None
    _string(key, value, ctx)
    check_path_text(key, value)
    try:
        ref = parse_ref(value)
    except UsageError as exc:
        raise SpecError(key, str(exc)) from None
    if ref.format == "registry":
        return value
    if ref.format == "load":
        raise SpecError(key, f"{value!r}: a local podman/docker store is not read; export the image to a file")
    path = Path(os.path.expanduser(ref.location))
    if not path.is_absolute():
        path = Path(os.path.normpath(ctx.base_dir / path))
    if not os.path.exists(path):
        raise SpecError(key, f"no such file or directory: {ref.location}")
    if ref.format == "auto":
        return str(path)
    transport = value.partition(":")[0]
    return f"{transport}:{path}{value[len(transport) + 1 + len(ref.location) :]}"


def _target(key: str, value: dict[str, Any], ctx: Context) -> str:
    target = _string(f"{key}.target", value.get("target", "/"), ctx)
    check_path_text(f"{key}.target", target)
    if not target.startswith("/"):
        raise SpecError(f"{key}.target", f"expected an absolute path in the image, got {target!r}")
    if any(part == ".." for part in target.split("/")):
        raise SpecError(f"{key}.target", f"'..' is not allowed in {target!r}")
    return target


def _host_path(key: str, value: Any, ctx: Context) -> tuple[Path, str]:
    if not isinstance(value, str) or not value:
        raise SpecError(key, f"expected a path, got {_type_name(value)}")
    check_path_text(key, value)
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = ctx.base_dir / path
    path = Path(os.path.normpath(path))
    if not os.path.lexists(path):
        raise SpecError(key, f"no such file or directory: {value}")
    return path, value


def _tar_entry(key: str, value: dict[str, Any], ctx: Context) -> ContentEntry:
    """`{"tar": FILE, "target": DIR, "keepMtime": BOOL}`: a tar (plain, gz, zstd, xz) as a layer."""
    unknown = set(value) - {"tar", "target", "keepMtime"}
    if unknown:
        raise SpecError(key, f'unknown key {sorted(unknown)[0]!r} (a tar entry takes "tar", "target" and "keepMtime")')
    target = _target(key, value, ctx)
    keep = _bool(f"{key}.keepMtime", value.get("keepMtime", False), ctx)
    path, written = _host_path(f"{key}.tar", value["tar"], ctx)
    if not path.is_file():
        raise SpecError(f"{key}.tar", f"{written}: not a file (a tar, plain or gz/zstd/xz-compressed)")
    why = not_a_tar(path)
    if why is not None:
        raise SpecError(f"{key}.tar", f"{written}: not a tar archive: {why}")
    return ContentEntry(path, target, f"{key}.tar", written, tar=True, keep_mtime=keep)


def _path_entry(key: str, value: Any, ctx: Context) -> ContentEntry:
    target: str | None = None
    if isinstance(value, dict):
        if "tar" in value and "path" not in value:
            return _tar_entry(key, value, ctx)
        unknown = set(value) - {"path", "target"}
        if unknown:
            raise SpecError(key, f'unknown key {sorted(unknown)[0]!r} (an entry takes "path" and "target")')
        if "path" not in value:
            raise SpecError(key, 'missing "path" (or "tar")')
        target = _target(key, value, ctx)
        value = value["path"]
        key = f"{key}.path"
    path, written = _host_path(key, value, ctx)
    return ContentEntry(path=path, target=target, field=key, written=written)


def _path_list(key: str, value: Any, ctx: Context) -> list[ContentEntry]:
    if isinstance(value, str | dict):
        value = [value]  # dockerTools accepts a single derivation as well as a list
    if not isinstance(value, list):
        raise SpecError(key, f"expected a list of paths, got {_type_name(value)}")
    return [_path_entry(f"{key}[{i}]", item, ctx) for i, item in enumerate(value)]


def _config(key: str, value: Any, ctx: Context) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(key, f"expected an object, got {_type_name(value)}")
    out: dict[str, Any] = {}
    for k, v in value.items():
        sub = config_field(key, k)  # quoted when the name would not print on one line
        kind = CONFIG_KEYS.get(k)
        if kind is None:
            hint = difflib.get_close_matches(k, CONFIG_KEYS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(sorted(CONFIG_KEYS))}"
            raise SpecError(sub, f"unknown image config key{extra}")
        if v is None:
            continue
        if kind == "string" and not isinstance(v, str):
            raise SpecError(sub, f"expected a string, got {_type_name(v)}")
        if kind == "boolean" and not isinstance(v, bool):
            raise SpecError(sub, f"expected true or false, got {_type_name(v)}")
        if kind == "object" and not isinstance(v, dict):
            raise SpecError(sub, f"expected an object, got {_type_name(v)}")
        if kind == "array" and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            raise SpecError(sub, f"expected a list of strings, got {_type_name(v)}")
        if k == "Env":
            for i, item in enumerate(v):
                if not ENV_RE.match(item):
                    raise SpecError(f"{sub}[{i}]", f'expected "NAME=value", got {item!r}')
        if k == "Labels" and not all(isinstance(x, str) for x in v.values()):
            raise SpecError(sub, "expected string values")
        out[k] = v
    return check_image_config(key, out)  # what the values mean: nsbuild/imageconfig.py


def _annotations(key: str, value: Any, ctx: Context) -> dict[str, str]:
    """OCI manifest annotations: string keys (not empty) to string values."""
    if not isinstance(value, dict):
        raise SpecError(key, f"expected an object of strings, got {_type_name(value)}")
    for k, v in value.items():
        if not k:
            raise SpecError(key, "an annotation key is empty")
        if not isinstance(v, str):
            raise SpecError(config_field(key, k), f"expected a string, got {_type_name(v)}")
    return dict(value)


def _perms(key: str, value: Any, ctx: Context) -> tuple[PermRule, ...]:
    return parse_perms(key, value)  # the rule grammar: nsbuild/core/perms.py


@dataclass(frozen=True)
class Attr:
    check: Checker
    default: Any
    kinds: tuple[str, ...]
    schema: dict[str, Any]
    doc: str


BOTH = (LAYERED, IMAGE)
ATTRS: dict[str, Attr] = {
    "name": Attr(_name, None, BOTH, {"type": "string"}, "repository name, may carry a registry prefix"),
    "tag": Attr(_tag, None, BOTH, {"type": ["string", "null"]}, "tag; default: derived from the content"),
    "fromImage": Attr(
        _from_image,
        None,
        BOTH,
        {"type": ["string", "null"]},
        "base image: docker-archive (plain/gz/zstd), OCI dir/archive, or a transport ref",
    ),
    "fromImageName": Attr(
        _optional_string, None, (IMAGE,), {"type": ["string", "null"]}, "image name inside a multi-image archive"
    ),
    "fromImageTag": Attr(
        _optional_string, None, (IMAGE,), {"type": ["string", "null"]}, "image tag inside a multi-image archive"
    ),
    "contents": Attr(_path_list, [], (LAYERED,), {"$ref": "#/$defs/paths"}, "host paths put in the image"),
    "copyToRoot": Attr(_path_list, [], (IMAGE,), {"$ref": "#/$defs/paths"}, "trees copied into /"),
    "keepContentsDirlinks": Attr(
        _bool, False, (IMAGE,), {"type": "boolean"}, "keep symlinks to directories as symlinks"
    ),
    "config": Attr(_config, {}, BOTH, {"$ref": "#/$defs/config"}, "image config"),
    "annotations": Attr(
        _annotations,
        {},
        BOTH,
        {"type": "object", "additionalProperties": {"type": "string"}},
        "OCI manifest annotations (not dockerTools: OCI outputs and pushes)",
    ),
    "architecture": Attr(
        _choice(ARCHITECTURES), None, BOTH, {"enum": list(ARCHITECTURES)}, "GOARCH of the image; default: the host's"
    ),
    "variant": Attr(
        _optional_string,
        None,
        BOTH,
        {"type": ["string", "null"]},
        "the architecture's variant (arm: v5-v8, arm64: v8, v8.1..., amd64: v1-v4); default: none",
    ),
    "created": Attr(_string, None, BOTH, {"type": "string"}, 'ISO-8601 or "now"'),
    "mtime": Attr(_string, None, (LAYERED,), {"type": "string"}, 'ISO-8601 or "now"'),
    "uid": Attr(_int_range(0, 2**32 - 2), 0, BOTH, {"type": "integer", "minimum": 0}, "owner uid"),
    "gid": Attr(_int_range(0, 2**32 - 2), 0, BOTH, {"type": "integer", "minimum": 0}, "owner gid"),
    "uname": Attr(_string, "root", (LAYERED,), {"type": "string"}, "owner user name"),
    "gname": Attr(_string, "root", (LAYERED,), {"type": "string"}, "owner group name"),
    "maxLayers": Attr(
        _int_range(2, MAX_LAYERS_LIMIT),
        100,
        (LAYERED,),
        {"type": "integer", "minimum": 2, "maximum": MAX_LAYERS_LIMIT},
        "total layers including base layers",
    ),
    "extraCommands": Attr(_string, "", BOTH, {"type": "string"}, "bash, as the calling user"),
    "fakeRootCommands": Attr(_string, "", (LAYERED,), {"type": "string"}, "bash, as namespace root"),
    "enableFakechroot": Attr(
        _bool, False, (LAYERED,), {"type": "boolean"}, "run fakeRootCommands chrooted into the image"
    ),
    "includeStorePaths": Attr(_bool, True, (LAYERED,), {"type": "boolean"}, "false: leave store paths out"),
    "includeNixDB": Attr(_bool, False, BOTH, {"type": "boolean"}, "register store paths in a Nix db"),
    "runAsRoot": Attr(
        _optional_string,
        None,
        (IMAGE,),
        {"type": ["string", "null"]},
        "bash, as namespace root, chrooted into the image",
    ),
    "diskSize": Attr(
        _int_range(1, 1 << 20), 1024, (IMAGE,), {"type": "integer", "minimum": 1}, "MiB runAsRoot may write"
    ),
    "buildVMMemorySize": Attr(
        _int_range(16, 1 << 20), 512, (IMAGE,), {"type": "integer", "minimum": 16}, "MiB of memory runAsRoot may use"
    ),
    "compressor": Attr(_choice(COMPRESSORS), "gz", BOTH, {"enum": list(COMPRESSORS)}, "none, gz or zstd"),
    "storeDir": Attr(_string, "/nix/store", BOTH, {"type": "string"}, "store directory"),
    "perms": Attr(
        _perms,
        (),
        BOTH,
        {"type": "array", "items": {"$ref": "#/$defs/permRule"}},
        "owner and mode rules for the entries of the new layers (path or regex; later rules win per field)",
    ),
}


def load_spec(path: Path, kind: str = LAYERED, env: dict[str, str] | None = None) -> Spec:
    env = dict(os.environ) if env is None else env
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)  # bounded: /dev/zero is a file too
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError("", f"{path}: larger than {MAX_SPEC_BYTES >> 20} MiB, not a spec")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SpecError("", f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError("", f"{path}: cannot read: {exc}") from None
    return parse_spec(parse_json_text(text, str(path)), path.resolve(), kind, env)


class _BigNumber(str):
    """A JSON number with more digits than any spec value can have (kept as text: int() of thousands
    of digits is refused by Python, and slow)."""


def _bad_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_text(text: str, where: str) -> Any:
    """The spec's JSON; syntax errors name the line and column, numbers too long to be a value and
    NaN/Infinity are refused, nesting deep enough to exhaust the parser is one line."""

    def number(digits: str) -> int | _BigNumber:
        return _BigNumber(digits) if len(digits) > MAX_INT_DIGITS else int(digits)

    try:
        return json.loads(text, parse_int=number, parse_constant=_bad_constant)
    except json.JSONDecodeError as exc:
        raise SpecError("", f"{where}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except RecursionError:
        raise SpecError("", f"{where}: invalid JSON: nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise SpecError("", f"{where}: invalid JSON: {exc}") from None


def _field_path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return config_field(parent, key) if parent else key  # config.Labels["org.example.a"], as imageconfig


def check_values(raw: Any) -> None:
    """Every value of the spec, whatever its attribute: not nested deeper than MAX_DEPTH, numbers that
    fit, strings without NUL bytes (no path, script or argument can carry one) or lone surrogates
    (they cannot be written out). Iterative: depth is what is being checked."""
    todo: list[tuple[str, Any, int]] = [("", raw, 0)]
    while todo:
        where, value, depth = todo.pop()
        field = where or "spec"
        if depth > MAX_DEPTH:
            raise SpecError(field, f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, _BigNumber):
            raise SpecError(field, f"a number of {len(value.lstrip('-'))} digits is out of range")
        if isinstance(value, str):
            _check_text(field, value)
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_text(_field_path(where, "<key>"), k)
                todo.append((_field_path(where, k), v, depth + 1))
        elif isinstance(value, list):
            todo.extend((_field_path(where, i), v, depth + 1) for i, v in enumerate(value))


def _check_text(field: str, value: str) -> None:
    if "\0" in value:
        raise SpecError(field, "contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(field, "contains a lone UTF-16 surrogate (not a character)") from None


def _check_attributes(raw: dict[str, Any], kind: str) -> None:
    """Every key is an attribute of this command, and the name is there."""
    for key in raw:
        attr = ATTRS.get(key)
        if attr is None:
            hint = difflib.get_close_matches(key, list(ATTRS), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpecError(key, f"unknown attribute{extra}")
        if kind not in attr.kinds:
            other = "nsbuild image (buildImage)" if IMAGE in attr.kinds else "nsbuild layered (buildLayeredImage)"
            raise SpecError(
                key, f"not a {'buildImage' if kind == IMAGE else 'buildLayeredImage'} attribute; it belongs to {other}"
            )
    if "name" not in raw:
        raise SpecError("name", "required")


def _default_date(env: dict[str, str]) -> tuple[int, bool]:
    """The date of `created` and `mtime` when the spec gives none: SOURCE_DATE_EPOCH, else DEFAULT_DATE."""
    epoch = env.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return parse_date("created", DEFAULT_DATE)
    # ASCII digits only ("²".isdigit() is true) and a date an image config can hold.
    if not re.fullmatch(r"[0-9]{1,12}", epoch) or int(epoch) > MAX_EPOCH:
        raise SpecError(
            "SOURCE_DATE_EPOCH", f"expected whole seconds since 1970 (at most {MAX_EPOCH}), got {epoch[:40]!r}"
        )
    return int(epoch), False


def _check_owner_and_store(values: dict[str, Any]) -> None:
    for key in ("uname", "gname"):
        if any(c in values[key] for c in ":\n\0") or not values[key]:
            raise SpecError(key, f"expected a user/group name without ':' or newlines, got {values[key]!r}")
    store_dir = values["storeDir"]
    check_path_text("storeDir", store_dir)
    if not store_dir.startswith("/") or store_dir.rstrip("/") == "":
        raise SpecError("storeDir", f"expected an absolute directory such as /nix/store, got {store_dir!r}")


def parse_spec(raw: Any, spec_path: Path, kind: str, env: dict[str, str]) -> Spec:
    if not isinstance(raw, dict):
        raise SpecError("", f"the spec must be a JSON object, got {_type_name(raw)}")
    check_values(raw)
    _check_attributes(raw, kind)
    ctx = Context(spec_path.parent, env)
    values: dict[str, Any] = {}
    for key, attr in ATTRS.items():
        if key in raw and raw[key] is not None:
            values[key] = attr.check(key, raw[key], ctx)
        else:
            values[key] = attr.default
    default_date = _default_date(env)
    created = parse_date("created", values["created"]) if values["created"] else default_date
    mtime = parse_date("mtime", values["mtime"]) if values["mtime"] else default_date
    _check_owner_and_store(values)
    architecture = values["architecture"] or host_architecture()
    if values["variant"] is not None and (problem := variant_problem(architecture, values["variant"])):
        raise SpecError("variant", problem)
    return Spec(
        kind=kind,
        spec_path=spec_path,
        name=values["name"],
        tag=values["tag"],
        from_image=values["fromImage"],
        from_image_name=values["fromImageName"],
        from_image_tag=values["fromImageTag"],
        contents=values["contents"],
        copy_to_root=values["copyToRoot"],
        keep_contents_dirlinks=values["keepContentsDirlinks"],
        config=values["config"],
        annotations=values["annotations"],
        architecture=architecture,
        created=created[0],
        mtime=mtime[0],
        uid=values["uid"],
        gid=values["gid"],
        uname=values["uname"],
        gname=values["gname"],
        max_layers=values["maxLayers"],
        extra_commands=values["extraCommands"],
        fake_root_commands=values["fakeRootCommands"],
        enable_fakechroot=values["enableFakechroot"],
        include_store_paths=values["includeStorePaths"],
        include_nix_db=values["includeNixDB"],
        run_as_root=values["runAsRoot"],
        disk_size=values["diskSize"],
        build_vm_memory_size=values["buildVMMemorySize"],
        compressor=values["compressor"],
        store_dir=os.path.normpath(values["storeDir"]),
        perms=values["perms"],
        raw=raw,
        variant=values["variant"],
    )


def json_schema(kind: str = LAYERED) -> dict[str, Any]:
    props = {k: {**a.schema, "description": a.doc} for k, a in ATTRS.items() if kind in a.kinds}
    path_item = {
        "oneOf": [
            {"type": "string"},
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["path"],
                "properties": {"path": {"type": "string"}, "target": {"type": "string"}},
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["tar"],
                "properties": {
                    "tar": {"type": "string"},
                    "target": {"type": "string"},
                    "keepMtime": {"type": "boolean"},
                },
            },
        ]
    }
    config_props = {
        k: {"type": v} if v != "array" else {"type": "array", "items": {"type": "string"}}
        for k, v in CONFIG_KEYS.items()
    }
    config_props["Healthcheck"] = healthcheck_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"nsbuild {kind} spec",
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": props,
        "$defs": {
            "paths": {"oneOf": [path_item, {"type": "array", "items": path_item}]},
            "config": {"type": "object", "additionalProperties": False, "properties": config_props},
            "permRule": _perm_rule_schema(),
        },
    }


def _perm_rule_schema() -> dict[str, Any]:
    mode = {"type": "string", "pattern": "^(0o)?[0-7]{1,6}$"}  # JSON numbers are decimal: refused
    ident = {"type": "integer", "minimum": 0, "maximum": 2**32 - 2}
    name = {"type": "string", "maxLength": 32}
    return {
        "type": "object",
        "additionalProperties": False,
        "oneOf": [{"required": ["path"]}, {"required": ["regex"]}],
        "properties": {
            "path": {"type": "string", "pattern": "^/"},
            "regex": {"type": "string", "minLength": 1},
            "uid": ident,
            "gid": ident,
            "uname": name,
            "gname": name,
            "mode": mode,
            "dirMode": mode,
        },
    }
