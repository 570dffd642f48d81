"""nsbuild's registry commands end to end, as an unprivileged user, against a real registry.

`layered -o docker://…`, `nsbuild push`, `fromImage: "docker://…"`: every pushed image is pulled back
with skopeo and checked with umoci and oci-image-tool; the registry itself (distribution v2) checks
blob digests, manifest references and Content-Type.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
from support.core import write_spec
from support.registry import Registry, RegistryFactory
from support.users import chown_tree, describe, run_nsbuild
from support.verifiers import oci_validate, skopeo_copy, skopeo_inspect, umoci_unpack

from nsbuild.registry import push_manifest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TLS_OFF = "--tls-verify=false"  # as skopeo users write it


def make_tree(work: Path, name: str, files: dict[str, str]) -> Path:
    top = work / name
    for rel, text in files.items():
        p = top / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for d, dirs, fs in os.walk(top):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o755)
        for n in fs:
            os.chmod(os.path.join(d, n), 0o644)
    top.chmod(0o755)
    return top


def nsbuild_ok(args: list[str], user: str | None) -> tuple[str, str]:
    proc = run_nsbuild(args, user)
    assert proc.returncode == 0, describe(proc)
    return proc.stdout, proc.stderr


def registry_manifest(reg: Registry, repo: str, ref: str) -> tuple[str, dict, str]:
    """(Content-Type, manifest, Docker-Content-Digest) as the registry serves them."""
    accept = f"{OCI_MANIFEST}, {DOCKER_MANIFEST}, application/vnd.oci.image.index.v1+json"
    status, headers, body = reg.request(f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept})
    assert status == 200, (status, body)
    assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    return headers["Content-Type"], json.loads(body), headers["Docker-Content-Digest"]


def pull_back_and_check(reg: Registry, ref: str, work: Path, user: str | None, expect: dict[str, str]) -> None:
    """skopeo copy docker://… oci:…, then umoci unpack and oci-image-tool validate; check file contents."""
    layout = work / f"pulled-{hashlib.sha256(ref.encode()).hexdigest()[:8]}"
    skopeo_copy(ref, f"oci:{layout}:t", *reg.skopeo_args("src"), user=user)
    oci_validate(layout, user=user)
    bundle = work / (layout.name + "-bundle")
    mtree = umoci_unpack(layout, "t", bundle, user=user)
    for rel, text in expect.items():
        assert (bundle / "rootfs" / rel).read_text() == text
        assert mtree[rel].uid in (0, None)


@pytest.fixture
def app_spec(user_with_subids: str | None, user_tmp) -> tuple[str | None, Path, Path]:  # noqa: ANN001
    user = user_with_subids
    work = user_tmp(user)
    tree = make_tree(work, "app", {"bin/hello": "hello\n", "etc/app.conf": "x=1\n"})
    data = make_tree(work, "data", {"srv/data.txt": "data\n"})
    chown_tree(user, tree)
    chown_tree(user, data)
    spec = write_spec(
        work, {"name": "app", "tag": "1", "contents": [str(tree), str(data)], "config": {"Cmd": ["/bin/hello"]}}
    )
    return user, work, spec


def test_push_output_as_unprivileged_user(
    unprivileged_user: str | None,
    user_tmp,  # noqa: ANN001
    registry_factory: RegistryFactory,
) -> None:
    reg = registry_factory()
    user = unprivileged_user
    work = user_tmp(user)
    tree = make_tree(work, "app", {"bin/hello": "hello\n"})
    chown_tree(user, tree)
    spec = write_spec(work, {"name": "app", "tag": "1", "contents": [str(tree)]})
    cache = work / "cache"
    args = ["layered", str(spec), "-o", f"docker://{reg}/team/app:1.0", TLS_OFF, "--cache-dir", str(cache)]
    out, err = nsbuild_ok(args + ["--json"], user)
    result = json.loads(out)
    pushed = result["push"]
    ctype, manifest, digest = registry_manifest(reg, "team/app", "1.0")
    assert ctype == OCI_MANIFEST and manifest["mediaType"] == OCI_MANIFEST
    assert pushed["digest"] == digest == result["image_digest"]
    assert pushed["reference"] == f"{reg}/team/app:1.0"
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_GZIP, OCI_GZIP]
    assert pushed["uploaded"] == 3 and pushed["skipped"] == 0  # config and two layers
    pull_back_and_check(reg, f"docker://{reg}/team/app:1.0", work, user, {"bin/hello": "hello\n"})

    # Again: the registry has every blob; nothing is uploaded, the digest is printed on stdout.
    blobs = reg.blobs_on_disk()
    out, err = nsbuild_ok(args, user)
    assert out.strip() == f"{reg}/team/app:1.0@{digest}"
    assert "0 blobs uploaded (0 B), 3 already there, 0 mounted" in err, err
    assert reg.blobs_on_disk() == blobs


