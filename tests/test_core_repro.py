"""Reproducibility: the same spec and inputs give the same bytes whoever builds them, however.

Varied between builds: the account (root, nsbuild-test, nsbuild-nosub when root), umask, TZ, locale,
cwd, the number of CPUs (compressor threads), the on-disk creation order of the inputs, and the layer
cache. Compared: the image digest and every byte of the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from support import UserTmpFactory, account, is_root, nsbuild_cmd, run_as
from support.core import BUSYBOX, FakeStore, build, write_spec

FORMATS = {
    "docker-archive-gz": ("gz", lambda d: f"docker-archive:{d}/img.tar.gz", "img.tar.gz"),
    "docker-archive-zstd": ("zstd", lambda d: f"docker-archive:{d}/img.tar.zst", "img.tar.zst"),
    "oci-archive-none": ("none", lambda d: f"oci-archive:{d}/img.oci.tar:t", "img.oci.tar"),
    "oci-dir-zstd": ("zstd", lambda d: f"oci:{d}/layout:t", "layout"),
}


def make_inputs(root: Path, reverse: bool = False) -> Path:
    """The same inputs, created in either order (directory listing order differs on disk)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o755)
    tree = root / "tree"
    names = [f"f{i:03d}" for i in range(60)]
    dirs = ["etc", "usr/lib", "usr/share/doc", "var/empty"]
    for d in reversed(dirs) if reverse else dirs:
        (tree / d).mkdir(parents=True, exist_ok=True)
    for n in reversed(names) if reverse else names:
        (tree / "usr" / "lib" / n).write_text(n * 50)
    (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    os.link(tree / "etc" / "hosts", tree / "etc" / "hosts.hard")
    (tree / "usr" / "bin").mkdir()
    shutil.copy2(BUSYBOX, tree / "usr" / "bin" / "busybox")
    (tree / "usr" / "bin" / "sh").symlink_to("busybox")
    store = FakeStore(root / "store")
    lib = store.add("lib-1", {"lib/libx.so": b"\x7fELF" + bytes(range(256)) * 40})
    app = store.add("app-1", {"bin/app": "#!/bin/sh\necho app\n"}, refs=[lib])
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)  # readable by the unprivileged builders
    write_spec(
        root,
        {
            "name": "repro",
            "compressor": "gz",
            "storeDir": str(store.dir),
            "contents": ["tree", str(app), {"path": "tree/etc", "target": "/opt/etc"}],
            "extraCommands": "mkdir -p tmp home/u && chmod 1777 tmp && date -u -d @$SOURCE_DATE_EPOCH > built-at\n"
            "touch -d '2020-01-01' home/u/touched && ls -l / > /dev/null",
            "config": {"Cmd": ["/usr/bin/sh"], "Env": ["A=1"], "Labels": {"z": "1", "a": "2"}},
        },
    )
    return root / "spec.json"


def spec_for(spec: Path, compressor: str) -> Path:
    data = json.loads(spec.read_text())
    data["compressor"] = compressor
    out = spec.with_name(f"spec-{compressor}.json")
    out.write_text(json.dumps(data))
    out.chmod(0o644)
    return out


def digest_tree(path: Path) -> str:
    """sha256 over a file, or over every file of a directory (names and bytes)."""
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


