"""nsbuild as make, ninja and CI jobs call it, and the edit-build-run loop (issue 14).

The oracles are the real tools: GNU make decides from mtimes and the --depfile rules whether a rule
reruns (`make -q`), ninja reads the same depfile (`deps = gcc`), podman loads what `--load` streams
and what the default output holds, skopeo reads tags, labels and annotations back. Everything runs
as the unprivileged test account.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from support.core import write_spec
from support.users import account, describe, nsbuild_cmd, run_as, run_nsbuild
from support.verifiers import docker_daemon, podman_store, require_tool, run_tool

USER = "test"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def _chown_all(top: Path) -> None:
    acc = account(USER)
    if acc.is_current:
        return
    for dirpath, dirnames, filenames in os.walk(top):
        for n in [dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)]:
            os.lchown(n, acc.uid, acc.gid)


def _three_images(work: Path) -> list[str]:
    names = []
    for name in ("a", "b", "c"):
        d = work / name
        _tree(d / "root", {"etc/app.conf": f"{name}\n", "share/doc/readme": "hello\n"})
        (d / "extra.txt").write_text("named by a script\n")
        write_spec(
            d,
            {
                "name": f"mk-{name}",
                "tag": "1",
                "contents": ["root"],
                "extraCommands": 'mkdir -p opt && cp "$NSBUILD_SPEC_DIR/extra.txt" opt/extra.txt',
            },
        )
        names.append(name)
    return names


MAKEFILE = """\
IMAGES := a.tar b.tar c.tar
all: $(IMAGES)
%.tar: %/spec.json
\t$(NSBUILD) layered $< -o $@ --depfile $@.d --cache-dir cache -q
\t@echo built $@ >> log
-include $(IMAGES:=.d)
"""


def _make(work: Path, *args: str) -> subprocess.CompletedProcess:
    nsbuild = nsbuild_cmd()[0]
    return run_as(["make", "-C", str(work), f"NSBUILD={nsbuild}", *args], USER)


def test_make_j3_then_q_then_only_touched_image(user_tmp) -> None:
    require_tool("make")
    work = user_tmp(USER)
    _three_images(work)
    (work / "Makefile").write_text(MAKEFILE)
    _chown_all(work)
    proc = _make(work, "-j3")
    assert proc.returncode == 0, describe(proc)
    assert sorted((work / "log").read_text().split("\n")[:-1]) == ["built a.tar", "built b.tar", "built c.tar"]
    proc = _make(work, "-q")
    assert proc.returncode == 0, describe(proc)

    # A file of a's content tree changes: only a.tar is out of date, and only it is rebuilt.
    (work / "log").unlink()
    before = {n: (work / f"{n}.tar").stat().st_mtime_ns for n in "bc"}
    time.sleep(0.01)
    (work / "a/root/etc/app.conf").write_text("a, edited\n")
    assert _make(work, "-q").returncode == 1
    proc = _make(work, "-j3")
    assert proc.returncode == 0, describe(proc)
    assert (work / "log").read_text() == "built a.tar\n"
    assert {n: (work / f"{n}.tar").stat().st_mtime_ns for n in "bc"} == before
    assert _make(work, "-q").returncode == 0

    # make settles: an input touched without a change rebuilds to the same bytes ("up to date:"), and
    # the output is then newer than its inputs, so make has nothing left to do.
    time.sleep(0.01)
    os.utime(work / "b/spec.json")
    assert _make(work, "-q").returncode == 1
    assert _make(work).returncode == 0
    assert (work / "b.tar").stat().st_mtime_ns > (work / "b/spec.json").stat().st_mtime_ns
    assert _make(work, "-q").returncode == 0


def test_depfile_lists_every_input(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    d = work / "a"
    (d / "root/with space#1").write_text("x\n")
    base = work / "base.tar"
    write_spec(work / "b", {"name": "base", "tag": "1", "contents": ["root"]})
    _chown_all(work)
    proc = run_nsbuild(["layered", work / "b/spec.json", "-o", base, "--no-cache", "-q"], USER)
    assert proc.returncode == 0, describe(proc)
    spec = json.loads((d / "spec.json").read_text())
    spec["fromImage"] = str(base)
    write_spec(d, spec)
    _chown_all(work)
    out, dep = work / "a.tar", work / "a.d"
    proc = run_nsbuild(["layered", d / "spec.json", "-o", out, "--depfile", dep, "--no-cache", "-q"], USER)
    assert proc.returncode == 0, describe(proc)
    text = dep.read_text()
    target, _, rest = text.partition(":")
    assert target == str(out)
    rule = rest.split("\n\n", 1)[0]
    names = [n.replace("\\ ", " ").replace("\\#", "#") for n in re.split(r"(?<!\\) |\\\n", rule) if n.strip()]
    names = [n.strip() for n in names]
    want = {
        str(d / "spec.json"),
        str(d / "root"),
        str(d / "root/etc"),
        str(d / "root/etc/app.conf"),
        str(d / "root/share/doc/readme"),
        str(d / "root/with space#1"),
        str(d / "extra.txt"),
        str(base),
    }
    assert want <= set(names), sorted(want - set(names))
    # gcc -MP: an empty rule per prerequisite, so that a deleted input does not stop make.
    assert f"{d}/root/with\\ space\\#1:\n" in text


def test_ninja_reads_the_depfile(user_tmp) -> None:
    require_tool("ninja")
    work = user_tmp(USER)
    _three_images(work)
    nsbuild = nsbuild_cmd()[0]
    (work / "build.ninja").write_text(
        f"rule img\n  command = {nsbuild} layered $in -o $out --depfile $out.d --cache-dir cache -q\n"
        "  depfile = $out.d\n  deps = gcc\n"
        "build a.tar: img a/spec.json\n"
    )
    _chown_all(work)
    run_tool(["ninja", "-C", str(work)], USER)
    again = run_tool(["ninja", "-C", str(work)], USER)
    assert "no work to do" in again.stdout
    time.sleep(0.01)
    (work / "a/extra.txt").write_text("changed\n")
    rebuilt = run_tool(["ninja", "-C", str(work)], USER)
    assert "no work to do" not in rebuilt.stdout


def _storage_env(store) -> dict[str, str]:
    """Point a plain `podman` (as nsbuild --load runs it) at the throw-away store."""
    conf = store.dir / "storage.conf"
    # rootless podman takes rootless_storage_path, root podman graphroot: both name the store's root
    root, run = store.dir / "root", store.dir / "run"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{root}"\nrunroot = "{run}"\nrootless_storage_path = "{root}"\n'
    )
    acc = account(USER)
    if not acc.is_current:
        os.chown(conf, acc.uid, acc.gid)
    return {**store.env, "CONTAINERS_STORAGE_CONF": str(conf), "TMPDIR": str(store.dir / "tmp")}


def test_load_into_podman(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    _chown_all(work)
    with podman_store(USER) as store:
        (store.dir / "tmp").mkdir(exist_ok=True)
        _chown_all(store.dir / "tmp")
        env = _storage_env(store)

        def images() -> list[str]:
            # plain podman, as nsbuild runs it: the store comes from CONTAINERS_STORAGE_CONF
            proc = run_as(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], USER, env=env)
            assert proc.returncode == 0, describe(proc)
            return proc.stdout.split()

        try:
            proc = run_nsbuild(["layered", work / "a/spec.json", "--load", "--no-cache"], USER, env=env)
            assert proc.returncode == 0, describe(proc)
            assert proc.stdout.strip() == "localhost/mk-a:1"
            assert "localhost/mk-a:1" in images()
            # A named target, as skopeo spells the podman store.
            args = ["layered", work / "b/spec.json", "-o", "containers-storage:mine/b:2", "--no-cache", "-q"]
            proc = run_nsbuild(args, USER, env=env)
            assert proc.returncode == 0, describe(proc)
            assert "localhost/mine/b:2" in images()
            # What podman holds is the image that was built: the same config digest.
            args = ["layered", work / "a/spec.json", "--load", "--no-cache", "--json", "--tag", "3"]
            proc = run_nsbuild(args, USER, env=env)
            assert proc.returncode == 0, describe(proc)
            doc = json.loads(proc.stdout)
            assert doc["loaded"] == "localhost/mk-a:3"
            inspect = run_as(["podman", "image", "inspect", "--format", "{{.Id}}", "localhost/mk-a:3"], USER, env=env)
            assert inspect.stdout.strip() == doc["config_digest"].removeprefix("sha256:"), describe(inspect)
        finally:
            run_as(["podman", "system", "reset", "-f"], USER, env=env)
    # Nothing of ours was left: no temporary archive beside the spec or in the work tree.
    assert not list(work.rglob("*.tmp"))


def test_load_into_docker(tmp_path: Path) -> None:
    """docker-daemon:NAME:TAG streams into `docker load` of the daemon DOCKER_HOST names (a private
    dockerd: root only)."""
    _three_images(tmp_path)
    with docker_daemon() as daemon:
        env = {"DOCKER_HOST": f"unix://{daemon.sock}"}
        args = ["layered", tmp_path / "a/spec.json", "-o", "docker-daemon:dock/a:7", "--no-cache", "--json"]
        proc = run_nsbuild(args, env=env)
        assert proc.returncode == 0, describe(proc)
        doc = json.loads(proc.stdout)
        assert doc["loaded"] == "dock/a:7"
        image_id = daemon.docker("image", "inspect", "--format", "{{.Id}}", "dock/a:7").stdout.strip()
        assert image_id == doc["config_digest"]
        # Asked for by name but not installed: refused before anything is built.
        proc = run_nsbuild(["layered", tmp_path / "a/spec.json", "--load"], env={**env, "PATH": str(tmp_path)})
        assert proc.returncode == 2 and "neither podman nor docker" in proc.stderr, describe(proc)


def test_default_output_loads_in_podman(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    _chown_all(work)
    proc = run_nsbuild(["layered", work / "a/spec.json", "--no-cache"], USER, cwd=work)
    assert proc.returncode == 0, describe(proc)
    m = re.search(r"wrote (\S+) \(docker-archive\) mk-a:1 manifest sha256:[0-9a-f]{64}", proc.stderr)
    assert m, proc.stderr
    path = work / m.group(1)
    assert path.name == "mk-a.tar"
    assert path.read_bytes()[:2] != b"\x1f\x8b"  # a .tar is a tar, never gzip data
    with podman_store(USER) as store:
        out = store.podman("load", "-i", path).stdout
        assert "localhost/mk-a:1" in out


def test_archive_name_decides_the_compression(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    _chown_all(work)
    for name, magic in (("x.tar.gz", b"\x1f\x8b"), ("x.tar.zst", b"\x28\xb5\x2f\xfd"), ("x.tar", b"")):
        proc = run_nsbuild(["layered", work / "a/spec.json", "-o", work / name, "--no-cache", "-q"], USER)
        assert proc.returncode == 0, describe(proc)
        head = (work / name).read_bytes()[:4]
        if magic:
            assert head.startswith(magic), name
        else:
            assert head[:2] not in (b"\x1f\x8b",) and head != b"\x28\xb5\x2f\xfd", name


@pytest.mark.parametrize("compressor", ["gz", "zstd"])
def test_plain_archive_of_compressed_layers_loads_everywhere(user_tmp, compressor: str) -> None:
    """A .tar docker-archive is a plain tar whose layer files are the compressed blobs: podman loads it
    as it is (no decompressed copy), skopeo reads it, and docker too (gzip; root: a private dockerd)."""
    work = user_tmp(USER)
    _three_images(work)
    spec = json.loads((work / "a/spec.json").read_text())
    spec["compressor"] = compressor
    write_spec(work / "a", spec)
    _chown_all(work)
    out = work / "a.tar"
    proc = run_nsbuild(["layered", work / "a/spec.json", "-o", out, "--no-cache", "-q"], USER)
    assert proc.returncode == 0, describe(proc)
    magic = {"gz": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}[compressor]
    with tarfile.open(out) as tar:  # "r:" only: the archive itself is not compressed
        layers = [m for m in tar.getmembers() if m.name.endswith("/layer.tar")]
        assert layers and all(tar.extractfile(m).read(4).startswith(magic) for m in layers)  # type: ignore[union-attr]
    run_tool(["skopeo", "inspect", f"docker-archive:{out}"], USER)
    with podman_store(USER) as store:
        assert "localhost/mk-a:1" in store.podman("load", "-i", out).stdout
    if account(None).uid == 0 and compressor == "gz":  # Debian 12's dockerd 20.10 reads no zstd at all
        with docker_daemon() as daemon:
            assert "mk-a:1" in daemon.docker("load", "-i", out).stdout


def test_oci_archive_ref_name_carries_the_repository(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    _chown_all(work)
    out = work / "a.oci.tar"
    proc = run_nsbuild(["layered", work / "a/spec.json", "-o", f"oci-archive:{out}", "--no-cache", "-q"], USER)
    assert proc.returncode == 0, describe(proc)
    with podman_store(USER) as store:
        loaded = store.podman("load", "-i", out).stdout
        assert "mk-a:1" in loaded and "localhost/1" not in loaded, loaded


def test_mistyped_transport_is_an_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"name": "x", "contents": []})
    proc = run_nsbuild(["layered", spec, "-o", "oci-arhive:img.tar"])
    assert proc.returncode == 2
    assert "did you mean oci-archive:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "oci-arhive:img.tar").exists()


def test_overrides_and_annotations_read_back_by_skopeo(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    spec = json.loads((work / "a/spec.json").read_text())
    spec["config"] = {"Labels": {"from.spec": "1", "both": "spec"}}
    spec["annotations"] = {"org.example.spec": "yes"}
    write_spec(work / "a", spec)
    _chown_all(work)
    out = work / "oci"
    args = ["layered", work / "a/spec.json", "-o", f"oci:{out}", "--no-cache", "-q"]
    args += ["--tag", "2.0", "--compressor", "zstd", "--label", "both=cli", "--label", "added=x"]
    args += ["--annotation", "org.example.cli=z"]
    proc = run_nsbuild(args, USER)
    assert proc.returncode == 0, describe(proc)
    info = json.loads(run_tool(["skopeo", "inspect", f"oci:{out}:2.0"], USER).stdout)
    assert info["Labels"] == {"from.spec": "1", "both": "cli", "added": "x"}
    raw = json.loads(run_tool(["skopeo", "inspect", "--raw", f"oci:{out}:2.0"], USER).stdout)
    assert raw["annotations"]["org.example.spec"] == "yes"
    assert raw["annotations"]["org.example.cli"] == "z"
    assert {layer["mediaType"] for layer in raw["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}


def test_bad_override_is_a_usage_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"name": "x", "contents": []})
    for args, field in (
        (["--label", "novalue"], "--label"),
        (["--compressor", "bz2"], "--compressor"),
        (["--tag", "-bad"], "tag"),
    ):
        proc = run_nsbuild(["layered", spec, "-o", tmp_path / "o.tar", *args])
        assert proc.returncode == 2, (args, proc.stderr)
        assert field in proc.stderr and "Traceback" not in proc.stderr


def test_json_keeps_progress_and_says_where_each_layer_came_from(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    _chown_all(work)
    args = ["layered", work / "a/spec.json", "-o", work / "a.tar", "--cache-dir", work / "cache", "--json"]
    first = run_nsbuild(args, USER)
    assert first.returncode == 0, describe(first)
    assert "nsbuild: [" in first.stderr  # progress stays on stderr with --json
    doc = json.loads(first.stdout)
    assert [layer["source"] for layer in doc["layers"]] == ["built", "built"]
    assert all(isinstance(layer["seconds"], float) for layer in doc["layers"])
    again = json.loads(run_nsbuild(args, USER).stdout)
    assert [layer["source"] for layer in again["layers"]] == ["cache", "built"]  # scripts rerun
    quiet = run_nsbuild([*args, "-q"], USER)
    assert quiet.stderr == ""


def test_version_and_help_in_80_columns() -> None:
    proc = run_nsbuild(["--version"])
    assert proc.returncode == 0 and re.fullmatch(r"nsbuild \d+\.\d+\.\d+\S*\n", proc.stdout), proc.stdout
    for command in ("layered", "image", "push", "cache"):
        proc = run_nsbuild([command, "--help"], env={"COLUMNS": "80"})
        assert proc.returncode == 0, describe(proc)
        lines = proc.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, command
        assert "…" not in proc.stdout, command
    help_text = run_nsbuild(["layered", "--help"], env={"COLUMNS": "80"}).stdout
    flat = re.sub(r"-\s+", "-", re.sub(r"\s+", " ", help_text))  # click wraps lines after a hyphen
    for form in ("docker-archive:PATH", "oci:DIR", "oci-archive:PATH", "docker://", "containers-storage:"):
        assert form in flat, form


def test_cache_prune_keeps_recent_layers_unless_all(user_tmp) -> None:
    work = user_tmp(USER)
    _three_images(work)
    _chown_all(work)
    cache = work / "cache"
    proc = run_nsbuild(["layered", work / "a/spec.json", "-o", work / "a.tar", "--cache-dir", cache, "-q"], USER)
    assert proc.returncode == 0, describe(proc)
    kept = run_nsbuild(["cache", "prune", "--cache-dir", cache], USER)
    assert kept.returncode == 0 and "removed 0 layer entries" in kept.stdout, describe(kept)
    rebuilt = run_nsbuild(["layered", work / "a/spec.json", "-o", work / "a.tar", "--cache-dir", cache], USER)
    assert "cached" in rebuilt.stderr
    emptied = run_nsbuild(["cache", "prune", "--all", "--cache-dir", cache], USER)
    assert emptied.returncode == 0 and "removed 0 layer entries" not in emptied.stdout, describe(emptied)
    usage = run_nsbuild(["cache", "du", "--cache-dir", cache], USER).stdout
    assert ": 0 layer entries, 0 blobs" in usage


def test_progress_bars_on_a_terminal() -> None:
    """On a real terminal (a pty), a watched layer with a known total is drawn as a bar with bytes,
    rate and time left; off a terminal nothing live is written."""
    import pty

    from nsbuild.core.progress import Progress

    master, slave = pty.openpty()
    os.set_blocking(master, False)
    drawn = ""

    def read_master() -> str:
        try:
            return os.read(master, 1 << 16).decode()
        except BlockingIOError:
            return ""

    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            progress = Progress(stream=tty)
            done = [0]
            stop = progress.watch("layer 1/2", lambda: done[0], total=4 << 20)
            # The bar is redrawn by a ticker thread: wait for it (a loaded machine may be slow), no timing.
            deadline = time.monotonic() + 30
            while "ETA" not in drawn and time.monotonic() < deadline:
                done[0] = min(done[0] + (256 << 10), (4 << 20) - 1)
                time.sleep(0.05)
                drawn += read_master()
            stop()
            progress.info("finished")
        time.sleep(0.05)
        drawn += read_master()
    finally:
        os.close(master)
        os.close(slave)
    assert re.search(r"layer 1/2 \[#*-*\] [\d.]+ (?:B|KiB|MiB)/4\.0 MiB [\d.]+ \w+/s ETA \d+s", drawn), drawn
    assert "nsbuild: finished" in drawn

    class Pipe:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return False

    pipe = Pipe()
    progress = Progress(stream=pipe)  # type: ignore[arg-type]
    stop = progress.watch("layer", lambda: 1, total=2)
    time.sleep(0.3)
    stop()
    assert pipe.text == ""
