"""What crosses a process boundary into and out of the sandbox, as typed values.

SandboxJob / SandboxOutcome: the parent writes a SandboxJob as JSON to a file and starts
`python -m nsbuild.sandbox.inner JOB.json` in the sandbox; the inner process writes a SandboxOutcome
as JSON to `job.result`. Stage1Config: what nsbuild.sandbox.runner hands nsbuild.sandbox.stage1.
Both sides go through to_wire/from_wire, which write and read plain JSON values (the dicts the
processes have always exchanged: the same keys, the same values, in the same order); a key one side
does not know, or one it misses, is a WireError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from nsbuild.core.perms import PermRule, parse_perms
from nsbuild.tar.owners import Owner

Engine = Literal["overlay", "copy"]
Mode = Literal["userns", "single", "self", "none"]  # how stage1 enters its namespaces
Status = Literal["ok", "script", "after", "hostile", "error"]


class WireError(ValueError):
    """A job or outcome on the wire does not have the keys the other side expects."""


def _check_keys(what: str, wire: Mapping[str, Any], required: set[str], allowed: set[str]) -> None:
    missing = sorted(required - wire.keys())
    unknown = sorted(wire.keys() - allowed)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else []
        )
        raise WireError(f"{what}: {'; '.join(parts)}")


def _opt_dict(value: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(value) if value is not None else None


@dataclass(frozen=True)
class SandboxJob:
    """What the inner process does; its fields are the wire keys (nsbuild.rootfs.customize describes
    the parameters they come from).

    lower: (host, target) pairs placed over the base layers (fromImage layer tars, in order);
    engine: "overlay" or "copy" (copy-and-diff); in_ns: the backend has namespaces; scratch_mib:
    writable space on a tmpfs of that size (namespaces only); memory_mib: RLIMIT_AS of each script
    process; tmp / strict / tail: runAsRoot's /tmp, refusal of base-layer devices and kept output;
    what: "fakeRootCommands" | "runAsRoot", as messages name the script; caller_ids: the fakeroot
    backend's caller (uid, gid), whose ids become root; hide: directories out of sight for scripts;
    perms: the spec's owner and mode rules, applied as the layer is written."""

    work: Path
    custom_root: Path
    lower: tuple[tuple[str, str], ...]
    base_layers: tuple[Path, ...]
    script: str
    chroot: bool
    engine: Engine
    network: str
    out: Path
    mtime: int
    result: Path
    root_owner: Owner
    env: Mapping[str, str] | None
    in_ns: bool
    scratch_mib: int | None
    memory_mib: int | None
    tmp: bool
    strict: bool
    tail: bool
    after_script: str
    after_env: Mapping[str, str] | None
    store_dir: str | None
    what: str
    caller_ids: tuple[int, int] | None
    hide: tuple[str, ...]
    perms: tuple[PermRule, ...]

    def to_wire(self) -> dict[str, Any]:
        o = self.root_owner
        return {
            "work": str(self.work),
            "custom_root": str(self.custom_root),
            "lower": [[host, target] for host, target in self.lower],
            "base_layers": [str(p) for p in self.base_layers],
            "script": self.script,
            "chroot": self.chroot,
            "engine": self.engine,
            "network": self.network,
            "out": str(self.out),
            "mtime": self.mtime,
            "result": str(self.result),
            "root_owner": {"uid": o.uid, "gid": o.gid, "uname": o.uname, "gname": o.gname},
            "env": _opt_dict(self.env),
            "in_ns": self.in_ns,
            "scratch_mib": self.scratch_mib,
            "memory_mib": self.memory_mib,
            "tmp": self.tmp,
            "strict": self.strict,
            "tail": self.tail,
            "after_script": self.after_script,
            "after_env": _opt_dict(self.after_env),
            "store_dir": self.store_dir,
            "what": self.what,
            "caller_ids": list(self.caller_ids) if self.caller_ids is not None else None,
            "hide": list(self.hide),
            "perms": [rule.to_json() for rule in self.perms],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> SandboxJob:
        names = {f.name for f in fields(cls)}
        _check_keys("sandbox job", wire, names, names)
        o = wire["root_owner"]
        _check_keys("sandbox job: root_owner", o, {"uid", "gid", "uname", "gname"}, {"uid", "gid", "uname", "gname"})
        ids = wire["caller_ids"]
        typed = {
            "work": Path(wire["work"]),
            "custom_root": Path(wire["custom_root"]),
            "lower": tuple((host, target) for host, target in wire["lower"]),
            "base_layers": tuple(Path(p) for p in wire["base_layers"]),
            "out": Path(wire["out"]),
            "result": Path(wire["result"]),
            "root_owner": Owner(o["uid"], o["gid"], o["uname"], o["gname"]),
            "caller_ids": (ids[0], ids[1]) if ids is not None else None,
            "hide": tuple(wire["hide"]),
            "perms": parse_perms("sandbox job: perms", wire["perms"]),
        }
        return cls(**{**wire, **typed})


@dataclass(frozen=True)
class LayerStats:
    """The customisation layer the inner process wrote (uncompressed tar)."""

    diff_id: str
    size: int
    entries: int

    def to_wire(self) -> dict[str, Any]:
        return {"diff_id": self.diff_id, "size": self.size, "entries": self.entries}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> LayerStats:
        keys = {"diff_id", "size", "entries"}
        _check_keys("sandbox outcome: stats", wire, keys, keys)
        return cls(wire["diff_id"], wire["size"], wire["entries"])


# Which keys each status carries besides status and timings, in their wire order.
_OUTCOME_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # status → (required, optional)
    "ok": (("stats", "engine"), ()),
    "script": (("code", "tail", "full"), ()),
    "after": (("code", "tail"), ()),
    "hostile": (("message",), ()),
    "error": ((), ("message", "full")),
}
_WIRE_ORDER = ("code", "tail", "message", "full", "stats", "engine")


