"""The spec's image `config`, checked against the Docker Image Spec v1.3 / OCI image config before anything
is built, so nsbuild never writes an image that docker or podman refuses to load or to run (issue 10).

spec.py has already checked each key's JSON type; this module checks what the values mean, converts Go
duration strings ("30s") in `Healthcheck` to the integer nanoseconds the spec requires, and names the
field of the first problem in a SpecError (exit 2, one line).
"""

from __future__ import annotations

import difflib
import json
import re
from fractions import Fraction
from typing import Any

from nsbuild.errors import SpecError

INT64_MAX = 2**63 - 1  # Go's time.Duration and int: larger values do not load
# dockerd refuses a nonzero healthcheck duration under 1 ms when it is given on `docker run`; in an image
# such a value loads but makes the probe loop without pause, so nsbuild holds images to the same floor.
MIN_DURATION_NS = 1_000_000
HEALTHCHECK_DURATIONS = ("Interval", "Timeout", "StartPeriod", "StartInterval")
HEALTHCHECK_KEYS = ("Test", *HEALTHCHECK_DURATIONS, "Retries")
DURATION_EXPECTED = (
    'expected a duration in nanoseconds (integer) or a Go duration string such as "30s", "1m30s" or "300ms"'
)
# Go's time.ParseDuration units, in nanoseconds (both spellings of micro).
_UNITS = {
    "ns": 1,
    "us": 10**3,
    "\u00b5s": 10**3,
    "\u03bcs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
# Linux signal names as docker and podman parse them (upper-cased, "SIG" optional); numbers 1..64.
_SIGNALS = frozenset(
    [
        "ABRT",
        "ALRM",
        "BUS",
        "CHLD",
        "CLD",
        "CONT",
        "FPE",
        "HUP",
        "ILL",
        "INT",
        "IO",
        "IOT",
        "KILL",
        "PIPE",
        "POLL",
        "PROF",
        "PWR",
        "QUIT",
        "SEGV",
        "STKFLT",
        "STOP",
        "SYS",
        "TERM",
        "TRAP",
        "TSTP",
        "TTIN",
        "TTOU",
        "URG",
        "USR1",
        "USR2",
        "VTALRM",
        "WINCH",
        "XCPU",
        "XFSZ",
        "RTMIN",
        "RTMAX",
    ]
    + [f"RTMIN+{i}" for i in range(1, 16)]
    + [f"RTMAX-{i}" for i in range(1, 15)]
)
MAX_SIGNAL = 64
MAX_DURATION_TEXT = 100
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_+-]+(?:/[a-z]+)?")
_PORT = re.compile(r"([0-9]{1,5})(?:/(tcp|udp|sctp))?")
_USER_PART = re.compile(r"[^:\s]+")
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to setuid: not an id a process can run as


def field(key: str, name: str) -> str:
    """`key.name` for messages; any other name (a path, a dotted label, one that would break the
    one-line message) is quoted as JSON: config.Volumes["/data"]."""
    plain = _PLAIN_NAME.fullmatch(name) is not None
    return f"{key}.{name}" if plain else f"{key}[{json.dumps(name)}]"


def healthcheck_schema() -> dict[str, Any]:
    """The JSON Schema of `config.Healthcheck` for `nsbuild schema` (durations: nanoseconds or Go strings)."""
    duration = {
        "type": ["integer", "string", "null"],
        "minimum": 0,
        "description": 'nanoseconds, or a Go duration string such as "30s" (0: the default; else >= 1ms)',
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "Test": {
                "type": ["array", "null"],
                "items": {"type": "string"},
                "description": '[], ["NONE"], ["CMD", argv...] or ["CMD-SHELL", command]',
            },
            **{name: duration for name in HEALTHCHECK_DURATIONS},
            "Retries": {"type": ["integer", "null"], "minimum": 0},
        },
    }


def _show(value: Any) -> str:
    """The offending value for a one-line message: JSON (ASCII, so no character a reader takes for a line
    break), cut short when long."""
    try:
        text = json.dumps(value)
    except (ValueError, RecursionError):
        return "a value too large to show"
    return text if len(text) <= 60 else text[:57] + "..."


