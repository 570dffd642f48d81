"""The contracts across the sandbox's process boundaries (nsbuild.sandbox.job): the typed job,
outcome and stage1 configuration read and write the very JSON the processes exchange, and a key one
side does not know is an error, never silently dropped or defaulted. Also the backends' table."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from nsbuild.sandbox.backends import BACKENDS, MODE, REGISTRY, USES_FAKEROOT
from nsbuild.sandbox.job import SandboxJob, SandboxOutcome, Stage1Config, WireError

INNER = Path(__file__).resolve().parent.parent / "nsbuild" / "sandbox" / "inner.py"


def wire_job(**changes: Any) -> dict[str, Any]:
    """A job as nsbuild.rootfs.customize writes it (keys in its order)."""
    wire: dict[str, Any] = {
        "work": "/tmp/ws/fr-abc",
        "custom_root": "/tmp/ws/fr-abc/custom-in",
        "lower": [["/tmp/ws/layer0", "/"], ["/nix/store/aaa-hello", "/nix/store/aaa-hello"]],
        "base_layers": ["/tmp/ws/base/0.tar", "/tmp/ws/base/1.tar.gz"],
        "script": "chown 1000:1000 /home/alice\n",
        "chroot": True,
        "engine": "overlay",
        "network": "none",
        "out": "/tmp/ws/custom.tar.part",
        "mtime": 1,
        "result": "/tmp/ws/fr-abc/result.json",
        "root_owner": {"uid": 0, "gid": 0, "uname": "root", "gname": "root"},
        "env": {"PATH": "/usr/bin:/bin", "HOME": "/tmp/ws/home"},
        "in_ns": True,
        "scratch_mib": 1024,
        "memory_mib": None,
        "tmp": True,
        "strict": True,
        "tail": True,
        "after_script": "echo after\n",
        "after_env": None,
        "store_dir": "/nix/store",
        "what": "runAsRoot",
        "caller_ids": [1001, 1001],
        "hide": ["/home/builder"],
        "perms": [{"path": "/home/alice", "uid": 1000, "mode": "3000"}, {"regex": "/usr/bin/.*", "dirMode": "0755"}],
    }
    wire.update(changes)
    return wire


def read_by_inner() -> set[str]:
    """The job attributes inner.py reads (`job.<name>`, wherever a SandboxJob is called job there)."""
    names = set()
    for node in ast.walk(ast.parse(INNER.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "job":
            names.add(node.attr)
    return names


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"env": None, "caller_ids": None, "scratch_mib": None, "store_dir": None, "hide": [], "lower": []},
        {"engine": "copy", "chroot": False, "after_env": {"PATH": "/bin"}, "memory_mib": 512, "what": "x"},
    ],
)
def test_job_round_trips_to_the_same_json(changes: dict[str, Any]) -> None:
    wire = wire_job(**changes)
    job = SandboxJob.from_wire(json.loads(json.dumps(wire)))
    assert json.dumps(job.to_wire()) == json.dumps(wire)  # same keys, values and order


def test_job_keys_are_exactly_what_the_inner_process_reads() -> None:
    keys = {f.name for f in fields(SandboxJob)}
    assert set(wire_job()) == keys
    # No key on the wire that the inner process never reads, none it reads that is not sent.
    assert read_by_inner() == keys


def test_job_attributes_are_typed() -> None:
    job = SandboxJob.from_wire(wire_job())
    assert job.work == Path("/tmp/ws/fr-abc")
    assert job.base_layers == (Path("/tmp/ws/base/0.tar"), Path("/tmp/ws/base/1.tar.gz"))
    assert job.lower[1] == ("/nix/store/aaa-hello", "/nix/store/aaa-hello")
    assert (job.root_owner.uid, job.root_owner.gname) == (0, "root")
    assert job.caller_ids == (1001, 1001)


def test_job_with_a_missing_key_is_refused_by_name() -> None:
    wire = wire_job()
    del wire["after_script"], wire["hide"]
    with pytest.raises(WireError, match=r"^sandbox job: missing after_script, hide$"):
        SandboxJob.from_wire(wire)


def test_job_with_an_unknown_key_is_refused_by_name() -> None:
    with pytest.raises(WireError, match=r"^sandbox job: unknown scratch_gib$"):
        SandboxJob.from_wire(wire_job(scratch_gib=1))
    owner = {"uid": 0, "gid": 0, "uname": "root"}
    with pytest.raises(WireError, match=r"^sandbox job: root_owner: missing gname$"):
        SandboxJob.from_wire(wire_job(root_owner=owner))


TIMINGS = {"prepare": 0.25, "script": 1.5}


@pytest.mark.parametrize(
    "wire",
    [
        {
            "status": "ok",
            "stats": {"diff_id": "sha256:" + "0" * 64, "size": 10240, "entries": 7},
            "engine": "copy",
            "timings": {**TIMINGS, "write": 0.1},
        },
        {"status": "script", "code": 3, "tail": ["line 1", "oops"], "full": False, "timings": TIMINGS},
        {"status": "script", "code": 1, "tail": [], "full": True, "timings": TIMINGS},
        {"status": "after", "code": 2, "tail": [], "timings": TIMINGS},
        {"status": "hostile", "message": "fromImage layer 0: 'a/../b' contains '..'", "timings": {}},
        {"status": "error", "message": "No space left on device", "full": True, "timings": TIMINGS},
        {"status": "error", "message": "chown to an id fakeroot cannot record", "timings": {}},
        {"status": "error", "timings": {}},  # interrupted before any step could report
    ],
)
def test_outcome_round_trips_to_the_same_json(wire: dict[str, Any]) -> None:
    outcome = SandboxOutcome.from_wire(json.loads(json.dumps(wire)))
    assert json.dumps(outcome.to_wire()) == json.dumps(wire)


def test_outcome_attributes_are_typed() -> None:
    ok = SandboxOutcome.from_wire(
        {"status": "ok", "stats": {"diff_id": "sha256:ab", "size": 3, "entries": 1}, "engine": "overlay", "timings": {}}
    )
    assert ok.stats is not None and (ok.stats.diff_id, ok.stats.size, ok.stats.entries) == ("sha256:ab", 3, 1)
    failed = SandboxOutcome.from_wire({"status": "script", "code": 4, "tail": ["x"], "full": False, "timings": {}})
    assert (failed.code, failed.tail, failed.full, failed.message) == (4, ("x",), False, None)


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        ({"status": "done", "timings": {}}, r"^sandbox outcome: unknown status 'done'$"),
        ({"timings": {}}, r"^sandbox outcome: unknown status None$"),
        ({"status": "script", "code": 1, "tail": [], "timings": {}}, r"^sandbox outcome: missing full$"),
        ({"status": "hostile", "message": "m"}, r"^sandbox outcome: missing timings$"),
        ({"status": "after", "code": 1, "tail": [], "full": True, "timings": {}}, r"^sandbox outcome: unknown full$"),
        (
            {"status": "ok", "stats": {"diff_id": "d", "size": 1}, "engine": "copy", "timings": {}},
            r"^sandbox outcome: stats: missing entries$",
        ),
    ],
)
def test_outcome_with_wrong_keys_is_refused(wire: dict[str, Any], error: str) -> None:
    with pytest.raises(WireError, match=error):
        SandboxOutcome.from_wire(wire)


STAGE1_WIRE: dict[str, Any] = {
    "mode": "userns",
    "network": "none",
    "ready_fd": 5,
    "go_fd": 6,
    "argv": ["bash", "-e", "-c", "true"],
    "env": {"PATH": "/usr/bin:/bin"},
    "cwd": None,
    "parent": 4242,
    "umask": None,
}


@pytest.mark.parametrize("changes", [{}, {"mode": "self", "network": "host", "env": None, "cwd": "/w", "umask": 18}])
def test_stage1_config_round_trips_to_the_same_json(changes: dict[str, Any]) -> None:
    wire = {**STAGE1_WIRE, **changes}
    cfg = Stage1Config.from_wire(json.loads(json.dumps(wire)))
    assert json.dumps(cfg.to_wire()) == json.dumps(wire)
    assert cfg.argv[0] == "bash"


def test_stage1_config_with_wrong_keys_is_refused() -> None:
    with pytest.raises(WireError, match=r"^stage1 configuration: unknown lo$"):
        Stage1Config.from_wire({**STAGE1_WIRE, "lo": True})
    wire = dict(STAGE1_WIRE)
    del wire["parent"]
    with pytest.raises(WireError, match=r"^stage1 configuration: missing parent$"):
        Stage1Config.from_wire(wire)


def test_backends_in_the_order_auto_tries_them() -> None:
    assert BACKENDS == ("userns", "userns-fakeroot", "fakeroot") == tuple(b.name for b in REGISTRY)
    assert MODE == {"userns": "userns", "userns-fakeroot": "single", "fakeroot": "self"}
    assert USES_FAKEROOT == {"userns": False, "userns-fakeroot": True, "fakeroot": True}