@dataclass(frozen=True)
class SandboxOutcome:
    """How the inner process ended. ok: the layer is written (stats, engine). script / after: the script
    (or runAsRoot's extraCommands) failed with `code`, `tail` its last output lines (when kept), `full`
    its diskSize space was full. hostile: a base layer was refused (`message`). error: anything else
    (`message`; `full` when it was ENOSPC)."""

    status: Status
    code: int | None = None
    tail: tuple[str, ...] | None = None
    message: str | None = None
    full: bool | None = None
    stats: LayerStats | None = None
    engine: Engine | None = None
    timings: Mapping[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "code": self.code,
            "tail": list(self.tail) if self.tail is not None else None,
            "message": self.message,
            "full": self.full,
            "stats": self.stats.to_wire() if self.stats is not None else None,
            "engine": self.engine,
        }
        # A key the status does not carry is absent (None), never null on the wire.
        return {"status": self.status, **{k: values[k] for k in _WIRE_ORDER if values[k] is not None}} | {
            "timings": dict(self.timings)
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> SandboxOutcome:
        status = wire.get("status")
        if status not in _OUTCOME_KEYS:
            raise WireError(f"sandbox outcome: unknown status {status!r}")
        required, optional = _OUTCOME_KEYS[status]
        _check_keys(
            "sandbox outcome", wire, {"status", "timings", *required}, {"status", "timings", *required, *optional}
        )
        tail = wire.get("tail")
        stats = wire.get("stats")
        return cls(
            status=status,
            code=wire.get("code"),
            tail=tuple(tail) if tail is not None else None,
            message=wire.get("message"),
            full=wire.get("full"),
            stats=LayerStats.from_wire(stats) if stats is not None else None,
            engine=wire.get("engine"),
            timings=dict(wire["timings"]),
        )


@dataclass(frozen=True)
class Stage1Config:
    """What nsbuild.sandbox.runner tells stage1 (over a pipe: a command line is world-readable).

    mode: "userns" (full id map written by the parent through newuidmap/newgidmap), "single" (one
    id: stage1 maps itself), "self" (the caller's own ids mapped onto themselves + pid and mount
    namespaces; "none" where no user namespace can be made), "none" (no namespaces).
    network: "none" (an own network namespace, lo up) or "host". ready_fd, go_fd: pipe ends for the
    id-map handshake (mode "userns"). argv, env (None: stage1's own), cwd: the command. parent: the
    pid of the process that started stage1. umask: the command's umask (None: inherited)."""

    mode: Mode
    network: str
    ready_fd: int
    go_fd: int
    argv: tuple[str, ...]
    env: Mapping[str, str] | None
    cwd: str | None
    parent: int
    umask: int | None

    def to_wire(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "network": self.network,
            "ready_fd": self.ready_fd,
            "go_fd": self.go_fd,
            "argv": list(self.argv),
            "env": _opt_dict(self.env),
            "cwd": self.cwd,
            "parent": self.parent,
            "umask": self.umask,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Stage1Config:
        names = {f.name for f in fields(cls)}
        _check_keys("stage1 configuration", wire, names, names)
        return cls(**{**wire, "argv": tuple(wire["argv"])})