VARIANTS = [
    # (account, umask, TZ, LANG, cpus)
    (None, 0o022, "UTC", "C.UTF-8", None),
    ("test", 0o077, "Pacific/Kiritimati", "de_DE.UTF-8", "0"),
    ("nosub", 0o002, "America/St_Johns", "POSIX", None),
]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_same_bytes_whoever_builds(fmt: str, user_tmp: UserTmpFactory) -> None:
    inputs = user_tmp(None, prefix="nsbuild-repro-in-")
    compressor, ref_of, out_name = FORMATS[fmt]
    spec = spec_for(make_inputs(inputs / "in"), compressor)
    results = []
    for i, (user, umask, tz, lang, cpus) in enumerate(VARIANTS):
        if user is not None and not is_root():
            user = None  # as an ordinary user: vary everything else
        out_dir = user_tmp(user, prefix="nsbuild-repro-out-")
        cwd = account(user).home if i % 2 else out_dir
        argv = ["layered", str(spec), "-o", ref_of(out_dir), "--json", "--no-cache", "-q"]
        if i == 2:
            # The inputs again, created in the opposite order on disk.
            make_inputs(inputs / "in", reverse=True)
            spec = spec_for(inputs / "in" / "spec.json", compressor)
        prefix = ["taskset", "-c", cpus] if cpus is not None else []
        proc = run_as(
            [*prefix, *nsbuild_cmd(), *argv], user, env={"LANG": lang, "LC_ALL": lang}, umask=umask, tz=tz, cwd=cwd
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        results.append((result["image_digest"], result["tag"], digest_tree(out_dir / out_name), user))
    digests = {r[0] for r in results}
    assert len(digests) == 1, results
    assert len({r[1] for r in results}) == 1, "the default tag is derived from the content: stable"
    assert len({r[2] for r in results}) == 1, f"output bytes differ: {results}"


def test_stream_equals_layered_none(tmp_path: Path) -> None:
    spec = spec_for(make_inputs(tmp_path / "in"), "none")
    build(spec, tmp_path / "img.tar")
    proc = run_as([*nsbuild_cmd(), "stream", str(spec), "--no-cache", "-q"], text=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (tmp_path / "img.tar").read_bytes()
    # stream ignores the spec's compressor: same bytes from the gz spec.
    proc_gz = run_as([*nsbuild_cmd(), "stream", str(spec_for(spec, "gz")), "--no-cache", "-q"], text=False)
    assert proc_gz.stdout == proc.stdout


def test_cache_gives_the_same_bytes(tmp_path: Path) -> None:
    spec = spec_for(make_inputs(tmp_path / "in"), "zstd")
    build(spec, tmp_path / "nocache.tar.zst")
    for i in range(2):  # cold, then warm cache
        proc = run_as(
            [
                *nsbuild_cmd(),
                "layered",
                str(spec),
                "-o",
                str(tmp_path / f"cache{i}.tar.zst"),
                "--cache-dir",
                str(tmp_path / "cache"),
                "-q",
            ]
        )
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / f"cache{i}.tar.zst").read_bytes() == (tmp_path / "nocache.tar.zst").read_bytes()


def test_default_tag_follows_the_content(tmp_path: Path) -> None:
    spec = make_inputs(tmp_path / "in")
    tags = []
    for i in range(2):
        proc = build(spec, tmp_path / f"a{i}.tar", json_result=True)
        tags.append(proc.result["tag"])  # type: ignore[attr-defined]
    (tmp_path / "in" / "tree" / "etc" / "hosts").write_text("changed\n")
    tags.append(build(spec, tmp_path / "b.tar", json_result=True).result["tag"])  # type: ignore[attr-defined]
    assert tags[0] == tags[1] != tags[2]
    assert all(len(t) >= 8 for t in tags)


def test_same_bytes_from_another_checkout_and_file_system(tmp_path: Path) -> None:
    """The project copied elsewhere (here: onto a tmpfs, whose directory order is the reverse of
    ext4/overlay's): paths in the spec are relative, so nothing of the location may reach the image."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) on this machine")
    digests = []
    for i, parent in enumerate([tmp_path, Path("/dev/shm")]):
        work = Path(tempfile.mkdtemp(prefix="nsbuild-repro-", dir=parent))
        try:
            spec = make_inputs(work / "in", reverse=bool(i))
            data = json.loads(spec.read_text())
            data.pop("storeDir")
            data["contents"] = [c for c in data["contents"] if not str(c).startswith("/")]  # no store path
            spec.write_text(json.dumps(data))
            result = build(spec, work / "img.tar.gz", json_result=True).result  # type: ignore[attr-defined]
            digests.append((result["image_digest"], digest_tree(work / "img.tar.gz")))
        finally:
            shutil.rmtree(work)
    assert digests[0] == digests[1]


def test_parallel_layer_builds_give_the_same_bytes(tmp_path: Path) -> None:
    """Layers built one at a time or all at once (threads finishing in any order): same image."""
    spec = make_inputs(tmp_path / "in")
    data = json.loads(spec.read_text())
    data["contents"] += [{"path": "tree/usr", "target": f"/copy{i}"} for i in range(6)]
    spec.write_text(json.dumps(data))
    outputs = []
    for jobs in ("1", "8"):
        for fmt in ("img.tar.gz", "layout"):
            ref = tmp_path / f"j{jobs}-{fmt}"
            build(spec, f"oci:{ref}:t" if fmt == "layout" else ref, "--jobs", jobs)
            outputs.append((fmt, digest_tree(ref)))
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3], outputs


def test_gzip_headers_carry_no_name_or_time(tmp_path: Path) -> None:
    """The gzip member headers (whole docker-archive, OCI layer blobs): no FNAME, MTIME 0 - nothing of
    the build's moment or file names leaks into the bytes."""
    spec = spec_for(make_inputs(tmp_path / "in"), "gz")
    build(spec, tmp_path / "img.tar.gz")
    build(spec, f"oci:{tmp_path / 'layout'}:t")
    blobs = [tmp_path / "img.tar.gz"] + [
        p for p in (tmp_path / "layout" / "blobs" / "sha256").iterdir() if p.read_bytes()[:2] == b"\x1f\x8b"
    ]
    assert len(blobs) >= 4
    for blob in blobs:
        head = blob.read_bytes()[:10]
        assert head[:3] == b"\x1f\x8b\x08", blob
        flags, mtime = head[3], int.from_bytes(head[4:8], "little")
        assert not flags & 0x08, f"{blob}: FNAME set"
        assert mtime == 0, f"{blob}: MTIME {mtime}"
        assert subprocess.run(["gzip", "-t", str(blob)]).returncode == 0, f"{blob}: gzip -t fails"
