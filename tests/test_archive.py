"""Archive outputs written while the layers are built (nsbuild.sinks.archive, sinks.ArchiveOutput).

The layer next in line streams into the output file, the others are copied from blob files, a repeated
layer is written once; a compressed docker-archive is framed, not compressed twice; an output the cache
wrote and nobody touched since is left alone; a failed build leaves no file behind.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import describe, nsbuild_cmd, oci_manifest, plain_archive, run_nsbuild, run_tool, skopeo_copy, user_env
from support.core import build, read_image, write_spec

ARCHIVES = [
    ("docker-archive", "none"),
    ("docker-archive", "gz"),
    ("docker-archive", "zstd"),
    ("oci-archive", "none"),
    ("oci-archive", "zstd"),
]
# The identical trees are at positions 1 and 3: with --jobs 1 the repeat is streamed, cut back out, and
# the next layer streams over the cut.
CONTENTS = ["base", "dup1", "big", "dup2", "tail"]
DECOMPRESS = {"gz": ["gzip", "-dc"], "zstd": ["zstd", "-dcq"]}
TEST = {"gz": ["gzip", "-t"], "zstd": ["zstd", "-tq"]}


def make_spec(root: Path, compressor: str, **overrides: Any) -> Path:
    """Five content layers, two of them identical; "big" is a few hundred KB, half incompressible."""
    if not root.exists():
        files = {
            "base/etc/hosts": b"127.0.0.1 localhost\n",
            "base/usr/share/doc/README": b"readme\n" * 100,
            "dup1/etc/same": b"same bytes\n",
            "dup2/etc/same": b"same bytes\n",
            "big/data/noise": random.Random(7).randbytes(200_000),
            "big/data/text": b"".join(b"line %d\n" % i for i in range(20_000)),
            "tail/opt/tail": b"tail\n",
        }
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        (root / "base" / "etc" / "localhost").symlink_to("hosts")
    spec = {
        "name": "archive-test",
        "tag": "v1",
        "compressor": compressor,
        "contents": CONTENTS,
        "config": {"Env": ["A=1"]},
        **overrides,
    }
    return write_spec(root, spec, f"spec-{compressor}.json")


def ref_of(kind: str, path: Path) -> str:
    return f"docker-archive:{path}" if kind == "docker-archive" else f"oci-archive:{path}:t"


def nsbuild(*args: str | os.PathLike[str], text: bool = True) -> subprocess.CompletedProcess:
    """The CLI as given: unlike support.core.build, no --no-cache, so the cache can be used."""
    proc = run_nsbuild(args, text=text)
    assert proc.returncode == 0, describe(proc)
    return proc


def members(archive: Path, work: Path) -> list[str]:
    """The archive's member names as GNU tar lists them (decompressed first by gzip/zstd)."""
    work.mkdir(exist_ok=True)
    return run_tool(["tar", "-tf", plain_archive(archive, work)]).stdout.split()


