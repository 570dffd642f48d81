"""Bad specs (exit 2, one line naming the field), failing scripts (exit 1 with their output), atomic
output and interrupts (no partial file, no temporary tree, no stray process)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from support import UserTmpFactory, account, is_root, popen_nsbuild, processes_of, run_nsbuild
from support.core import BUILD_FLAGS, build, write_spec

# (spec overrides, field named in the message, a fragment of the message)
BAD_SPECS: list[tuple[str, dict[str, Any] | Any, str, str]] = [
    ("unknown-key", {"maxLayer": 3}, "maxLayer", "did you mean 'maxLayers'"),
    ("unknown-key-2", {"extraCommand": "true"}, "extraCommand", "did you mean 'extraCommands'"),
    ("name-missing", {"name": None}, "name", "required"),
    ("name-type", {"name": 5}, "name", "string"),
    ("name-invalid", {"name": "Bad Name!"}, "name", "not a valid image name"),
    ("name-colon", {"name": "foo:bar"}, "name", "not a valid image name"),
    ("tag-invalid", {"tag": "-dash"}, "tag", "not a valid tag"),
    ("tag-type", {"tag": 1}, "tag", "string"),
    ("tag-colon", {"tag": "a:b"}, "tag", "not a valid tag"),
    ("compressor", {"compressor": "gzip"}, "compressor", "did you mean 'gz'"),
    ("compressor-type", {"compressor": True}, "compressor", "string"),
    ("architecture", {"architecture": "x86_64"}, "architecture", "amd64"),
    ("created", {"created": "yesterday"}, "created", "ISO-8601"),
    ("created-month", {"created": "2020-13-01T00:00:00Z"}, "created", "ISO-8601"),
    ("created-1960", {"created": "1960-01-01T00:00:00Z"}, "created", "1970"),
    ("mtime-type", {"mtime": 5}, "mtime", "got a number"),
    ("uid-negative", {"uid": -1}, "uid", "-1"),
    ("gid-negative", {"gid": -5}, "gid", "-5"),
    ("uid-string", {"uid": "0"}, "uid", "got a string"),
    ("uid-float", {"uid": 1.5}, "uid", "whole number"),
    ("uid-bool", {"uid": True}, "uid", "whole number"),
    ("uname", {"uname": "a:b"}, "uname", "':'"),
    ("maxLayers-1", {"maxLayers": 1}, "maxLayers", "2"),
    ("maxLayers-0", {"maxLayers": 0}, "maxLayers", "2"),
    ("maxLayers-big", {"maxLayers": 1000}, "maxLayers", "125"),
    ("contents-missing", {"contents": ["rootfs", "./app"]}, "contents[1]", "no such file or directory: ./app"),
    ("contents-obj-missing", {"contents": [{"path": "nope", "target": "/x"}]}, "contents[0].path", "nope"),
    ("contents-target", {"contents": [{"path": "rootfs", "target": "rel"}]}, "contents[0].target", "absolute"),
    ("contents-dotdot", {"contents": [{"path": "rootfs", "target": "/a/../b"}]}, "contents[0].target", ".."),
    ("contents-type", {"contents": 5}, "contents", "list"),
    ("contents-obj-key", {"contents": [{"path": "rootfs", "dest": "/"}]}, "contents[0]", "dest"),
    ("config-type", {"config": "x"}, "config", "object"),
    ("config-key", {"config": {"cmd": ["a"]}}, "config.cmd", "did you mean 'Cmd'"),
    ("config-env", {"config": {"Env": ["NOEQUALS"]}}, "config.Env[0]", "NAME=value"),
    ("config-cmd-type", {"config": {"Cmd": "echo"}}, "config.Cmd", "list of strings"),
    ("bool-type", {"includeStorePaths": "yes"}, "includeStorePaths", "true or false"),
    ("extra-type", {"extraCommands": ["echo"]}, "extraCommands", "string"),
    ("buildImage-only", {"runAsRoot": "true"}, "runAsRoot", "buildImage"),
    ("storeDir", {"storeDir": "nix/store"}, "storeDir", "absolute"),
    ("fromImage-missing", {"fromImage": "./no-base.tar"}, "fromImage", "no such file or directory"),
    ("fromImage-oci-missing", {"fromImage": "oci:./no-layout:t"}, "fromImage", "no such file or directory"),
    ("nixdb-no-store", {"includeNixDB": True}, "includeNixDB", "store paths"),
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "rootfs" / "etc").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "hostname").write_text("x\n")
    return tmp_path


def fresh_tmpdir(tmp_path: Path) -> Path:
    d = tmp_path / "TMPDIR"
    d.mkdir(exist_ok=True)
    d.chmod(0o1777)
    return d


def assert_clean(out_dir: Path, tmpdir: Path, expected: set[str]) -> None:
    """Nothing but the expected files in the output directory; no nsbuild-* tree in TMPDIR."""
    assert {p.name for p in out_dir.iterdir()} == expected, "a partial or temporary file was left"
    assert not [p.name for p in tmpdir.iterdir()], f"temporary trees left in TMPDIR: {list(tmpdir.iterdir())}"


@pytest.mark.parametrize(("case", "overrides", "field", "fragment"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec(project: Path, case: str, overrides: dict[str, Any], field: str, fragment: str) -> None:
    spec: dict[str, Any] = {"name": "bad", "contents": ["rootfs"]}
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    spec_path = write_spec(project, spec)
    out_dir = project / "out"
    out_dir.mkdir()
    tmpdir = fresh_tmpdir(project)
    proc = build(spec_path, out_dir / "img.tar", env={"TMPDIR": str(tmpdir)}, check=False)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nsbuild: error: {field}: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    assert_clean(out_dir, tmpdir, set())


@pytest.mark.parametrize("text", ['{"name": "x",', "[1]", "", '{"name": "x"} trailing'])
def test_invalid_json(project: Path, text: str) -> None:
    (project / "spec.json").write_text(text)
    proc = build(project / "spec.json", project / "img.tar", check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not (project / "img.tar").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--format", "tarball"], "--format"),
        (["-o", "oci:"], "missing the path"),
        (["-o", "dir:foo"], "dir"),
        (["-o", "oci-arhive:x.tar"], "did you mean oci-archive:"),
        (["-o", "docker-archive:x.tar:onlyname"], "docker-archive"),
        (["--isolation", "vm"], "--isolation"),
    ],
)
def test_bad_usage(project: Path, args: list[str], fragment: str) -> None:
    spec = write_spec(project, {"name": "x", "contents": ["rootfs"]})
    proc = run_nsbuild(["layered", str(spec), *BUILD_FLAGS, *args], cwd=project)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and fragment in proc.stderr
    assert sorted(p.name for p in project.iterdir()) == ["rootfs", "spec.json"]


def test_missing_spec_file(tmp_path: Path) -> None:
    proc = build(tmp_path / "nope.json", tmp_path / "img.tar", check=False)
    assert proc.returncode == 2 and "nope.json" in proc.stderr and "Traceback" not in proc.stderr


def test_failing_extra_commands(project: Path) -> None:
    spec = write_spec(
        project,
        {
            "name": "fails",
            "contents": ["rootfs"],
            "extraCommands": "echo made-it-this-far\necho on-stderr >&2\nfalse\necho never",
        },
    )
    out_dir = project / "out"
    out_dir.mkdir()
    (out_dir / "img.tar").write_bytes(b"previous image")  # a failed build must not clobber it
    tmpdir = fresh_tmpdir(project)
    proc = build(spec, out_dir / "img.tar", env={"TMPDIR": str(tmpdir)}, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "extraCommands" in proc.stderr and "status 1" in proc.stderr
    assert "made-it-this-far" in proc.stderr and "on-stderr" in proc.stderr and "never" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out_dir / "img.tar").read_bytes() == b"previous image"
    assert_clean(out_dir, tmpdir, {"img.tar"})


@pytest.mark.parametrize("status", [3, 127])
def test_extra_commands_exit_status_is_reported(project: Path, status: int) -> None:
    script = f"exit {status}" if status != 127 else "no-such-command-anywhere"
    spec = write_spec(project, {"name": "fails", "contents": ["rootfs"], "extraCommands": script})
    tmpdir = fresh_tmpdir(project)
    proc = build(spec, project / "img.tar", env={"TMPDIR": str(tmpdir)}, check=False)
    assert proc.returncode == 1 and f"status {status}" in proc.stderr, proc.stderr
    assert not (project / "img.tar").exists()
    assert not list(tmpdir.iterdir())


def test_unreadable_input_fails_without_partial_output(user_tmp: UserTmpFactory, tmp_path: Path) -> None:
    """A build that fails while writing a layer (a file the builder cannot read) as an unprivileged
    user: exit 1 naming the file, nothing left in the output directory or TMPDIR."""
    if not is_root():
        pytest.skip("needs root to make a file an unprivileged builder cannot read")
    inputs = user_tmp(None)
    (inputs / "rootfs").mkdir()
    (inputs / "rootfs" / "a-big").write_bytes(os.urandom(3 << 20))
    (inputs / "rootfs" / "z-secret").write_text("root only\n")
    (inputs / "rootfs" / "z-secret").chmod(0o600)
    for p in (inputs / "rootfs", inputs / "rootfs" / "a-big"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    spec = write_spec(inputs, {"name": "unreadable", "compressor": "zstd", "contents": ["rootfs"]})
    out = user_tmp("test")
    tmpdir = user_tmp("test")
    for ref in (f"{out}/img.tar.zst", f"oci-archive:{out}/img.oci.tar", f"oci:{out}/layout:t"):
        proc = build(spec, ref, user="test", env={"TMPDIR": str(tmpdir)}, check=False)
        assert proc.returncode == 1, proc.stderr
        assert "z-secret" in proc.stderr and "Traceback" not in proc.stderr
        assert not list(out.iterdir()), list(out.iterdir())
        assert not list(tmpdir.iterdir()), list(tmpdir.iterdir())


@pytest.mark.parametrize("full", ["workspace", "output"])
def test_full_disk_is_one_line_error(user_tmp: UserTmpFactory, full: str) -> None:
    """A 64 KiB tmpfs where the layer is written: the workspace (TMPDIR; an OCI layout output builds its
    blobs there) or the output directory (an archive streams its layer straight into the output
    file). An unprivileged builder gets one line and exit 1 (not a traceback), and nothing is left in
    the output directory or TMPDIR."""
    if not is_root():
        pytest.skip("needs root to mount a small tmpfs")
    inputs = user_tmp(None)
    (inputs / "rootfs").mkdir()
    (inputs / "rootfs" / "big").write_bytes(os.urandom(1 << 20))
    for p in (inputs / "rootfs", inputs / "rootfs" / "big"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    spec = write_spec(inputs, {"name": "full", "contents": ["rootfs"]})
    out = user_tmp("test")
    tmpdir = user_tmp("test")
    small = tmpdir if full == "workspace" else out
    target = f"oci:{out / 'layout'}:t" if full == "workspace" else out / "img.tar"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", str(small)], check=True)
    try:
        proc = build(spec, target, user="test", env={"TMPDIR": str(tmpdir)}, check=False)
        assert proc.returncode == 1, proc.stderr
        expected = (
            "nsbuild: error: No space left on device"
            if full == "workspace"
            else f"nsbuild: error: {out / 'img.tar'}: cannot write: No space left on device"
        )
        assert proc.stderr.strip() == expected, proc.stderr
        assert not list(out.iterdir()), list(out.iterdir())
        assert not list(tmpdir.iterdir()), list(tmpdir.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_output_directory_missing(project: Path) -> None:
    spec = write_spec(project, {"name": "x", "contents": ["rootfs"]})
    proc = build(spec, project / "no" / "such" / "dir" / "img.tar", check=False)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def _wait_for(predicate, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Poll until predicate() holds (a hang guard, not a timing threshold)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"nsbuild exited ({proc.returncode}) before {what}: {proc.stderr.read()!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("fmt", ["docker-archive", "oci-dir"])
def test_interrupt_leaves_nothing(user_tmp: UserTmpFactory, sig: signal.Signals, fmt: str) -> None:
    user = "test" if is_root() else None
    work = user_tmp(user)
    (work / "rootfs").mkdir()
    (work / "rootfs" / "file").write_bytes(os.urandom(1 << 20))
    marker = f"{31000 + os.getpid() % 1000 + sig}"
    spec = write_spec(
        work, {"name": "interrupted", "contents": ["rootfs"], "extraCommands": f"sleep {marker} & sleep {marker}.5"}
    )
    if user is not None:
        os.chown(spec, account(user).uid, account(user).gid)
    out = work / "out"
    tmpdir = work / "tmp"
    for d in (out, tmpdir):
        d.mkdir()
        if user is not None:
            os.chown(d, account(user).uid, account(user).gid)
    ref = f"{out}/img.tar" if fmt == "docker-archive" else f"oci:{out}/layout:t"
    proc = popen_nsbuild(["layered", str(spec), "-o", ref, *BUILD_FLAGS], user, env={"TMPDIR": str(tmpdir)}, text=True)

    def sleeping() -> list[tuple[int, str]]:
        return [p for p in processes_of(user) if p[1].startswith("sleep ") and marker in p[1]]

    try:
        _wait_for(lambda: len(sleeping()) == 2, "extraCommands' sleeps started", proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        leftover = sleeping()  # before the clean-up below kills them
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, _ in sleeping():
            os.kill(pid, signal.SIGKILL)  # only ours: marked with a unique duration
    assert proc.returncode in (130, 128 + sig, -sig), (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert not leftover, f"processes outlived the build: {leftover}"
    assert not list(out.iterdir()), f"partial output: {list(out.iterdir())}"
    assert not list(tmpdir.iterdir()), f"temporary trees left: {list(tmpdir.iterdir())}"


@pytest.mark.parametrize(
    ("kind", "ref"),
    [
        ("dir", "{d}/outdir"),
        ("dir", "oci-archive:{d}/outdir"),
        ("dir", "docker-archive:{d}/outdir"),
        ("file", "oci:{d}/afile:t"),
        ("nonlayout", "oci:{d}/outdir:t"),
    ],
)
def test_output_of_the_wrong_kind(project: Path, kind: str, ref: str) -> None:
    """An archive onto a directory, a layout onto a file or into a directory that is not a layout: a
    clear one-line error (exit 2), and what was there is untouched."""
    spec = write_spec(project, {"name": "x", "contents": ["rootfs"]})
    (project / "outdir").mkdir()
    (project / "outdir" / "keep").write_text("mine\n")
    (project / "afile").write_text("mine\n")
    proc = build(spec, ref.format(d=project), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in (project / "outdir").iterdir()) == ["keep"]
    assert (project / "afile").read_text() == "mine\n"
    assert sorted(p.name for p in project.iterdir()) == ["afile", "outdir", "rootfs", "spec.json"]


def test_oci_dir_into_an_empty_directory_and_a_second_tag(project: Path) -> None:
    spec = write_spec(project, {"name": "x", "tag": "one", "contents": ["rootfs"]})
    (project / "layout").mkdir()
    build(spec, f"oci:{project / 'layout'}")
    spec2 = write_spec(
        project, {"name": "x", "tag": "two", "contents": ["rootfs"], "extraCommands": "touch b"}, "two.json"
    )
    build(spec2, f"oci:{project / 'layout'}:two")
    index = json.loads((project / "layout" / "index.json").read_text())
    images = [m for m in index["manifests"] if "artifactType" not in m]  # not the SBOMs beside them
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in images]
    assert names == ["one", "two"]


@pytest.mark.parametrize(
    "ref",
    [
        "docker-archive:{d}/x.tar:Bad Name:tag",
        "docker-archive:{d}/x.tar:UPPER/app:tag",
        "docker-archive:{d}/x.tar:app:-tag",
        "oci:{d}/layout:bad tag!",
        "oci-archive:{d}/x.tar:-bad",
    ],
)
def test_invalid_name_or_tag_in_the_output_reference(project: Path, ref: str) -> None:
    """podman/docker would refuse the archive later; nsbuild refuses it now and writes nothing."""
    spec = write_spec(project, {"name": "x", "contents": ["rootfs"]})
    proc = build(spec, ref.format(d=project), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in project.iterdir()) == ["rootfs", "spec.json"]


@pytest.mark.parametrize("ref", ["{d}/out/img.tar.gz", "oci:{d}/out/layout:t", "oci-archive:{d}/out/img.oci.tar"])
def test_success_leaves_only_the_output(project: Path, ref: str) -> None:
    spec = write_spec(project, {"name": "x", "contents": ["rootfs"], "extraCommands": "mkdir -p tmp && touch tmp/x"})
    (project / "out").mkdir()
    tmpdir = fresh_tmpdir(project)
    build(spec, ref.format(d=project), env={"TMPDIR": str(tmpdir)})
    assert len(list((project / "out").iterdir())) == 1
    assert not list(tmpdir.iterdir()), list(tmpdir.iterdir())


def test_socket_in_contents_is_a_clear_build_error(project: Path) -> None:
    import socket

    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(project / "rootfs" / "etc" / "app.sock"))
        spec = write_spec(project, {"name": "x", "contents": ["rootfs"]})
        tmpdir = fresh_tmpdir(project)
        proc = build(spec, project / "img.tar", env={"TMPDIR": str(tmpdir)}, check=False)
    finally:
        sock.close()
    assert proc.returncode == 1 and "app.sock" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (project / "img.tar").exists() and not list(tmpdir.iterdir())


@pytest.mark.parametrize("ref", ["{d}/out/img.tar.zst", "oci:{d}/out/layout:t"])
def test_interrupt_while_a_layer_is_written(tmp_path: Path, ref: str) -> None:
    """SIGINT while the layer writer is busy with a large file: prompt exit 130, nothing left behind."""
    tree = tmp_path / "rootfs"
    tree.mkdir()
    with open(tree / "big", "wb") as f:
        f.truncate(1 << 30)  # sparse: cheap to make, a second or two to read, hash and compress
    spec = write_spec(tmp_path, {"name": "big", "compressor": "zstd", "contents": ["rootfs"]})
    (tmp_path / "out").mkdir()
    tmpdir = fresh_tmpdir(tmp_path)
    proc = popen_nsbuild(
        ["layered", str(spec), "-o", ref.format(d=tmp_path), *BUILD_FLAGS], env={"TMPDIR": str(tmpdir)}, text=True
    )

    def reading_big() -> bool:
        """nsbuild has the big file open and is past its first MiB (from /proc, no timing)."""
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) == str(tree / "big"):
                    pos = Path(f"/proc/{proc.pid}/fdinfo/{fd.name}").read_text().split()[1]
                    if int(pos) > (1 << 20):
                        return True
        except (FileNotFoundError, ProcessLookupError):
            pass
        return False

    try:
        _wait_for(reading_big, "the layer writer started", proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert not list((tmp_path / "out").iterdir())
    assert not list(tmpdir.iterdir()), list(tmpdir.rglob("*"))


def _read_position(pid: int, path: Path) -> int | None:
    """How far process `pid` has read `path` (from /proc/PID/fdinfo), None when it has it not open."""
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(fd) == str(path):
                    return int(Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def test_interrupt_stops_the_layer_writer_promptly(tmp_path: Path) -> None:
    """After SIGINT the writer reads at most a little more of the file it is on (a volume, not a time)."""
    tree = tmp_path / "rootfs"
    tree.mkdir()
    with open(tree / "big", "wb") as f:
        f.truncate(16 << 30)
    spec = write_spec(tmp_path, {"name": "big", "compressor": "zstd", "contents": ["rootfs"]})
    proc = popen_nsbuild(["layered", str(spec), "-o", f"oci:{tmp_path / 'layout'}:t", *BUILD_FLAGS], text=True)
    slack = 512 << 20
    try:
        _wait_for(lambda: (_read_position(proc.pid, tree / "big") or 0) > (64 << 20), "the writer started", proc)
        start = _read_position(proc.pid, tree / "big") or 0
        proc.send_signal(signal.SIGINT)
        furthest = start
        while proc.poll() is None and furthest - start <= slack:
            furthest = max(furthest, _read_position(proc.pid, tree / "big") or 0)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert furthest - start <= slack, f"read {(furthest - start) >> 20} MiB more after SIGINT"
