"""fromImage: docker-archive (plain/gz/zstd) and OCI dir/archive bases, built with nsbuild itself (and
one made by skopeo); base layers reused byte-for-byte, Env merged key-wise, the result runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from support import oci_manifest, podman_store, skopeo_copy, umoci_unpack
from support.core import BUSYBOX, build, read_image, write_spec

BASE_ENV = ["PATH=/bin", "FROM_BASE=1", "SHARED=base"]
CHILD_ENV = ["SHARED=child", "CHILD=1"]
EXPECTED_ENV = {"PATH": "/bin", "FROM_BASE": "1", "SHARED": "child", "CHILD": "1"}


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("base") / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "cat", "env", "ls"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "base-release").write_text("base\n")
    return root


def make_base(tmp: Path, base_tree: Path, fmt: str, compressor: str) -> tuple[str, Path]:
    """Build the base with nsbuild; returns (fromImage reference, path)."""
    spec = write_spec(
        tmp,
        {
            "name": "base",
            "tag": "b1",
            "compressor": compressor,
            "contents": [str(base_tree)],
            "extraCommands": "mkdir -p etc && echo custom > etc/base-custom",
            "config": {"Env": BASE_ENV, "WorkingDir": "/etc"},
        },
        "base.json",
    )
    if fmt == "docker-archive":
        path = tmp / {"none": "base.tar", "gz": "base.tar.gz", "zstd": "base.tar.zst"}[compressor]
        build(spec, path)
        return str(path), path
    if fmt == "oci-dir":
        path = tmp / "base-layout"
        build(spec, f"oci:{path}:b1")
        return f"oci:{path}:b1", path
    path = tmp / "base.oci.tar"
    build(spec, f"oci-archive:{path}:b1")
    return f"oci-archive:{path}", path


def child_spec(tmp: Path, from_image: str, **extra: object) -> Path:
    return write_spec(
        tmp,
        {
            "name": "child",
            "tag": "c1",
            "fromImage": from_image,
            "extraCommands": "mkdir -p etc && echo child > etc/child-release",
            "config": {"Env": CHILD_ENV, "Cmd": ["/bin/sh", "-c", "cat base-release child-release; env"]},
            **extra,
        },
        "child.json",
    )


def check_child_runs(image_path: Path, tag: str | None = None) -> None:
    with podman_store() as ps:
        image = ps.pull(f"oci:{image_path}:{tag}") if image_path.is_dir() else ps.load(image_path)
        out = ps.run(image)
    lines = out.splitlines()
    assert lines[:2] == ["base", "child"], out
    env = dict(line.split("=", 1) for line in lines[2:] if "=" in line)
    for k, v in EXPECTED_ENV.items():
        assert env.get(k) == v, (k, out)
    assert sum(1 for line in lines if line.startswith("SHARED=")) == 1


BASES = [
    ("docker-archive", "none"),
    ("docker-archive", "gz"),
    ("docker-archive", "zstd"),
    ("oci-dir", "none"),
    ("oci-dir", "zstd"),
    ("oci-archive", "none"),
    ("oci-archive", "zstd"),
]


@pytest.mark.parametrize(("fmt", "compressor"), BASES, ids=[f"{f}-{c}" for f, c in BASES])
def test_from_image_reuses_base_layers(tmp_path: Path, base_tree: Path, fmt: str, compressor: str) -> None:
    ref, path = make_base(tmp_path, base_tree, fmt, compressor)
    base = read_image(path, tmp_path / "base-view", tag="b1")
    n = len(base.layers)
    assert n == 2

    # Child as a docker-archive: the base's layer tars are the same bytes.
    spec = child_spec(tmp_path, ref)
    build(spec, tmp_path / "child.tar")
    child = read_image(tmp_path / "child.tar", tmp_path / "child-view")
    assert child.config["rootfs"]["diff_ids"][:n] == base.config["rootfs"]["diff_ids"]
    assert len(child.layers) == n + 1
    for i in range(n):
        assert child.plain_paths[i].read_bytes() == base.plain_paths[i].read_bytes()
    env = child.config["config"]["Env"]
    assert dict(e.split("=", 1) for e in env) == EXPECTED_ENV and len(env) == len(EXPECTED_ENV)
    assert child.config["config"]["WorkingDir"] == "/etc"
    assert len(child.config["history"]) == n + 1
    check_child_runs(tmp_path / "child.tar")

    # Child as an OCI layout with the base's compression: the very same blobs (digest, size, type).
    if fmt != "docker-archive":
        spec = child_spec(tmp_path, ref, compressor=compressor)
        layout = tmp_path / "child-layout"
        build(spec, f"oci:{layout}:c1")
        assert oci_manifest(layout, "c1")["layers"][:n] == base.manifest["layers"]
        if compressor != "zstd":
            umoci_unpack(layout, "c1", tmp_path / "bundle")
        check_child_runs(layout, "c1")


def test_from_image_made_by_skopeo_with_gzip_layers(tmp_path: Path, base_tree: Path) -> None:
    """A base nsbuild did not write: skopeo's OCI layout with gzip layers; they are kept as they are."""
    ref, path = make_base(tmp_path, base_tree, "docker-archive", "none")
    layout = tmp_path / "skopeo-layout"
    skopeo_copy(f"docker-archive:{path}", f"oci:{layout}:b1", "--dest-compress-format", "gzip", "--dest-compress")
    base_layers = oci_manifest(layout, "b1")["layers"]
    spec = child_spec(tmp_path, f"oci:{layout}:b1", compressor="zstd")
    out = tmp_path / "child-layout"
    build(spec, f"oci:{out}:c1")
    layers = oci_manifest(out, "c1")["layers"]
    assert layers[:2] == base_layers
    assert layers[2]["mediaType"].endswith("+zstd")
    check_child_runs(out, "c1")
    build(child_spec(tmp_path, f"oci:{layout}:b1"), tmp_path / "child.tar")
    check_child_runs(tmp_path / "child.tar")


