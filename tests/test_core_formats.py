"""Every output format × compressor of the bundled example, checked by the real clients
(VERIFIERS.md): skopeo, umoci, oci-image-tool, podman load/pull + run, bsdtar and GNU tar."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from support import (
    check_all_layers,
    compression_of,
    docker_daemon,
    has_subids,
    oci_manifest,
    oci_validate,
    podman_load_and_run,
    podman_store,
    run_nsbuild,
    skopeo_copy,
    to_gzip_oci,
    umoci_unpack,
)
from support.core import EXAMPLE_SPEC, build, read_image, write_spec

COMPRESSORS = ["none", "gz", "zstd"]
FORMATS = ["docker-archive", "oci-dir", "oci-archive"]
OCI_MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gz": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MAGIC = {"none": None, "gz": "gz", "zstd": "zstd"}
GREETING = "hello from app in /home/app, GREETING=hello"


def assert_greets(out: str) -> None:
    """The example's Cmd ran as its User in its WorkingDir with its Env, and saw extraCommands' output
    (its middle lines are the example's business)."""
    lines = out.splitlines()
    assert lines and lines[0] == GREETING and lines[-1] == "built by nsbuild", out


def example_spec(tmp: Path, **overrides: object) -> Path:
    """The bundled example with absolute content paths, written into tmp with overrides applied."""
    spec = json.loads(EXAMPLE_SPEC.read_text())
    spec["contents"] = [str(EXAMPLE_SPEC.parent / "rootfs"), *spec["contents"][1:]]
    spec.update(overrides)
    return write_spec(tmp, spec)


# A docker-archive compressed as a whole, as dockerTools writes it: the name says so (a plain .tar holds
# compressed layer files instead: tests/test_make_ci.py).
DOCKER_NAMES = {"none": "image.tar", "gz": "image.tar.gz", "zstd": "image.tar.zst"}


def output_ref(fmt: str, tmp: Path, compressor: str = "none") -> tuple[str, Path]:
    if fmt == "docker-archive":
        path = tmp / DOCKER_NAMES[compressor]
        return f"docker-archive:{path}", path
    if fmt == "oci-dir":
        path = tmp / "layout"
        return f"oci:{path}:latest", path
    path = tmp / "image.oci.tar"
    return f"oci-archive:{path}:latest", path


MATRIX = [pytest.param(fmt, comp, id=f"{fmt}-{comp}") for fmt in FORMATS for comp in COMPRESSORS]


@pytest.mark.parametrize(("fmt", "compressor"), MATRIX)
def test_every_format_and_compressor_is_accepted_by_the_clients(tmp_path: Path, fmt: str, compressor: str) -> None:
    spec = example_spec(tmp_path, compressor=compressor)
    ref, path = output_ref(fmt, tmp_path, compressor)
    result = build(spec, ref, json_result=True).result  # type: ignore[attr-defined]
    assert result["format"] == fmt

    # The compression lands where dockerTools / the OCI spec put it.
    view = read_image(path, tmp_path / "view", tag="latest")
    if fmt == "docker-archive":
        assert compression_of(path) == MAGIC[compressor]
        for layer in view.layer_paths:
            assert compression_of(layer) is None, "docker-archive layers are plain tars inside the archive"
    else:
        assert compression_of(path) is None if fmt == "oci-archive" else path.is_dir()
        assert [d["mediaType"] for d in view.manifest["layers"]] == [OCI_MEDIA[compressor]] * len(view.layers)
        for layer in view.layer_paths:
            assert compression_of(layer) == MAGIC[compressor]
    assert len(view.layers) == 3  # rootfs, busybox, customisation layer
    assert view.config["rootfs"]["diff_ids"] == [layer["diff_id"] for layer in result["layers"]]

    # skopeo checks layer bytes against diff_ids / digests; then umoci and oci-image-tool on the copy
    # (gzip layers: neither knows zstd).
    gz_layout = to_gzip_oci(ref, tmp_path / "gz-layout", "t")
    umoci_unpack(gz_layout, "t", tmp_path / "bundle-copy")
    oci_validate(gz_layout)
    if fmt != "docker-archive" and compressor != "zstd":
        # The output itself, not only skopeo's copy of it.
        layout = path
        if fmt == "oci-archive":
            layout = tmp_path / "extracted"
            layout.mkdir()
            shutil.unpack_archive(path, layout, format="tar")
        mtree = umoci_unpack(layout, "latest", tmp_path / "bundle")
        assert mtree["bin/busybox"].mode == 0o755
        assert mtree["bin/sh"].link == "busybox"
        assert mtree["tmp"].mode == 0o1777
        oci_validate(path)
    # Every layer, extracted by bsdtar and GNU tar: no `..`, no absolute names, no traversal.
    names = check_all_layers(path, tmp_path / "tars", tag="latest")
    assert "bin/busybox" in names[1]

    with podman_store() as store:
        image = store.load(path) if fmt != "oci-dir" else store.pull(f"oci:{path}:latest")
        assert_greets(store.run(image))
        assert store.run(image, ["id"]).startswith("uid=1000(app)")


def test_oci_dir_from_format_option_and_zstd_blob_digests(tmp_path: Path) -> None:
    """A bare -o path with --format oci-dir; zstd blobs are named by the digest of their bytes."""
    spec = example_spec(tmp_path, compressor="zstd")
    out = tmp_path / "layout"
    build(spec, out, "--format", "oci-dir")
    manifest = oci_manifest(out, "latest")
    for desc in manifest["layers"]:
        blob = out / "blobs" / "sha256" / desc["digest"].split(":")[1]
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == desc["digest"].split(":")[1]
        assert blob.stat().st_size == desc["size"]
    skopeo_copy(f"oci:{out}:latest", f"oci:{tmp_path / 'copy'}:x")


def test_default_output_name_in_cwd(tmp_path: Path) -> None:
    spec = example_spec(tmp_path, name="registry.example.com:5000/team/My-App", compressor="zstd")
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run_nsbuild(["layered", str(spec), "--no-cache", "-q"], cwd=work)
    assert proc.returncode == 0, proc.stderr
    # ./NAME.tar whatever the compressor: a plain archive (which every loader reads) of zstd layers
    assert sorted(p.name for p in work.iterdir()) == ["my-app.tar"]
    assert compression_of(work / "my-app.tar") is None
    view = read_image(work / "my-app.tar", tmp_path / "view")
    assert {compression_of(p) for p in view.layer_paths} == {"zstd"}


def test_docker_load_in_a_private_dockerd(tmp_path: Path) -> None:
    """docker load + run (root only, optional docker.io); zstd archives are refused by Docker 20.10."""
    with docker_daemon() as docker:
        for compressor in ("none", "gz"):
            spec = example_spec(tmp_path, compressor=compressor)
            out = tmp_path / f"image-{compressor}.tar"
            build(spec, out)
            image = docker.load(out)
            assert_greets(docker.run(image))


def test_name_and_tag_from_the_output_reference(tmp_path: Path) -> None:
    spec = example_spec(tmp_path, compressor="none")
    out = tmp_path / "img.tar"
    build(spec, f"docker-archive:{out}:localhost:5000/other/name:v2")
    manifest = json.loads(
        subprocess.run(["tar", "-xOf", str(out), "manifest.json"], check=True, capture_output=True, text=True).stdout
    )
    assert manifest[0]["RepoTags"] == ["localhost:5000/other/name:v2"]
    with podman_store() as store:
        assert store.load(out) == "localhost:5000/other/name:v2"
    build(spec, f"oci-archive:{tmp_path / 'img.oci.tar'}:release-1.0")
    skopeo_copy(f"oci-archive:{tmp_path / 'img.oci.tar'}:release-1.0", f"oci:{tmp_path / 'copy'}:x")


def test_built_and_run_rootless(unprivileged_user: str | None, user_tmp) -> None:  # type: ignore[no-untyped-def]
    """Built by an unprivileged account (with and without subordinate ids), run by rootless podman."""
    work = user_tmp(unprivileged_user)
    spec = json.loads(EXAMPLE_SPEC.read_text())
    spec["contents"] = [str(EXAMPLE_SPEC.parent / "rootfs"), *spec["contents"][1:]]
    spec["compressor"] = "zstd"
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    spec_path.chmod(0o644)
    build(spec_path, work / "img.tar.zst", user=unprivileged_user)
    build(spec_path, f"oci:{work / 'layout'}:latest", user=unprivileged_user)
    runner = unprivileged_user if has_subids(unprivileged_user) else None  # rootless podman needs subids
    assert_greets(podman_load_and_run(work / "img.tar.zst", user=runner))
    assert_greets(podman_load_and_run(f"{work / 'layout'}:latest", user=runner))


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_layers(tmp_path: Path, fmt: str) -> None:
    """Two contents entries with identical trees give the same layer twice: one blob, listed twice."""
    trees = []
    for name in ("a", "b"):
        t = tmp_path / name / "etc"
        t.mkdir(parents=True)
        (t / "same").write_text("same bytes\n")
        trees.append(str(t.parent))
    spec = example_spec(tmp_path, compressor="none" if fmt == "docker-archive" else "zstd")
    data = json.loads(spec.read_text())
    data["contents"] = [data["contents"][0], *trees, data["contents"][1]]
    spec.write_text(json.dumps(data))
    ref, path = output_ref(fmt, tmp_path)
    build(spec, ref)
    view = read_image(path, tmp_path / "view", tag="latest")
    diff_ids = view.config["rootfs"]["diff_ids"]
    assert len(diff_ids) == 5 and diff_ids[1] == diff_ids[2]
    gz_layout = to_gzip_oci(ref, tmp_path / "gz-layout", "t")
    umoci_unpack(gz_layout, "t", tmp_path / "bundle")
    with podman_store() as store:
        image = store.load(path) if fmt != "oci-dir" else store.pull(f"oci:{path}:latest")
        assert_greets(store.run(image))
