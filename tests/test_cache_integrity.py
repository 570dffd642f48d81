"""What the caches let in (issue 11): a forged shared-cache record, blobs edited in place, bit rot
before a push, and what killed builds leave in the cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from support.core import write_spec
from support.registry import Registry, RegistryFactory
from support.users import account, describe, popen_nsbuild, run_nsbuild

from nsbuild.cache.shared import CACHE_CONFIG_MEDIA, content_fingerprint
from nsbuild.layer.contentkey import TarMismatch, check_tar
from nsbuild.layer.layer import LayerRequest, build_layer
from nsbuild.tar.owners import OwnerPolicy
from nsbuild.tar.tarwriter import Source

TLS_OFF = "--tls-verify=false"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def ok(proc) -> str:  # noqa: ANN001
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    return proc.stderr


def tree(d: Path, files: dict[str, bytes], user: str | None) -> Path:
    """Files in a new directory `d`; it, what is in it and the directories made for it are the user's."""
    missing = [p for p in [d, *d.parents] if not p.exists()]
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    if user is not None:
        for p in [*missing, *d.iterdir()]:
            os.lchown(p, account(user).uid, account(user).gid)
    return d


def layer_files(layout: Path, tag: str) -> dict[str, bytes]:
    """Every regular file of every layer of the image `tag` in an OCI layout (read with tarfile)."""
    index = json.loads((layout / "index.json").read_text())
    digest = next(
        m["digest"]
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads((layout / "blobs/sha256" / digest.split(":")[1]).read_bytes())
    files = {}
    for layer in manifest["layers"]:
        with tarfile.open(layout / "blobs/sha256" / layer["digest"].split(":")[1]) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    files[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return files


# --- a forged --cache-from record -----------------------------------------------------------------------


def _upload(reg: Registry, repo: str, data: bytes) -> str:
    """A blob into the (plain http, no auth) registry with a monolithic upload; its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"{reg.url}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=30) as resp:
        location = resp.headers["Location"]
    if location.startswith("/"):
        location = reg.url + location
    sep = "&" if "?" in location else "?"
    req = urllib.request.Request(
        f"{location}{sep}digest={digest}", method="PUT", data=data, headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(req, timeout=30):
        pass
    return digest


def _get(reg: Registry, path: str, accept: str = OCI_MANIFEST) -> bytes:
    status, _, body = reg.request(path, headers={"Accept": accept})
    assert status == 200, (path, status, body)
    return body


def _record(reg: Registry, repo: str, tag: str) -> tuple[dict, dict]:
    """(manifest, config) of a cache record in the registry."""
    manifest = json.loads(_get(reg, f"/v2/{repo}/manifests/{tag}"))
    return manifest, json.loads(_get(reg, f"/v2/{repo}/blobs/{manifest['config']['digest']}", "*/*"))


def _push_record(reg: Registry, repo: str, tag: str, manifest: dict, config: dict) -> None:
    data = json.dumps(config, sort_keys=True).encode()
    manifest = {
        **manifest,
        "config": {"mediaType": CACHE_CONFIG_MEDIA, "digest": _upload(reg, repo, data), "size": len(data)},
    }
    req = urllib.request.Request(
        f"{reg.url}/v2/{repo}/manifests/{tag}",
        method="PUT",
        data=json.dumps(manifest).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    )
    with urllib.request.urlopen(req, timeout=30):
        pass


def forge_record(reg: Registry, repo: str, good_tag: str, evil_tag: str, forged_tag: str) -> None:
    """A record under `forged_tag` with the good record's fingerprints mapped to the evil record's
    layers (same positions), its blobs the evil ones: what a writer to the shared cache could push."""
    _, good = _record(reg, repo, good_tag)
    evil_manifest, evil = _record(reg, repo, evil_tag)
    forged = dict(zip(good["layers"], evil["layers"].values(), strict=True))
    _push_record(reg, repo, forged_tag, evil_manifest, {"format": good["format"], "layers": forged})


def misstate_diff_ids(reg: Registry, repo: str, good_tag: str, other_tag: str, forged_tag: str) -> None:
    """The good record, its blobs, but each layer's diff_id the other record's: the tar passes the
    content check, the image config would name a layer that is not there."""
    manifest, good = _record(reg, repo, good_tag)
    _, other = _record(reg, repo, other_tag)
    layers = {
        key: {**entry, "diff_id": wrong["diff_id"]}
        for (key, entry), wrong in zip(good["layers"].items(), other["layers"].values(), strict=True)
    }
    _push_record(reg, repo, forged_tag, manifest, {"format": good["format"], "layers": layers})


def test_forged_cache_from_record_cannot_inject_a_file(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry_factory: RegistryFactory,
) -> None:
    user = user_with_subids
    reg = registry_factory()
    repo = "ci/cache"
    d = user_tmp(user)
    good = tree(d / "good/app", {"hello.txt": b"hello\n"}, user)
    evil = tree(d / "evil/app", {"hello.txt": b"hello\n", "EVIL": b"pwned\n"}, user)
    specs = {}
    for name, t in (("good", good), ("evil", evil)):
        specs[name] = write_spec(
            d / name, {"name": "victim", "tag": "1", "contents": [{"path": str(t), "target": "/app"}]}
        )
        ok(
            run_nsbuild(
                [
                    "layered",
                    str(specs[name]),
                    "-o",
                    f"oci:{d / name / 'out'}:1",
                    "--no-cache",
                    "--cache-to",
                    f"docker://{reg}/{repo}:{name}",
                    TLS_OFF,
                ],
                user,
            )
        )
    forge_record(reg, repo, "good", "evil", "forged")

    # Another runner, its own cache: the forged record matches its fingerprint, the blob does not.
    err = ok(
        run_nsbuild(
            [
                "layered",
                str(specs["good"]),
                "-o",
                f"oci:{d / 'victim'}:1",
                "--cache-dir",
                str(d / "cache"),
                "--cache-from",
                f"docker://{reg}/{repo}:forged",
                TLS_OFF,
            ],
            user,
        )
    )
    assert "refusing the layer recorded for contents[0]" in err, err
    assert "from cache" not in err, err
    files = layer_files(d / "victim", "1")
    assert "app/EVIL" not in files and files["app/hello.txt"] == b"hello\n"
    assert (d / "victim/index.json").read_bytes() == (d / "good/out/index.json").read_bytes()
    # Nothing of the forged layer entered the local cache: the next build takes only its own layer.
    ok(
        run_nsbuild(
            ["layered", str(specs["good"]), "-o", f"oci:{d / 'again'}:1", "--cache-dir", str(d / "cache")], user
        )
    )
    assert "app/EVIL" not in layer_files(d / "again", "1")
    # A record with the right blob and a wrong diff_id is refused too (the config would be wrong).
    misstate_diff_ids(reg, repo, "good", "evil", "lying")
    err = ok(
        run_nsbuild(
            [
                "layered",
                str(specs["good"]),
                "-o",
                f"oci:{d / 'lied'}:1",
                "--no-cache",
                "--cache-from",
                f"docker://{reg}/{repo}:lying",
                TLS_OFF,
            ],
            user,
        )
    )
    assert "refusing the layer recorded for contents[0]" in err and "the record says" in err, err
    assert (d / "lied/index.json").read_bytes() == (d / "good/out/index.json").read_bytes()
    # The honest record still serves.
    err = ok(
        run_nsbuild(
            [
                "layered",
                str(specs["good"]),
                "-o",
                f"oci:{d / 'honest'}:1",
                "--no-cache",
                "--cache-from",
                f"docker://{reg}/{repo}:good",
                TLS_OFF,
            ],
            user,
        )
    )
    assert "from cache" in err and "refusing" not in err, err


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_honest_records_of_every_compression_are_served(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry_factory: RegistryFactory,
    compressor: str,
) -> None:
    """The check passes what the writer wrote: plain tars (the blob is the tar) and zstd blobs, into a
    layout and a docker-archive (which needs the tars), with and without a local cache."""
    user = user_with_subids
    reg = registry_factory()
    shared = f"docker://{reg}/c:{compressor}"
    d = user_tmp(user)
    t = tree(d / "in/app", {"a.txt": b"a\n", "big.bin": os.urandom(200_000)}, user)
    spec = write_spec(
        d, {"name": "h", "tag": "1", "compressor": compressor, "contents": [{"path": str(t), "target": "/app"}]}
    )
    ok(run_nsbuild(["layered", str(spec), "-o", f"oci:{d / 'a'}:1", "--no-cache", "--cache-to", shared, TLS_OFF], user))
    ok(run_nsbuild(["layered", str(spec), "-o", str(d / "a.tar"), "--no-cache"], user))
    for name, out, extra in (
        ("b", f"oci:{d / 'b'}:1", ["--no-cache"]),
        ("c", str(d / "c.tar"), ["--cache-dir", str(d / "cache")]),
    ):
        err = ok(run_nsbuild(["layered", str(spec), "-o", out, *extra, "--cache-from", shared, TLS_OFF], user))
        assert "from cache" in err and "refusing" not in err, err
        if name == "b":
            assert (d / "b/index.json").read_bytes() == (d / "a/index.json").read_bytes()
        else:
            assert (d / "c.tar").read_bytes() == (d / "a.tar").read_bytes()


def _layer_tar(tmp: Path, owner: OwnerPolicy) -> tuple[bytes, str]:
    src = tree(tmp / "src", {"a.txt": b"a" * 10, "big.bin": os.urandom(100_000), "empty": b""}, None)
    os.symlink("a.txt", src / "ln")
    (src / ("long" * 40)).write_bytes(b"long name\n")  # a PAX path record
    sources = [Source(src, "/x")]
    request = LayerRequest(sources, mtime=7, owner=owner, compression="none", keep_tar=True, comment="t")
    layer = build_layer(request, tmp / "blobs")
    assert layer.tar.path is not None
    return layer.tar.path.read_bytes(), content_fingerprint(sources, mtime=7, owner=owner)


def test_check_tar_accepts_the_writers_tar_and_nothing_else(tmp_path: Path, owner: OwnerPolicy) -> None:
    data, key = _layer_tar(tmp_path, owner)
    check_tar(io.BytesIO(data).read, key, mtime=7, owner=owner)
    with pytest.raises(TarMismatch):
        check_tar(io.BytesIO(data).read, key, mtime=8, owner=owner)
    flipped = bytearray(data)
    flipped[data.index(b"a" * 10)] ^= 1  # a file's byte
    padding = bytearray(data)
    padding[data.index(b"a" * 10) + 10] = ord("X")  # the zero padding after it
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    mode = bytearray(data)
    mode[members[1].offset + 100 : members[1].offset + 107] = b"0000777"  # a header field
    variants = {
        "flipped data": bytes(flipped),
        "junk in padding": bytes(padding),
        "header": bytes(mode),
        "appended": data + b"\0" * 512,
        "truncated": data[:-1024],
        "trailing junk": data + b"EVIL",
    }
    for what, bad in variants.items():
        with pytest.raises(TarMismatch):
            check_tar(io.BytesIO(bad).read, key, mtime=7, owner=owner)
            pytest.fail(f"{what}: accepted")


# --- the local cache's blobs ------------------------------------------------------------------------------


class Cached:
    def __init__(self, d: Path, user: str | None) -> None:
        self.d, self.user = d, user
        self.cache = d / "cache"
        t = tree(d / "in", {"data.bin": os.urandom(300_000), "small.txt": b"small\n"}, user)
        self.spec = write_spec(d, {"name": "c", "tag": "t", "compressor": "gz", "contents": [str(t)]})
        self.n = 0

    def build(self, *extra: str, expect: int = 0) -> tuple[str, Path]:
        self.n += 1
        out = self.d / f"out{self.n}.tar"
        proc = run_nsbuild(
            ["layered", str(self.spec), "-o", f"oci-archive:{out}", "--cache-dir", str(self.cache), *extra], self.user
        )
        if expect == 0:
            return ok(proc), out
        assert proc.returncode == expect, describe(proc)
        return proc.stderr, out

    def largest_blob(self) -> Path:
        return max((self.cache / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)

    def run(self, *args: str) -> object:
        return run_nsbuild([*args, "--cache-dir", str(self.cache)], self.user)


def corrupt_in_place(path: Path) -> None:
    """Flip one byte inside the file, keeping its size, mtime and mode (ctime moves: nobody can set it)."""
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    path.chmod(st.st_mode & 0o777)
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_blob_edited_in_place_with_size_and_mtime_kept_is_not_served(unprivileged_user: str | None, user_tmp) -> None:  # noqa: ANN001
    c = Cached(user_tmp(unprivileged_user), unprivileged_user)
    _, first = c.build()
    victim = c.largest_blob()
    corrupt_in_place(victim)
    err, again = c.build()
    assert "(cached)" not in err.split("contents[0]")[1].splitlines()[0], err
    assert again.read_bytes() == first.read_bytes()
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim.name  # rebuilt and stored again
    err, _ = c.build()
    assert "(cached)" in err.split("contents[0]")[1].splitlines()[0], err


def _stamp_as_is(cache: Path) -> None:
    """Record every blob's current stat in the entries, as if its damage had come from the disk (bit
    rot, the raw device): what no stamp can see."""
    for entry_path in (cache / "layers").glob("*.json"):
        entry = json.loads(entry_path.read_text())
        for rec in [entry.get("tar"), *entry.get("compressed", {}).values()]:
            if rec:
                st = (cache / "blobs/sha256" / rec["digest"].split(":")[1]).stat()
                rec["stamp"] = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
        entry_path.write_text(json.dumps(entry))


def test_cache_verify_finds_what_stamps_cannot(unprivileged_user: str | None, user_tmp) -> None:  # noqa: ANN001
    c = Cached(user_tmp(unprivileged_user), unprivileged_user)
    _, first = c.build()
    proc = c.run("cache", "verify")
    assert proc.returncode == 0 and "0 problems" in proc.stdout, describe(proc)
    victim = c.largest_blob()
    corrupt_in_place(victim)
    _stamp_as_is(c.cache)
    proc = c.run("cache", "verify")
    assert proc.returncode == 1, describe(proc)
    assert f"blob sha256:{victim.name} has the digest" in proc.stderr and "Traceback" not in proc.stderr
    assert not victim.exists()
    proc = c.run("cache", "verify")
    assert proc.returncode == 0, describe(proc)
    _, again = c.build()
    assert again.read_bytes() == first.read_bytes()


def test_push_refuses_a_corrupted_cached_blob(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry: str,
) -> None:
    c = Cached(user_tmp(user_with_subids), user_with_subids)
    c.build()
    victim = c.largest_blob()
    corrupt_in_place(victim)
    _stamp_as_is(c.cache)
    proc = run_nsbuild(
        ["layered", str(c.spec), "-o", f"docker://{registry}/app:1", "--cache-dir", str(c.cache), TLS_OFF],
        user_with_subids,
    )
    assert proc.returncode == 1, describe(proc)
    assert "is corrupted" in proc.stderr and "cache verify" in proc.stderr, describe(proc)
    assert proc.stderr.count("\n") <= 12 and "Traceback" not in proc.stderr


def test_sbom_scan_refuses_a_corrupted_cached_blob(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    """The SBOM's package scan reads cached layer blobs: it checks their digests first, as a push does,
    so a damaged blob is never read as if it were the layer (and no layout is written)."""
    c = Cached(user_tmp(user_with_subids), user_with_subids)
    c.build()
    victim = c.largest_blob()
    corrupt_in_place(victim)
    _stamp_as_is(c.cache)
    out = c.d / "layout"
    proc = run_nsbuild(
        ["layered", str(c.spec), "-o", f"oci:{out}:1", "--cache-dir", str(c.cache), "--sbom", "spdx"],
        user_with_subids,
    )
    assert proc.returncode == 1, describe(proc)
    assert "is corrupted" in proc.stderr and "cache verify" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr and not out.exists()


# --- killed builds ----------------------------------------------------------------------------------------


def temporaries(cache: Path) -> list[Path]:
    found = [p for p in (cache / "tmp").rglob("*") if p.is_file()] if (cache / "tmp").exists() else []
    for d in (cache, cache / "layers", cache / "blobs/sha256", cache / "content"):
        if d.is_dir():
            found += [p for p in d.iterdir() if p.name.startswith(".")]
    return found


def test_killed_builds_leave_no_temporary_file_in_the_cache(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    user = user_with_subids
    d = user_tmp(user)
    t = tree(d / "in", {f"f{i}.bin": os.urandom(1 << 20) for i in range(40)}, user)
    spec = write_spec(d, {"name": "k", "tag": "t", "compressor": "gz", "contents": [str(t)]})
    cache = d / "cache"
    args = ["layered", str(spec), "-o", f"oci-archive:{d / 'o.tar'}", "--cache-dir", str(cache), "-j", "1"]
    for _ in range(3):
        proc = popen_nsbuild(args, user)
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".tmp-") for p in temporaries(cache)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary file appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert temporaries(cache), "the kills left nothing to sweep: the test proves nothing"
    du = run_nsbuild(["cache", "du", "--cache-dir", str(cache)], user)
    assert du.returncode == 0 and " 0 temporary files" not in du.stdout, describe(du)
    ok(run_nsbuild(args, user))
    assert temporaries(cache) == [], temporaries(cache)
    du = run_nsbuild(["cache", "du", "--cache-dir", str(cache)], user)
    assert "; 0 temporary files" in du.stdout, describe(du)
    ok(run_nsbuild(["layered", str(spec), "-o", f"oci-archive:{d / 'clean.tar'}", "--no-cache"], user))
    assert (d / "o.tar").read_bytes() == (d / "clean.tar").read_bytes()


def test_kills_at_random_moments_leave_a_consistent_cache(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    """kill -9 anywhere (pulling nothing, building, publishing, writing entries, writing the output):
    the cache stays consistent (`cache verify` finds nothing), the next build gives a clean build's
    bytes and sweeps every temporary."""
    user = user_with_subids
    d = user_tmp(user)
    trees = [tree(d / "in" / f"t{i}", {"data.bin": os.urandom(4 << 20), "x.txt": b"x\n"}, user) for i in range(4)]
    spec = write_spec(d, {"name": "k", "tag": "t", "compressor": "gz", "contents": [str(t) for t in trees]})
    cache = d / "cache"
    args = ["layered", str(spec), "-o", f"oci:{d / 'layout'}:t", "--cache-dir", str(cache)]
    rng = random.Random(11)
    for i in range(12):
        if i % 3 == 0:  # a changed input: some layers come from the cache, one is built
            (trees[i % 4] / "x.txt").write_bytes(os.urandom(8))
        proc = popen_nsbuild(args, user)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    verify = run_nsbuild(["cache", "verify", "--cache-dir", str(cache)], user)
    assert verify.returncode == 0 and "0 problems" in verify.stdout, describe(verify)
    ok(run_nsbuild(args, user))
    assert temporaries(cache) == [], temporaries(cache)
    ok(run_nsbuild(["layered", str(spec), "-o", f"oci:{d / 'clean'}:t", "--no-cache"], user))
    index = json.loads((d / "layout/index.json").read_text())
    clean = json.loads((d / "clean/index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [m["digest"] for m in clean["manifests"]]