def test_from_image_relative_to_the_spec(tmp_path: Path, base_tree: Path) -> None:
    """Relative paths in a spec are relative to the spec file (DESIGN.md §2), fromImage included, as a
    bare path and inside a transport reference."""
    _, path = make_base(tmp_path, base_tree, "docker-archive", "gz")
    _, layout = make_base(tmp_path, base_tree, "oci-dir", "none")
    (tmp_path / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere" / "deeper"  # "../x" from here is not "../x" from sub/
    elsewhere.mkdir(parents=True)
    for i, ref in enumerate(["../base.tar.gz", f"docker-archive:../{path.name}", f"oci:../{layout.name}:b1"]):
        spec = write_spec(tmp_path / "sub", {"name": "child", "tag": "c1", "fromImage": ref}, f"s{i}.json")
        build(spec, tmp_path / f"child{i}.tar", cwd=elsewhere)
        assert len(read_image(tmp_path / f"child{i}.tar", tmp_path / f"v{i}").layers) == 3


def test_corrupt_base_layer_is_a_build_error(tmp_path: Path, base_tree: Path) -> None:
    _, layout = make_base(tmp_path, base_tree, "oci-dir", "none")
    manifest = oci_manifest(layout, "b1")
    blob = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    spec = child_spec(tmp_path, f"oci:{layout}:b1")
    proc = build(spec, tmp_path / "child.tar", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "digest" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("nsbuild: error:")
    assert not (tmp_path / "child.tar").exists()


def test_missing_base_tag_is_a_clear_error(tmp_path: Path, base_tree: Path) -> None:
    _, layout = make_base(tmp_path, base_tree, "oci-dir", "none")
    proc = build(child_spec(tmp_path, f"oci:{layout}:nope"), tmp_path / "child.tar", check=False)
    assert proc.returncode in (1, 2) and "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "child.tar").exists()


def test_base_config_digest_is_not_reused_blindly(tmp_path: Path, base_tree: Path) -> None:
    """The child's config is new (rootfs/history grow), the base's blobs are unchanged on disk."""
    ref, layout = make_base(tmp_path, base_tree, "oci-dir", "none")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (layout / "blobs" / "sha256").iterdir()}
    build(child_spec(tmp_path, ref), tmp_path / "child.tar")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (layout / "blobs" / "sha256").iterdir()}
    assert before == after
    assert (
        json.loads((layout / "index.json").read_text())["manifests"][0]["annotations"][
            "org.opencontainers.image.ref.name"
        ]
        == "b1"
    )