@pytest.mark.parametrize(("kind", "compressor"), ARCHIVES, ids=[f"{k}-{c}" for k, c in ARCHIVES])
def test_same_bytes_however_the_layers_arrive(tmp_path: Path, kind: str, compressor: str) -> None:
    spec = make_spec(tmp_path / "in", compressor)
    cache = tmp_path / "cache"
    runs = {
        "streamed": ["--no-cache", "--jobs", "1"],  # every layer streams, the repeat is cut back out
        "parallel": ["--no-cache", "--jobs", "8"],  # layers finish in any order: some stream, some copied
        "cold": ["--cache-dir", cache],  # streamed and kept in the cache
        "warm": ["--cache-dir", cache],  # a new path, so not up to date: every layer copied from the cache
    }
    outputs: dict[str, bytes] = {}
    for name, flags in runs.items():
        proc = nsbuild("layered", spec, "-o", ref_of(kind, tmp_path / name), *flags)
        outputs[name] = (tmp_path / name).read_bytes()
    assert proc.stderr.count("(cached)") == len(CONTENTS), proc.stderr
    if (kind, compressor) == ("docker-archive", "none"):
        # stdout is a pipe: nothing can be filled in afterwards, so every layer is copied.
        outputs["stream"] = nsbuild("stream", spec, "--no-cache", "-q", text=False).stdout
        # Into a regular file, blobs go through copy_file_range; O_APPEND makes that fail: the slow copy.
        for mode, prefix in (("wb", b""), ("ab", b"prefix\n")):
            target = tmp_path / f"stream-{mode}"
            target.write_bytes(prefix)
            with open(target, mode) as f:
                subprocess.run(
                    [*nsbuild_cmd(), "stream", spec, "--no-cache", "-q"], stdout=f, check=True, env=user_env()
                )
            assert target.read_bytes()[: len(prefix)] == prefix
            outputs[target.name] = target.read_bytes()[len(prefix) :]
    different = [name for name, data in outputs.items() if data != outputs["streamed"]]
    assert not different, f"differ from the --jobs 1 archive: {different}"

    view = read_image(tmp_path / "streamed", tmp_path / "view", tag="t" if kind == "oci-archive" else None)
    if kind == "docker-archive":
        layers = view.manifest[0]["Layers"]
    else:
        layers = ["blobs/sha256/" + d["digest"].split(":")[1] for d in view.manifest["layers"]]
    assert len(layers) == len(CONTENTS) + 1 and layers[1] == layers[3] and len(set(layers)) == len(layers) - 1
    names = members(tmp_path / "streamed", tmp_path / "plain")
    assert len(names) == len(set(names)), f"a member twice: {names}"
    assert set(layers) <= set(names)
    # skopeo checks every layer against its digest / diff_id: the cut left no stray bytes.
    skopeo_copy(ref_of(kind, tmp_path / "streamed"), f"oci:{tmp_path / 'copy'}:t")


@pytest.mark.parametrize("compressor", ["gz", "zstd"])
def test_compressed_docker_archive_frames_the_plain_one(tmp_path: Path, compressor: str) -> None:
    spec = make_spec(tmp_path / "in", compressor)
    archive = tmp_path / {"gz": "img.tar.gz", "zstd": "img.tar.zst"}[compressor]  # the name says: compressed
    build(spec, archive)
    build(make_spec(tmp_path / "in", "none"), tmp_path / "img.tar")
    build(spec, f"oci:{tmp_path / 'layout'}:t")
    run_tool([*TEST[compressor], archive])
    plain = run_tool([*DECOMPRESS[compressor], archive], text=False).stdout
    assert plain == (tmp_path / "img.tar").read_bytes()
    # The layer blobs sit verbatim in the archive: a second compression would have rewritten them.
    compressed = archive.read_bytes()
    blobs = [
        tmp_path / "layout" / "blobs" / "sha256" / d["digest"].split(":")[1]
        for d in oci_manifest(tmp_path / "layout", "t")["layers"]
    ]
    assert max(b.stat().st_size for b in blobs) > 100_000
    for blob in blobs:
        assert blob.read_bytes() in compressed, blob.name


def _touch_in_place(out: Path) -> None:
    """Same size, different bytes, mtime put back: only the ctime (and the content) tell."""
    st = out.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, so that the ctime does move
    with open(out, "r+b") as f:
        f.write(b"X" * 512)
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_same_size(out: Path) -> None:
    other = out.with_name("other")
    other.write_bytes(b"\0" * out.stat().st_size)
    os.replace(other, out)


DISTURB: dict[str, Callable[[Path], object]] = {
    "append": lambda out: out.open("ab").write(b"\0"),
    "utime": lambda out: os.utime(out, ns=(out.stat().st_atime_ns, out.stat().st_mtime_ns - 10**9)),
    "delete": lambda out: out.unlink(),
    "replaced-same-size": _replace_same_size,
    "rewritten-same-size": _touch_in_place,
}