def parse_go_duration(text: str) -> int | None:
    """Go's time.ParseDuration without a sign: "1m30s", "1.5h", "300ms", "2us" → whole nanoseconds
    (exact decimal arithmetic, fractions of a nanosecond dropped); None when `text` is not one."""
    if text == "0":
        return 0
    if len(text) > MAX_DURATION_TEXT:
        return None  # no valid duration is this long; and a huge digit string would not convert
    total = Fraction(0)
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or not any(c.isdigit() for c in match.group(1)):
            return None
        total += Fraction(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return int(total) if text else None


def _duration(key: str, value: Any) -> int:
    if isinstance(value, str):
        if value.startswith("-"):
            raise SpecError(key, f"a duration cannot be negative, got {_show(value)}")
        ns = parse_go_duration(value)
        if ns is None:
            raise SpecError(key, f"{DURATION_EXPECTED}, got {_show(value)}")
    elif isinstance(value, int) and not isinstance(value, bool):
        ns = value
    else:
        # A float (30000000000.0, 3e10) or a boolean does not decode into Go's integer Duration either.
        raise SpecError(key, f"{DURATION_EXPECTED}, got {_show(value)}")
    if ns < 0:
        raise SpecError(key, f"a duration cannot be negative, got {_show(value)}")
    if ns > INT64_MAX:
        raise SpecError(key, f"at most {INT64_MAX} nanoseconds (about 292 years), got {_show(value)}")
    if 0 < ns < MIN_DURATION_NS:
        hint = f' (nanoseconds; did you mean "{value}s"?)' if isinstance(value, int) else f" (= {ns} ns)"
        raise SpecError(key, f"expected 0 (the default) or at least 1ms (1000000 ns), got {_show(value)}{hint}")
    return ns


def _healthcheck_test(key: str, value: Any) -> list[str]:
    example = '["CMD-SHELL", "curl -f http://localhost/ || exit 1"] or ["CMD", "/bin/check", "--quick"]'
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise SpecError(key, f"expected a list of strings such as {example}, got {_show(value)}")
    if not value:
        return value  # [] inherits the base image's check
    kind, args = value[0], value[1:]
    if kind == "NONE" and args:
        raise SpecError(key, f'["NONE"] (no check) takes no arguments, got {_show(value)}')
    if kind == "CMD" and not args:
        raise SpecError(key, f'"CMD" needs the command and its arguments after it, got {_show(value)}')
    if kind == "CMD-SHELL" and len(args) != 1:
        raise SpecError(
            key,
            f'"CMD-SHELL" takes exactly one shell command string (use "CMD" for an argument list), got {_show(value)}',
        )
    if kind not in ("NONE", "CMD", "CMD-SHELL"):
        raise SpecError(f"{key}[0]", f'expected "NONE", "CMD" or "CMD-SHELL" (as in {example}), got {_show(kind)}')
    return value


def _retries(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise SpecError(key, f"expected a whole number of consecutive failures, 0 or more, got {_show(value)}")
    return value


def check_healthcheck(key: str, value: dict[str, Any]) -> dict[str, Any]:
    """Test, durations (converted to nanoseconds) and Retries; unknown keys are refused, as Go would
    silently drop them (and match "interval" to Interval without saying so)."""
    out: dict[str, Any] = {}
    for name, item in value.items():
        sub = field(key, name)
        if name not in HEALTHCHECK_KEYS:
            hint = difflib.get_close_matches(name, HEALTHCHECK_KEYS, n=1) or [
                k for k in HEALTHCHECK_KEYS if k.lower() == name.lower()
            ]
            extra = f" (did you mean {hint[0]!r}?)" if hint else f"; known: {', '.join(HEALTHCHECK_KEYS)}"
            raise SpecError(sub, f"unknown Healthcheck key{extra}")
        if item is None:
            out[name] = item  # JSON null decodes to the zero value: the default
        elif name == "Test":
            out[name] = _healthcheck_test(sub, item)
        elif name == "Retries":
            out[name] = _retries(sub, item)
        else:
            out[name] = _duration(sub, item)
    return out


def check_stop_signal(key: str, value: str) -> str:
    """A name (SIGTERM, TERM, sigterm, SIGRTMIN+3) or a number 1..64, as docker and podman parse it."""
    if value == "":
        return value  # unset: the runtime's default (SIGTERM)
    if re.fullmatch(r"[0-9]+", value):
        if 1 <= int(value) <= MAX_SIGNAL:
            return value
        raise SpecError(key, f"expected a signal number from 1 to {MAX_SIGNAL}, got {_show(value)}")
    name = value.upper()
    if value.isascii() and name.removeprefix("SIG") in _SIGNALS:
        return value
    raise SpecError(
        key,
        f"expected a signal name such as SIGTERM, TERM or SIGRTMIN+3, or a number from 1 to "
        f"{MAX_SIGNAL}, got {_show(value)}",
    )


def check_user(key: str, value: str) -> str:
    """user, uid, user:group or uid:gid (either side a name or a number)."""
    if value == "":
        return value  # unset: root
    parts = value.split(":")
    if len(parts) > 2 or not all(_USER_PART.fullmatch(p) for p in parts):
        raise SpecError(key, f'expected "user", "uid", "user:group" or "uid:gid" (no spaces), got {_show(value)}')
    for part in parts:
        if part.isascii() and part.isdigit() and int(part) > MAX_ID:
            raise SpecError(key, f"ids go up to {MAX_ID}, got {_show(value)}")
    return value


def _absolute(key: str, value: str, what: str) -> None:
    if not value.startswith("/"):
        raise SpecError(key, f"expected an absolute {what} such as /data, got {_show(value)}")


def _empty_objects(key: str, value: dict[str, Any]) -> None:
    for name, item in value.items():
        if item not in (None, {}):
            raise SpecError(field(key, name), f"expected {{}} (the value carries nothing), got {_show(item)}")


def check_exposed_ports(key: str, value: dict[str, Any]) -> dict[str, Any]:
    """Keys "80", "80/tcp", "53/udp" or "132/sctp" (one port from 1 to 65535 each); values {}."""
    _empty_objects(key, value)
    for name in value:
        match = _PORT.fullmatch(name)
        if match is None or not 1 <= int(match.group(1)) <= 65535:
            raise SpecError(
                field(key, name),
                "expected one port from 1 to 65535, optionally with /tcp, /udp or "
                '/sctp, such as "80", "80/tcp" or "53/udp"',
            )
    return {name: {} for name in value}


def check_volumes(key: str, value: dict[str, Any]) -> dict[str, Any]:
    _empty_objects(key, value)
    for name in value:
        _absolute(field(key, name), name, "directory in the container")
    return {name: {} for name in value}


def _no_nul(key: str, value: Any) -> None:
    """No NUL byte in any string: argv, environment and paths are C strings (runc refuses the container)."""
    if isinstance(value, str):
        if "\0" in value:
            raise SpecError(key, "a NUL byte is not allowed here")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _no_nul(f"{key}[{i}]", item)
    elif isinstance(value, dict):
        for name, item in value.items():
            _no_nul(field(key, name), name)
            _no_nul(field(key, name), item)


def check_image_config(key: str, config: dict[str, Any]) -> dict[str, Any]:
    """The meaning of each config value (types are already checked); returns the config to write."""
    out = dict(config)
    for name, value in config.items():
        sub = field(key, name)
        if name == "Healthcheck":
            out[name] = check_healthcheck(sub, value)
        elif name == "StopSignal":
            check_stop_signal(sub, value)
        elif name == "User":
            check_user(sub, value)
        elif name == "WorkingDir" and value != "":
            _absolute(sub, value, "directory")
        elif name == "ExposedPorts":
            out[name] = check_exposed_ports(sub, value)
        elif name == "Volumes":
            out[name] = check_volumes(sub, value)
        _no_nul(sub, out[name])
    return out


def healthcheck_warning(config: bytes, output_format: str, manifest_format: str) -> str | None:
    """A Healthcheck is Docker-only: OCI image configs have no such field and podman drops it from an OCI
    image. The warning names the nsbuild option that keeps it."""
    if output_format in ("oci-dir", "oci-archive"):
        keep = "write a docker-archive instead (--format docker-archive, or -o docker-archive:PATH)"
    elif output_format == "registry" and manifest_format == "oci":
        keep = "push a Docker v2 manifest instead (--manifest-format docker)"
    else:
        return None
    doc = json.loads(config)  # nsbuild's own config, or a base image's that was read as JSON already
    inner = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(inner, dict) or not inner.get("Healthcheck"):
        return None
    return (
        f"config.Healthcheck: OCI image configs have no Healthcheck and podman ignores it in this "
        f"{'image' if output_format == 'registry' else output_format}; to keep it, {keep}"
    )