@pytest.mark.parametrize(
    "tool", ["skopeo-docker-archive", "podman-save-docker", "podman-save-oci-archive", "podman-save-oci-dir"]
)
def test_from_image_written_by_other_tools(tmp_path: Path, base_tree: Path, tool: str) -> None:
    """Bases as skopeo and `podman save` write them (their own member names and layouts)."""
    _, path = make_base(tmp_path, base_tree, "docker-archive", "none")
    if tool == "skopeo-docker-archive":
        out = tmp_path / "skopeo.tar"
        skopeo_copy(f"docker-archive:{path}", f"docker-archive:{out}:base:b1")
        ref = str(out)
    else:
        with podman_store() as ps:
            image = ps.load(path)
            fmt = {
                "podman-save-docker": "docker-archive",
                "podman-save-oci-archive": "oci-archive",
                "podman-save-oci-dir": "oci-dir",
            }[tool]
            out = tmp_path / f"saved-{fmt}"
            ps.podman("save", "--format", fmt, "-o", str(out), image)
        ref = str(out)
    base = read_image(path, tmp_path / "base-view")
    build(child_spec(tmp_path, ref), tmp_path / "child.tar")
    child = read_image(tmp_path / "child.tar", tmp_path / "child-view")
    assert child.config["rootfs"]["diff_ids"][:2] == base.config["rootfs"]["diff_ids"]
    check_child_runs(tmp_path / "child.tar")


def test_from_image_picks_the_architecture_from_an_index(tmp_path: Path, base_tree: Path) -> None:
    """A multi-architecture base: a nested image index whose entries carry platforms."""
    layout = tmp_path / "multi"
    digests = {}
    for arch in ("amd64", "arm64"):
        etc = tmp_path / f"etc-{arch}" / "etc"
        etc.mkdir(parents=True)
        (etc / "arch").write_text(f"{arch}\n")
        spec = write_spec(
            tmp_path,
            {
                "name": "base",
                "tag": arch,
                "architecture": arch,
                "compressor": "none",
                "contents": [str(base_tree), str(etc.parent)],
            },
            f"{arch}.json",
        )
        build(spec, f"oci:{layout}:{arch}")
        digests[arch] = oci_manifest(layout, arch)
    index_doc = json.loads((layout / "index.json").read_text())
    nested = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                **{k: v for k, v in m.items() if k != "annotations"},
                "platform": {"architecture": m["annotations"]["org.opencontainers.image.ref.name"], "os": "linux"},
            }
            for m in index_doc["manifests"]
            if "artifactType" not in m  # the SBOMs beside each image
        ],
    }
    data = json.dumps(nested).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index_doc["manifests"] = [
        {
            "mediaType": nested["mediaType"],
            "digest": f"sha256:{digest}",
            "size": len(data),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }
    ]
    (layout / "index.json").write_text(json.dumps(index_doc))
    for arch in ("amd64", "arm64"):
        spec = child_spec(tmp_path, f"oci:{layout}:multi", architecture=arch, compressor="none")
        build(spec, tmp_path / f"child-{arch}.tar")
        child = read_image(tmp_path / f"child-{arch}.tar", tmp_path / f"view-{arch}")
        assert child.config["architecture"] == arch
        base_layers = [d["digest"] for d in digests[arch]["layers"]]  # uncompressed: digest == diff_id
        assert child.config["rootfs"]["diff_ids"][: len(base_layers)] == base_layers
    spec = child_spec(tmp_path, f"oci:{layout}:multi", architecture="s390x")
    proc = build(spec, tmp_path / "child-s390x.tar", check=False)
    assert proc.returncode == 1 and "s390x" in proc.stderr and "amd64" in proc.stderr, proc.stderr


def test_docker_archive_base_into_a_gzip_oci_layout(tmp_path: Path, base_tree: Path) -> None:
    ref, path = make_base(tmp_path, base_tree, "docker-archive", "none")
    base = read_image(path, tmp_path / "base-view")
    layout = tmp_path / "child-layout"
    build(child_spec(tmp_path, ref, compressor="gz"), f"oci:{layout}:c1")
    manifest = oci_manifest(layout, "c1")
    assert all(d["mediaType"].endswith("+gzip") for d in manifest["layers"])
    mtree = umoci_unpack(layout, "c1", tmp_path / "bundle")  # checks diff_ids against the gzip blobs
    assert "etc/base-release" in mtree and "etc/child-release" in mtree
    child = read_image(layout, tmp_path / "child-view", tag="c1")
    assert child.config["rootfs"]["diff_ids"][:2] == base.config["rootfs"]["diff_ids"]