@pytest.mark.parametrize(("kind", "compressor"), [("docker-archive", "gz"), ("oci-archive", "none")])
def test_untouched_output_is_left_alone(tmp_path: Path, kind: str, compressor: str) -> None:
    spec = make_spec(tmp_path / "in", compressor)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "img.tar"
    build(spec, ref_of(kind, tmp_path / "fresh.tar"))
    fresh = (tmp_path / "fresh.tar").read_bytes()

    def again(*flags: str) -> bool:
        proc = nsbuild("layered", spec, "-o", ref_of(kind, out), "--cache-dir", tmp_path / "cache", "--json", *flags)
        return json.loads(proc.stdout)["written"]

    def rewritten(*flags: str) -> None:
        before = out.stat().st_ino if out.exists() else None
        assert again(*flags) and out.stat().st_ino != before and out.read_bytes() == fresh
        assert sorted(p.name for p in out_dir.iterdir()) == ["img.tar"], "a temporary file left behind"

    def left_alone() -> None:
        st = out.stat()
        assert not again()
        stderr = nsbuild("layered", spec, "-o", ref_of(kind, out), "--cache-dir", tmp_path / "cache").stderr
        assert "up to date" in stderr, stderr
        # Not rewritten (the same inode and bytes) but touched, so that make sees it newer than its inputs.
        assert out.stat().st_ino == st.st_ino and out.stat().st_mtime_ns >= st.st_mtime_ns
        assert sorted(p.name for p in out_dir.iterdir()) == ["img.tar"], "a temporary file left behind"

    rewritten()
    left_alone()
    for name, disturb in DISTURB.items():
        disturb(out)
        rewritten()
        left_alone()  # and the stamp of the rewrite is in place
        assert out.read_bytes() == fresh, name
    rewritten("--no-cache")
    rewritten()  # the cache's stamp is of the file --no-cache replaced

    spec = make_spec(tmp_path / "in", compressor, config={"Env": ["A=2"]})
    build(spec, ref_of(kind, tmp_path / "fresh2.tar"))
    fresh = (tmp_path / "fresh2.tar").read_bytes()
    rewritten()
    assert out.read_bytes() != (tmp_path / "fresh.tar").read_bytes()
    left_alone()
    skopeo_copy(ref_of(kind, out), f"oci:{tmp_path / 'copy'}:t")


@pytest.mark.parametrize(("kind", "compressor"), [("docker-archive", "zstd"), ("oci-archive", "none")])
def test_failed_build_leaves_no_file(tmp_path: Path, kind: str, compressor: str) -> None:
    """The content layers were already streamed into the temporary file when extraCommands fails."""
    good = make_spec(tmp_path / "in", compressor)
    bad = write_spec(tmp_path / "in", {**json.loads(good.read_text()), "extraCommands": "exit 3"}, "bad.json")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv: list[str | os.PathLike[str]] = ["layered", bad, "-o", ref_of(kind, out_dir / "img.tar"), "--jobs", "1", "-q"]
    proc = run_nsbuild([*argv, "--no-cache"])
    assert proc.returncode == 1, describe(proc)
    assert list(out_dir.iterdir()) == []
    # An earlier output stays as it was, even with the cache's stamp on it.
    nsbuild("layered", good, "-o", ref_of(kind, out_dir / "img.tar"), "--cache-dir", tmp_path / "cache", "-q")
    st, data = (out_dir / "img.tar").stat(), (out_dir / "img.tar").read_bytes()
    for flags in (["--no-cache"], ["--cache-dir", tmp_path / "cache"]):
        proc = run_nsbuild([*argv, *flags])
        assert proc.returncode == 1, describe(proc)
        assert [p.name for p in out_dir.iterdir()] == ["img.tar"]
        assert (out_dir / "img.tar").stat().st_ino == st.st_ino and (out_dir / "img.tar").read_bytes() == data