def test_push_twice_uploads_no_layer(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory()
    args = ["layered", str(spec), "-o", f"docker://{reg}/app", "--no-tls-verify", "--no-cache", "--json"]
    first = json.loads(nsbuild_ok(args, user)[0])["push"]
    second = json.loads(nsbuild_ok(args, user)[0])["push"]
    # No tag in -o: the spec's tag.
    assert first["reference"] == f"{reg}/app:1" and sorted(reg.tags("app")) == ["1", f"sha256-{first['digest'][7:]}"]
    assert first["uploaded"] == 4  # config and three layers
    assert second["uploaded"] == 0 and second["uploadedBlobs"] == [] and second["skipped"] == 4
    assert second["digest"] == first["digest"]


def test_push_docker_manifest_format(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory()
    ref = f"docker://{reg}/app:docker"
    out, _ = nsbuild_ok(
        ["layered", str(spec), "-o", ref, TLS_OFF, "--no-cache", "--manifest-format", "docker", "--json"], user
    )
    pushed = json.loads(out)["push"]
    ctype, manifest, digest = registry_manifest(reg, "app", "docker")
    assert ctype == DOCKER_MANIFEST and manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {layer["mediaType"] for layer in manifest["layers"]} == {DOCKER_GZIP}
    assert pushed["digest"] == digest and pushed["mediaType"] == DOCKER_MANIFEST
    raw = skopeo_inspect(ref, *reg.skopeo_args(""), user=user, raw=True)
    assert raw["mediaType"] == DOCKER_MANIFEST
    pull_back_and_check(reg, ref, work, user, {"bin/hello": "hello\n", "srv/data.txt": "data\n"})


def test_docker_format_with_zstd_is_a_usage_error(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory()
    zspec = write_spec(work, {**json.loads(spec.read_text()), "compressor": "zstd"}, "zstd.json")
    proc = run_nsbuild(
        ["layered", str(zspec), "-o", f"docker://{reg}/app:z", TLS_OFF, "--no-cache", "--manifest-format", "docker"],
        user,
    )
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.count("\n") == 1 and "zstd" in proc.stderr and "Traceback" not in proc.stderr
    assert reg.catalog() == []
    # zstd with the OCI manifest is fine: the layers carry the zstd media type.
    nsbuild_ok(["layered", str(zspec), "-o", f"docker://{reg}/app:z", TLS_OFF, "--no-cache"], user)
    _, manifest, _ = registry_manifest(reg, "app", "z")
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}


def test_push_command_existing_images(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory()
    archive = work / "app.tar.gz"
    layout = work / "layout"
    nsbuild_ok(["layered", str(spec), "-o", str(archive), "--no-cache", "-q"], user)
    nsbuild_ok(["layered", str(spec), "-o", f"oci:{layout}", "--no-cache", "-q"], user)

    # A gzip'd docker-archive: uncompressed layers, compressed for the push; the config keeps its digest.
    out, err = nsbuild_ok(["push", str(archive), f"docker://{reg}/pushed:arch", TLS_OFF, "--json"], user)
    pushed = json.loads(out)
    with gzip.open(archive) as f, tarfile.open(fileobj=f) as tar:
        config_name = json.load(tar.extractfile("manifest.json"))[0]["Config"]  # type: ignore[arg-type]
    _, manifest, digest = registry_manifest(reg, "pushed", "arch")
    assert pushed["digest"] == digest
    assert manifest["config"]["digest"] == "sha256:" + config_name.removesuffix(".json")
    assert {layer["mediaType"] for layer in manifest["layers"]} == {OCI_GZIP}
    pull_back_and_check(reg, f"docker://{reg}/pushed:arch", work, user, {"bin/hello": "hello\n"})

    # An OCI layout with gzip blobs is pushed byte for byte: the same manifest digest as on disk.
    index = json.loads((layout / "index.json").read_text())
    out, _ = nsbuild_ok(["push", f"oci:{layout}", f"docker://{reg}/pushed", "--no-tls-verify"], user)
    assert out.strip() == f"{reg}/pushed:latest@{index['manifests'][0]['digest']}"
    _, manifest2, _ = registry_manifest(reg, "pushed", "latest")
    assert {layer["mediaType"] for layer in manifest2["layers"]} == {OCI_GZIP}

    # An OCI archive, uncompressed layers compressed with --compressor zstd.
    oci_tar = work / "app.oci.tar"
    nozip = write_spec(work, {**json.loads(spec.read_text()), "compressor": "none"}, "none.json")
    nsbuild_ok(["layered", str(nozip), "-o", f"oci-archive:{oci_tar}", "--no-cache", "-q"], user)
    nsbuild_ok(["push", str(oci_tar), f"docker://{reg}/pushed:zstd", TLS_OFF, "--compressor", "zstd", "-q"], user)
    _, manifest3, _ = registry_manifest(reg, "pushed", "zstd")
    assert {layer["mediaType"] for layer in manifest3["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    skopeo_copy(f"docker://{reg}/pushed:zstd", f"oci:{work / 'zstd-back'}:t", *reg.skopeo_args("src"), user=user)


def test_wrong_password_is_one_clear_line_without_the_secret(
    app_spec,
    registry_factory: RegistryFactory,  # noqa: ANN001
) -> None:
    user, work, spec = app_spec
    reg = registry_factory(auth=("alice", "right-Passw0rd-917"))
    secret = "wrong-S3cret-4471"
    target = f"docker://{reg}/app:1"
    proc = run_nsbuild(
        ["layered", str(spec), "-o", target, TLS_OFF, "--no-cache", "--creds", f"alice:{secret}", "--json"], user
    )
    assert proc.returncode == 1, describe(proc)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsbuild: error: ") and str(reg) in lines[0], proc.stderr
    assert "401" in lines[0] or "authentication" in lines[0]
    assert secret not in proc.stdout + proc.stderr
    assert base64.b64encode(f"alice:{secret}".encode()).decode() not in proc.stdout + proc.stderr

    # The same through an auth file: the file is named, its content is not shown.
    authfile = work / "auth.json"
    encoded = base64.b64encode(f"alice:{secret}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {str(reg): {"auth": encoded}}}))
    authfile.chmod(0o644)
    proc = run_nsbuild(["layered", str(spec), "-o", target, TLS_OFF, "--no-cache", "--authfile", str(authfile)], user)
    assert proc.returncode == 1, describe(proc)
    assert secret not in proc.stdout + proc.stderr
    assert base64.b64encode(f"alice:{secret}".encode()).decode() not in proc.stdout + proc.stderr
    assert reg.catalog() == []

    # The right password works, from --creds and from REGISTRY_AUTH_FILE.
    good = "right-Passw0rd-917"
    out, err = nsbuild_ok(["layered", str(spec), "-o", target, TLS_OFF, "--no-cache", "--creds", f"alice:{good}"], user)
    assert good not in out + err
    proc = run_nsbuild(["push", str(spec), target, TLS_OFF], user)  # not an image: a clear error
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith(f"nsbuild: error: {spec}: "), describe(proc)
    assert [t for t in reg.tags("app") if not t.startswith("sha256-")] == ["1"]  # and its SBOMs' referrers tag


def test_tls_with_cert_dir(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory(tls=True)
    target = f"docker://{reg}/app:tls"
    proc = run_nsbuild(["layered", str(spec), "-o", target, "--no-cache"], user)
    assert proc.returncode == 1, describe(proc)
    # Found before any layer is built, in one line.
    assert proc.stderr.count("\n") == 1 and "certificate" in proc.stderr.lower(), proc.stderr
    nsbuild_ok(["layered", str(spec), "-o", target, "--no-cache", "--cert-dir", str(reg.cert_dir)], user)
    pull_back_and_check(reg, target, work, user, {"bin/hello": "hello\n"})


def test_inspect_a_registry_image(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    """`nsbuild inspect docker://…` pulls as a build pulls its base, with the same TLS and auth flags."""
    user, work, spec = app_spec
    archive = work / "app.tar.gz"
    nsbuild_ok(["layered", str(spec), "-o", str(archive), "--no-cache", "-q"], user)
    local = json.loads(nsbuild_ok(["inspect", str(archive), "--json"], user)[0])

    reg = registry_factory(tls=True)
    ref = f"docker://{reg}/inspected:1"
    nsbuild_ok(["push", str(archive), ref, "--cert-dir", str(reg.cert_dir), "-q"], user)
    proc = run_nsbuild(["inspect", ref], user)  # the registry's CA is not trusted without --cert-dir
    assert proc.returncode == 1, describe(proc)
    assert proc.stderr.count("\n") == 1 and "certificate" in proc.stderr.lower(), proc.stderr
    out, _ = nsbuild_ok(["inspect", ref, "--cert-dir", str(reg.cert_dir), "--json"], user)
    pulled = json.loads(out)
    _, manifest, _ = registry_manifest(reg, "inspected", "1")
    assert pulled["config"] == local["config"]
    assert [layer["digest"] for layer in pulled["layers"]] == [d["digest"] for d in manifest["layers"]]
    assert {layer["media_type"] for layer in pulled["layers"]} == {OCI_GZIP}
    for name in ("diff_id", "entries"):
        assert [layer[name] for layer in pulled["layers"]] == [layer[name] for layer in local["layers"]]
    # The text form too; a layer's line names its size, compressed in the registry, not in the archive.
    text, _ = nsbuild_ok(["inspect", ref, "--cert-dir", str(reg.cert_dir)], user)
    local_text, _ = nsbuild_ok(["inspect", str(archive)], user)
    assert "bin/hello" in text
    assert [line for line in text.splitlines() if not line.startswith("layer ")] == [
        line for line in local_text.splitlines() if not line.startswith("layer ")
    ]

    # Plain http and basic auth: --tls-verify=false and --creds, as for a build's docker:// base.
    secured = registry_factory(auth=("bob", "Passw0rd-5150"))
    ref = f"docker://{secured}/inspected:2"
    nsbuild_ok(["push", str(archive), ref, TLS_OFF, "--creds", "bob:Passw0rd-5150", "-q"], user)
    proc = run_nsbuild(["inspect", ref, TLS_OFF], user)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, describe(proc)
    out, _ = nsbuild_ok(["inspect", ref, TLS_OFF, "--creds", "bob:Passw0rd-5150", "--json"], user)
    assert json.loads(out)["config"] == local["config"]


# --- fromImage: docker:// ----------------------------------------------------------------------------------


def test_from_image_registry_pull_is_cached(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory()
    # The base goes in with skopeo (not nsbuild): an independent writer.
    base_layout = work / "base-layout"
    nsbuild_ok(["layered", str(spec), "-o", f"oci:{base_layout}:1", "--no-cache", "-q"], user)
    skopeo_copy(f"oci:{base_layout}:1", f"docker://{reg}/base:1", *reg.skopeo_args("dest"), user=user)
    _, _, base_digest = registry_manifest(reg, "base", "1")

    child_tree = make_tree(work, "child", {"usr/share/child.txt": "child\n"})
    chown_tree(user, child_tree)
    child = write_spec(
        work,
        {
            "name": "child",
            "tag": "1",
            "fromImage": f"docker://{reg}/base:1",
            "contents": [str(child_tree)],
            "config": {"Env": ["CHILD=1"]},
        },
        "child.json",
    )
    cache = work / "cache"
    out_dir = work / "child-layout"
    args = ["layered", str(child), "-o", f"oci:{out_dir}:1", "--no-tls-verify", "--cache-dir", str(cache)]
    _, err = nsbuild_ok(args, user)
    assert f"resolved to {base_digest}" in err, err
    first = json.loads(nsbuild_ok([*args, "--json"], user)[0])
    assert first["base"]["digest"] == base_digest
    assert first["base"]["downloaded"] == 0 and first["base"]["cached"] == 4  # config and 3 layers
    # The blobs are in the layer cache, verified, under their digests.
    for layer in first["layers"][:2]:
        data = (cache / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]

    index = json.loads((out_dir / "index.json").read_text())
    manifest = json.loads((out_dir / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == base_digest
    assert manifest["annotations"]["org.opencontainers.image.base.name"] == f"{reg}/base:1"
    config = json.loads((out_dir / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    assert all(f"{reg}/base@" in h["comment"] for h in config["history"][:2]), config["history"]
    oci_validate(out_dir, user=user)
    bundle = work / "child-bundle"
    umoci_unpack(out_dir, "1", bundle, user=user)
    assert (bundle / "rootfs/bin/hello").read_text() == "hello\n"
    assert (bundle / "rootfs/usr/share/child.txt").read_text() == "child\n"

    # By digest, into a docker-archive (the base layers decompressed, checked against diff_ids), no cache.
    pinned = write_spec(
        work, {**json.loads(child.read_text()), "fromImage": f"docker://{reg}/base@{base_digest}"}, "pinned.json"
    )
    archive = work / "child.tar"
    out = json.loads(
        nsbuild_ok(["layered", str(pinned), "-o", str(archive), "--no-tls-verify", "--no-cache", "--json"], user)[0]
    )
    assert out["base"]["downloaded"] == 4 and out["base"]["digest"] == base_digest
    skopeo_copy(f"docker-archive:{archive}", f"oci:{work / 'child-from-archive'}:t", user=user)


def test_from_image_multi_arch_index(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory()
    digests = {}
    for arch in ("amd64", "arm64"):
        s = write_spec(work, {**json.loads(spec.read_text()), "architecture": arch, "tag": arch}, f"{arch}.json")
        out = json.loads(
            nsbuild_ok(
                ["layered", str(s), "-o", f"docker://{reg}/multi:{arch}", TLS_OFF, "--no-cache", "--json"], user
            )[0]
        )
        digests[arch] = (out["push"]["digest"], registry_manifest(reg, "multi", arch)[1])
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": d,
                "size": len(json.dumps(m, separators=(",", ":"), sort_keys=True)),
                "platform": {"os": "linux", "architecture": arch},
            }
            for arch, (d, m) in digests.items()
        ],
    }
    body = json.dumps(index).encode()
    from nsbuild.registry import RegistryOptions

    push_manifest(
        f"{reg}/multi:all", body, "application/vnd.oci.image.index.v1+json", options=RegistryOptions(tls_verify=False)
    )

    for arch in ("arm64", "amd64"):
        child = write_spec(
            work,
            {"name": "child", "fromImage": f"docker://{reg}/multi:all", "architecture": arch},
            f"child-{arch}.json",
        )
        out = json.loads(
            nsbuild_ok(
                ["layered", str(child), "-o", f"oci:{work / ('c-' + arch)}", TLS_OFF, "--no-cache", "--json"], user
            )[0]
        )
        assert out["base"]["manifest_digest"] == digests[arch][0]
        assert out["base"]["digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    child = write_spec(
        work, {"name": "child", "fromImage": f"docker://{reg}/multi:all", "architecture": "s390x"}, "child-s390x.json"
    )
    proc = run_nsbuild(["layered", str(child), "-o", f"oci:{work / 'c-s390x'}", TLS_OFF, "--no-cache"], user)
    assert proc.returncode == 1, describe(proc)
    last = proc.stderr.splitlines()[-1]
    assert "s390x" in last and "linux/amd64" in last and "linux/arm64" in last, proc.stderr


def test_from_image_unknown_tag(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    user, work, spec = app_spec
    reg = registry_factory()
    child = write_spec(work, {"name": "child", "fromImage": f"docker://{reg}/nothing:here"}, "child.json")
    proc = run_nsbuild(["layered", str(child), "-o", str(work / "x.tar"), TLS_OFF, "--no-cache"], user)
    assert proc.returncode == 1, describe(proc)
    assert "not found" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
    assert not (work / "x.tar").exists()


def test_token_auth_from_registry_auth_file_and_stream(app_spec, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    """Bearer tokens (the WWW-Authenticate flow) with credentials from REGISTRY_AUTH_FILE; `stream`
    takes the registry flags too, for a docker:// fromImage."""
    user, work, spec = app_spec
    reg = registry_factory(auth=("bob", "t0ken-Pass-5521"), token=True)
    env = {"REGISTRY_AUTH_FILE": str(reg.auth_file)}
    proc = run_nsbuild(
        ["layered", str(spec), "-o", f"docker://{reg}/base:1", TLS_OFF, "--no-cache", "-q"], user, env=env
    )
    assert proc.returncode == 0, describe(proc)
    assert "t0ken-Pass-5521" not in proc.stdout + proc.stderr
    child = write_spec(work, {"name": "child", "tag": "1", "fromImage": f"docker://{reg}/base:1"}, "child.json")
    proc = run_nsbuild(["stream", str(child), TLS_OFF, "--no-cache"], user, env=env, text=False)
    assert proc.returncode == 0, describe(proc)
    archive = work / "streamed.tar"
    archive.write_bytes(proc.stdout)
    skopeo_copy(f"docker-archive:{archive}", f"oci:{work / 'streamed'}:t", user=user)
    # Without credentials: one clear line naming what was tried.
    proc = run_nsbuild(["stream", str(child), TLS_OFF, "--no-cache"], user, text=False)
    assert proc.returncode == 1
    assert b"no credentials found" in proc.stderr.splitlines()[-1], proc.stderr
