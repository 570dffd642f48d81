"""Sharing the layer cache through a registry (--cache-to / --cache-from) between two "runners".

Each runner has its own cache directory and its own copy of the inputs (other paths, inodes and
mtimes, as two CI machines checking out the same commit). The second runner must download the
layers and build none of them, and produce the same image bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from support.core import write_spec
from support.registry import RegistryFactory
from support.users import account, describe, run_nsbuild
from support.verifiers import oci_validate, skopeo_copy, umoci_unpack

from nsbuild.cache.shared import CACHE_CONFIG_MEDIA, content_fingerprint
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.tarwriter import Source

TLS_OFF = "--tls-verify=false"
LAYER_LINE = re.compile(r"^nsbuild: \[(\d+)/(\d+)\] (.*?): .* \((cached|from cache .*|[0-9.]+s)\)$")
TREES = ("alpha", "beta", "gamma")


def make_inputs(d: Path, user: str | None, mtime: int) -> Path:
    """Three trees (a hardlink, a symlink, a 1 MiB file) and a spec naming them by relative path."""
    for name in TREES:
        t = d / name
        (t / "sub").mkdir(parents=True)
        (t / "sub" / "file.txt").write_text(f"{name} data\n")
        (t / "big.bin").write_bytes(name.encode() * ((1 << 20) // len(name)))
        os.link(t / "sub" / "file.txt", t / "hard.txt")
        os.symlink("sub/file.txt", t / "link")
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
            os.utime(p, (mtime, mtime), follow_symlinks=False)
            if user is not None:
                os.lchown(p, account(user).uid, account(user).gid)
    return write_spec(d, {"name": "shared", "tag": "1", "contents": [{"path": n, "target": f"/{n}"} for n in TREES]})


def states(stderr: str) -> dict[str, str]:
    """Layer comment → "cached" | "remote" | "built"."""
    out = {}
    for line in stderr.splitlines():
        m = LAYER_LINE.match(line)
        if m:
            s = m.group(4)
            out[m.group(3)] = "cached" if s == "cached" else "remote" if s.startswith("from cache") else "built"
    return out


def content(st: dict[str, str]) -> dict[str, str]:
    return {k.split(":")[0]: v for k, v in st.items() if k != "customisation layer"}


def build(user: str | None, spec: Path, out: str, *extra: str) -> str:
    proc = run_nsbuild(["layered", str(spec), "-o", out, *extra], user)
    assert proc.returncode == 0, describe(proc)
    return proc.stderr


def index_digest(layout: Path) -> str:
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def test_second_runner_downloads_and_does_not_rebuild(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry_factory: RegistryFactory,
) -> None:
    user = user_with_subids
    reg = registry_factory()
    shared = f"docker://{reg}/ci/cache:main"
    a, b = user_tmp(user), user_tmp(user)
    spec_a = make_inputs(a, user, mtime=1_600_000_000)
    spec_b = make_inputs(b, user, mtime=1_700_000_000)  # another checkout: other paths, inodes, mtimes

    err = build(user, spec_a, f"oci:{a / 'out'}", "--cache-dir", str(a / "cache"), "--cache-to", shared, TLS_OFF)
    assert content(states(err)) == {"contents[0]": "built", "contents[1]": "built", "contents[2]": "built"}, err
    assert "pushing the layer cache (3 layers)" in err
    # The record is an OCI artifact whose layers are the layer blobs (the registry keeps them).
    status, _, body = reg.request(
        "/v2/ci/cache/manifests/main", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    )
    assert status == 200
    record = json.loads(body)
    assert record["config"]["mediaType"] == CACHE_CONFIG_MEDIA
    a_manifest = json.loads((a / "out/blobs/sha256" / index_digest(a / "out").split(":")[1]).read_text())
    assert sorted(d["digest"] for d in record["layers"]) == sorted(d["digest"] for d in a_manifest["layers"][:3])

    err = build(user, spec_b, f"oci:{b / 'out'}", "--cache-dir", str(b / "cache"), "--cache-from", shared, TLS_OFF)
    assert content(states(err)) == {"contents[0]": "remote", "contents[1]": "remote", "contents[2]": "remote"}, err
    assert f"from cache {reg}/ci/cache:main" in err
    assert index_digest(b / "out") == index_digest(a / "out")  # the same image, byte for byte
    oci_validate(b / "out", user=user)
    mtree = umoci_unpack(b / "out", "1", b / "bundle", user=user)
    assert (b / "bundle/rootfs/beta/sub/file.txt").read_text() == "beta data\n"
    assert mtree["beta/hard.txt"].nlink == 2

    # The downloads went into runner B's own cache: the next build there needs no registry at all.
    err = build(user, spec_b, f"oci:{b / 'out2'}", "--cache-dir", str(b / "cache"))
    assert content(states(err)) == {"contents[0]": "cached", "contents[1]": "cached", "contents[2]": "cached"}, err

    # A third runner with one changed file: only that layer is built.
    c = user_tmp(user)
    spec_c = make_inputs(c, user, mtime=1_650_000_000)
    (c / "beta/sub/file.txt").write_text("beta DATA\n")  # same size, other bytes
    err = build(user, spec_c, f"oci:{c / 'out'}", "--cache-dir", str(c / "cache"), "--cache-from", shared, TLS_OFF)
    assert content(states(err)) == {"contents[0]": "remote", "contents[1]": "built", "contents[2]": "remote"}, err


def test_cache_to_after_a_local_change_records_the_new_content(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry_factory: RegistryFactory,
) -> None:
    """Runner A rebuilds with its local cache after an edit: unchanged layers come from the local cache
    (their content fingerprints from the memo beside it), and the record it pushes describes the
    edited inputs, not the old ones."""
    user = user_with_subids
    reg = registry_factory()
    shared = f"docker://{reg}/cache:main"
    a, b, c = user_tmp(user), user_tmp(user), user_tmp(user)
    spec_a = make_inputs(a, user, mtime=1_600_000_000)
    args = ["--cache-dir", str(a / "cache"), "--cache-to", shared, TLS_OFF]
    build(user, spec_a, f"oci:{a / 'out1'}", *args)
    assert len(list((a / "cache/content").iterdir())) == 3
    (a / "alpha/sub/file.txt").write_text("alpha DATA\n")
    err = build(user, spec_a, f"oci:{a / 'out2'}", *args)
    assert content(states(err)) == {"contents[0]": "built", "contents[1]": "cached", "contents[2]": "cached"}, err

    spec_b = make_inputs(b, user, mtime=1_700_000_000)
    (b / "alpha/sub/file.txt").write_text("alpha DATA\n")
    err = build(user, spec_b, f"oci:{b / 'out'}", "--cache-dir", str(b / "cache"), "--cache-from", shared, TLS_OFF)
    assert set(content(states(err)).values()) == {"remote"}, err
    assert index_digest(b / "out") == index_digest(a / "out2")

    spec_c = make_inputs(c, user, mtime=1_700_000_000)  # the old alpha: no longer in the record
    args = ["layered", str(spec_c), "-o", f"oci:{c / 'out'}", "--no-cache", "--cache-from", shared, TLS_OFF, "--json"]
    proc = run_nsbuild(args, user)
    assert proc.returncode == 0, describe(proc)
    assert content(states(proc.stderr)) == {
        "contents[0]": "built",
        "contents[1]": "remote",
        "contents[2]": "remote",
    }, proc.stderr
    assert index_digest(c / "out") == index_digest(a / "out1")
    # --json says the same per layer: where each came from (the customisation layer is always built).
    sources = [layer["source"] for layer in json.loads(proc.stdout)["layers"]]
    assert sources == ["built", "cache-from", "cache-from", "built"], sources


def test_shared_gzip_cache_feeds_a_docker_archive_without_local_cache(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry_factory: RegistryFactory,
) -> None:
    user = user_with_subids
    reg = registry_factory()
    shared = f"docker://{reg}/cache:gz"
    a, b = user_tmp(user), user_tmp(user)
    spec_a = make_inputs(a, user, mtime=1_600_000_000)
    spec_b = make_inputs(b, user, mtime=1_600_000_001)
    build(user, spec_a, f"oci:{a / 'out'}", "--no-cache", "--cache-to", shared, TLS_OFF)
    # docker-archive layers are plain tars: the gzip blobs are downloaded, decompressed and checked
    # against their diff_ids; with --no-cache they live in the build's workspace only.
    err = build(user, spec_b, str(b / "img.tar"), "--no-cache", "--cache-from", shared, TLS_OFF)
    assert set(content(states(err)).values()) == {"remote"}, err
    skopeo_copy(f"docker-archive:{b / 'img.tar'}", f"oci:{b / 'copy'}:t", user=user)
    a_cfg = json.loads(
        (
            a
            / "out/blobs/sha256"
            / json.loads((a / "out/blobs/sha256" / index_digest(a / "out").split(":")[1]).read_text())["config"][
                "digest"
            ].split(":")[1]
        ).read_text()
    )
    b_cfg = json.loads(
        (
            b
            / "copy/blobs/sha256"
            / json.loads((b / "copy/blobs/sha256" / index_digest(b / "copy").split(":")[1]).read_text())["config"][
                "digest"
            ].split(":")[1]
        ).read_text()
    )
    assert b_cfg["rootfs"]["diff_ids"] == a_cfg["rootfs"]["diff_ids"]
    assert not (b / "cache").exists()


def test_missing_shared_cache_builds(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry_factory: RegistryFactory,
) -> None:
    user = user_with_subids
    reg = registry_factory()
    a = user_tmp(user)
    spec = make_inputs(a, user, mtime=1)
    err = build(user, spec, f"oci:{a / 'out'}", "--no-cache", "--cache-from", f"docker://{reg}/cache:none", TLS_OFF)
    assert "no shared cache at" in err and set(content(states(err)).values()) == {"built"}, err
    proc = run_nsbuild(["layered", str(spec), "-o", f"oci:{a / 'x'}", "--cache-to", f"oci:{a / 'c'}"], user)
    assert proc.returncode == 2 and "--cache-to" in proc.stderr and proc.stderr.count("\n") == 1, describe(proc)


# --- the content fingerprint itself ------------------------------------------------------------------------


def _tree(d: Path, mtime: int) -> Path:
    (d / "dir").mkdir(parents=True)
    (d / "dir/a.txt").write_text("aaaa\n")
    (d / "b.bin").write_bytes(b"\0" * 70000)  # above the writer's small-file batch size
    os.symlink("dir/a.txt", d / "ln")
    for p in (d / "dir/a.txt", d / "b.bin", d / "dir", d):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.utime(p, (mtime, mtime))
    return d


def _user_xattrs(d: Path) -> bool:
    probe = d / ".xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def test_content_fingerprint_ignores_paths_inodes_and_mtimes(tmp_path: Path, owner: OwnerPolicy) -> None:
    one = _tree(tmp_path / "one", 1_000)
    two = _tree(tmp_path / "elsewhere/two", 2_000_000)
    fp = content_fingerprint([Source(one, "/app")], mtime=1, owner=owner)
    assert fp == content_fingerprint([Source(two, "/app")], mtime=1, owner=owner)
    # What changes the layer's bytes changes the fingerprint.
    assert fp != content_fingerprint([Source(two, "/other")], mtime=1, owner=owner)
    assert fp != content_fingerprint([Source(two, "/app")], mtime=2, owner=owner)
    other_owner = OwnerPolicy.fixed_owner(Owner(1000, 1000, "app", "app"))
    assert fp != content_fingerprint([Source(two, "/app")], mtime=1, owner=other_owner)
    changes = [
        lambda: (two / "dir/a.txt").write_text("aaab\n"),  # same size, other bytes
        lambda: os.chmod(two / "b.bin", 0o600),
        lambda: (os.unlink(two / "ln"), os.symlink("dir", two / "ln")),
        lambda: (os.unlink(two / "b.bin"), os.link(two / "dir/a.txt", two / "b.bin")),
    ]
    if _user_xattrs(two):
        changes.append(lambda: os.setxattr(two / "dir/a.txt", "user.x", b"1"))
    seen = {fp}
    for change in changes:
        change()
        now = content_fingerprint([Source(two, "/app")], mtime=1, owner=owner)
        assert now not in seen
        seen.add(now)
    shutil.rmtree(two)
