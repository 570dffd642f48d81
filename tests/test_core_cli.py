"""nsbuild schema, inspect (text and --json), stream into podman and into a closed pipe, progress."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
from support import nsbuild_cmd, podman_store, run_as, run_nsbuild
from support.core import BUSYBOX, EXAMPLE_SPEC, build, read_image, write_spec
from support.users import UserTmpFactory, is_root

LAYERED_ATTRS = {
    "annotations",  # nsbuild's own (OCI manifest annotations), not a dockerTools attribute
    "name",
    "tag",
    "fromImage",
    "contents",
    "config",
    "architecture",
    "variant",
    "perms",  # nsbuild's own (owner and mode rules applied as the tar is written)
    "created",
    "mtime",
    "uid",
    "gid",
    "uname",
    "gname",
    "maxLayers",
    "extraCommands",
    "fakeRootCommands",
    "enableFakechroot",
    "includeStorePaths",
    "includeNixDB",
    "compressor",
    "storeDir",
}
IMAGE_ONLY = {
    "fromImageName",
    "fromImageTag",
    "copyToRoot",
    "keepContentsDirlinks",
    "runAsRoot",
    "diskSize",
    "buildVMMemorySize",
}


def schema(kind: str = "layered") -> dict:
    proc = run_nsbuild(["schema", "--kind", kind])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_schema_is_valid_json_schema_naming_every_attribute() -> None:
    doc = schema()
    validator_cls = jsonschema.validators.validator_for(doc)
    validator_cls.check_schema(doc)
    assert set(doc["properties"]) == LAYERED_ATTRS
    for key, prop in doc["properties"].items():
        assert prop.get("description"), f"{key} has no description"
    image = schema("image")
    validator_cls.check_schema(image)
    assert set(image["properties"]) >= IMAGE_ONLY
    assert not IMAGE_ONLY & set(doc["properties"])


def test_schema_accepts_the_example_and_rejects_bad_specs() -> None:
    doc = schema()
    validator = jsonschema.validators.validator_for(doc)(doc)
    validator.validate(json.loads(EXAMPLE_SPEC.read_text()))
    validator.validate({"name": "x", "contents": "single", "config": {"ExposedPorts": {"80/tcp": {}}}})
    for bad in (
        {"name": "x", "maxLayer": 2},
        {"name": "x", "compressor": "gzip"},
        {"name": "x", "uid": -1},
        {"name": "x", "maxLayers": 1},
        {"name": "x", "architecture": "x86_64"},
        {"contents": []},
        {"name": "x", "config": {"cmd": []}},
        {"name": "x", "contents": [{"path": "a", "dest": "/"}]},
        {"name": "x", "includeStorePaths": "yes"},
        {"name": "x", "runAsRoot": "true"},
    ):
        assert list(validator.iter_errors(bad)), f"the schema accepts {bad}"


def test_schema_bad_kind() -> None:
    proc = run_nsbuild(["schema", "--kind", "nope"])
    assert proc.returncode == 2 and "--kind" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def inspected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("inspect")
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\n" * 10)
    (root / "bin" / "tool").chmod(0o4755)
    (root / "bin" / "alias").symlink_to("tool")
    os.link(root / "bin" / "tool", root / "bin" / "tool2")
    os.mkfifo(root / "pipe")
    (root / "x").write_text("x")
    os.setxattr(root / "x", "user.k", b"v")
    spec = write_spec(
        tmp,
        {
            "name": "insp",
            "tag": "t",
            "contents": ["rootfs"],
            "uid": 1000,
            "gid": 100,
            "uname": "app",
            "gname": "users",
            "architecture": "arm64",
            "config": {"Cmd": ["/bin/tool"], "User": "app", "Env": ["A=1"]},
        },
    )
    build(spec, tmp / "img.tar.gz")
    build(spec, f"oci:{tmp / 'layout'}:t")
    build(spec, f"oci-archive:{tmp / 'img.oci.tar'}:t")
    return tmp


def inspect_json(ref: str) -> dict:
    proc = run_nsbuild(["inspect", ref, "--json"])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "which", ["archive", "docker-archive-ref", "oci-ref", "oci-dir", "oci-archive", "oci-archive-ref"]
)
def test_inspect_json(inspected: Path, which: str) -> None:
    ref = {
        "archive": str(inspected / "img.tar.gz"),
        "docker-archive-ref": f"docker-archive:{inspected / 'img.tar.gz'}",
        "oci-ref": f"oci:{inspected / 'layout'}:t",
        "oci-dir": str(inspected / "layout"),
        "oci-archive": str(inspected / "img.oci.tar"),
        "oci-archive-ref": f"oci-archive:{inspected / 'img.oci.tar'}:t",
    }[which]
    report = inspect_json(ref)
    view = read_image(inspected / "img.tar.gz", inspected / f"view-{which}")
    assert report["config"]["architecture"] == "arm64"
    assert report["config"]["config"]["Cmd"] == ["/bin/tool"]
    assert [layer["diff_id"] for layer in report["layers"]] == view.config["rootfs"]["diff_ids"]
    entries = report["layers"][0]["entries"]
    # Same entries, same order as the tar itself.
    assert [e["path"].rstrip("/") for e in entries] == [m.name.rstrip("/") for m in view.layers[0]]
    by = {e["path"].rstrip("/"): e for e in entries}
    assert by["bin/tool"]["mode"] in ("4755", "04755") and by["bin/tool"]["type"] == "file"
    assert by["bin/tool"]["size"] == 100
    assert (by["bin/tool"]["uid"], by["bin/tool"]["gid"]) == (1000, 100)
    assert (by["bin/tool"]["uname"], by["bin/tool"]["gname"]) == ("app", "users")
    assert by["bin/alias"]["type"] == "symlink" and by["bin/alias"]["link"] == "tool"
    assert by["bin/tool2"]["type"] == "hardlink" and by["bin/tool2"]["link"] == "bin/tool"
    assert by["pipe"]["type"] == "fifo" and by["bin"]["type"] == "dir"
    assert "user.k" in by["x"].get("xattrs", [])
    for m in view.layers[0]:
        e = by[m.name.rstrip("/")]
        assert int(e["mode"], 8) == stat.S_IMODE(m.mode), m.name


def test_inspect_text(inspected: Path) -> None:
    proc = run_nsbuild(["inspect", str(inspected / "img.tar.gz")])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "architecture: arm64" in out
    lines = out.splitlines()
    tool = [line for line in lines if line.rstrip().endswith(" bin/tool") and "=>" not in line]
    assert len(tool) == 1 and "1000:100" in tool[0] and "app:users" in tool[0] and "4755" in tool[0]
    assert any("bin/alias -> tool" in line and "symlink" in line for line in lines)
    assert any("bin/tool2" in line and "bin/tool" in line and "hardlink" in line for line in lines)
    assert sum(1 for line in lines if line.startswith("layer ")) == 2


@pytest.mark.parametrize("what", ["missing", "not-an-image", "empty-dir"])
def test_inspect_errors(tmp_path: Path, what: str) -> None:
    target = tmp_path / what
    if what == "not-an-image":
        target.write_text("hello\n")
    elif what == "empty-dir":
        target.mkdir()
    proc = run_nsbuild(["inspect", str(target)])
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_inspect_an_unreadable_file_is_one_line(user_tmp: UserTmpFactory) -> None:
    """An I/O error nothing below turned into a BuildError reaches the one error handler: one line,
    exit 1, no traceback."""
    user = "test" if is_root() else None
    target = user_tmp(user) / "image.tar"
    target.write_bytes(b"")
    target.chmod(0)
    proc = run_nsbuild(["inspect", str(target)], user)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"nsbuild: error: {target}: Permission denied\n"


def _example(tmp_path: Path, **extra: object) -> Path:
    spec = json.loads(EXAMPLE_SPEC.read_text())
    spec["contents"] = [str(EXAMPLE_SPEC.parent / "rootfs"), {"path": str(BUSYBOX), "target": "/bin/busybox"}]
    spec.update(extra)
    return write_spec(tmp_path, spec)


def test_stream_into_podman_load(tmp_path: Path) -> None:
    spec = _example(tmp_path, tag="streamed")
    with podman_store() as ps:
        cmd = (
            f"{shlex.join([*nsbuild_cmd(), 'stream', str(spec), '--no-cache', '-q'])} | "
            f"{shlex.join([*ps.prefix, 'load'])}"
        )
        proc = run_as(["bash", "-o", "pipefail", "-c", cmd], env=ps.env, cwd=ps.dir)
        assert proc.returncode == 0, proc.stderr
        assert "nsbuild-example:streamed" in proc.stdout
        assert "hello from app" in ps.run("nsbuild-example:streamed")


def test_stream_into_a_closed_pipe(tmp_path: Path) -> None:
    spec = _example(tmp_path)
    cmd = f"{shlex.join([*nsbuild_cmd(), 'stream', str(spec), '--no-cache', '-q'])} | head -c 100 > /dev/null"
    proc = run_as(["bash", "-c", f'{cmd}; echo "status=${{PIPESTATUS[0]}}"'])
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() in ("status=1", "status=141"), proc.stdout
    assert len(proc.stderr.splitlines()) <= 1, proc.stderr


def test_stream_refuses_a_terminal_and_takes_no_output_option(tmp_path: Path) -> None:
    spec = _example(tmp_path)
    proc = run_nsbuild(["stream", str(spec), "-o", str(tmp_path / "x.tar")])
    assert proc.returncode == 2 and not (tmp_path / "x.tar").exists()


def test_progress_on_stderr_and_quiet(tmp_path: Path) -> None:
    spec = _example(tmp_path)
    loud = run_nsbuild(["layered", str(spec), "-o", str(tmp_path / "a.tar"), "--no-cache"])
    assert loud.returncode == 0 and loud.stdout == ""
    assert "[1/3]" in loud.stderr and "[3/3]" in loud.stderr and "customisation" in loud.stderr
    quiet = run_nsbuild(["layered", str(spec), "-o", str(tmp_path / "b.tar"), "--no-cache", "-q"])
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
    as_json = run_nsbuild(["layered", str(spec), "-o", str(tmp_path / "c.tar"), "--no-cache", "--json"])
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["output"] == str(tmp_path / "c.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes() == (tmp_path / "c.tar").read_bytes()


def test_python_dash_m_works(tmp_path: Path) -> None:
    py = Path(nsbuild_cmd()[0]).with_name("python")
    proc = subprocess.run([str(py), "-m", "nsbuild", "schema"], capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["properties"]
