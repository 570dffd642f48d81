"""`nsbuild index`: one image per spec, one OCI image index (or Docker manifest list) over them, to an
OCI layout, an OCI archive and a real registry; read back with skopeo, buildah and podman as an
unprivileged user. Also the spec attribute `variant`, fromImage on an index, `nsbuild push` and
`nsbuild inspect` of an index, and the errors refused before anything is built."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from support.core import HOST_BUSYBOX, require_busybox, write_spec
from support.hostile_registry import HostileRegistry
from support.registry import Registry, RegistryFactory
from support.users import chown_tree, describe, run_nsbuild
from support.verifiers import empty_auth_file, podman_store, run_tool, skopeo_copy, skopeo_inspect

from nsbuild.core.platform import host_platform

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
TLS_OFF = "--tls-verify=false"
PLATFORMS = [("amd64", None), ("arm64", None), ("arm", "v7")]


def _tree(work: Path, name: str, files: dict[str, str]) -> Path:
    top = work / name
    for rel, text in files.items():
        p = top / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(0o644)
    for d, dirs, _ in os.walk(top):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o755)
    top.chmod(0o755)
    return top


def _name(arch: str, variant: str | None) -> str:
    return f"linux/{arch}" + (f"/{variant}" if variant else "")


def make_specs(work: Path, user: str | None, platforms: list[tuple[str, str | None]] = PLATFORMS) -> list[Path]:
    """One spec per platform: a busybox tree and a common tree (the same layers on every platform)
    and a file naming the platform (a layer of its own). No foreign binary needs to run."""
    require_busybox()
    bb = work / "busybox"
    (bb / "bin").mkdir(parents=True)
    shutil.copy(HOST_BUSYBOX, bb / "bin" / "busybox")
    (bb / "bin" / "busybox").chmod(0o755)
    (bb / "bin" / "sh").symlink_to("busybox")
    (bb / "bin" / "cat").symlink_to("busybox")
    for d in (bb, bb / "bin"):
        d.chmod(0o755)
    common = _tree(work, "common", {"etc/message": "shared\n"})
    specs = []
    for arch, variant in platforms:
        plat = _tree(work, f"plat-{arch}{variant or ''}", {"etc/platform": _name(arch, variant) + "\n"})
        spec = {
            "name": "multi",
            "tag": "1",
            "architecture": arch,
            "contents": [str(bb), str(common), str(plat)],
            "config": {"Cmd": ["/bin/cat", "/etc/platform"]},
        }
        if variant:
            spec["variant"] = variant
        specs.append(write_spec(work, spec, f"{arch}{variant or ''}.json"))
    chown_tree(user, work)
    return specs


def skopeo_for(arch: str, variant: str | None, args: list[str], user: str | None) -> str:
    """skopeo choosing one platform of an index (--override-arch/--override-variant are global flags)."""
    choose = ["--override-arch", arch] + (["--override-variant", variant] if variant else [])
    env = {"REGISTRY_AUTH_FILE": str(empty_auth_file())}
    return run_tool(["skopeo", *choose, *args], user, env=env).stdout


def nsbuild_ok(args: list[str], user: str | None) -> str:
    proc = run_nsbuild(args, user)
    assert proc.returncode == 0, describe(proc)
    return proc.stdout


def index_json(specs: list[Path], output: str, user: str | None, *extra: str) -> dict:
    args = ["index", *map(str, specs), "-o", output, "--no-cache", "--json", *extra]
    return json.loads(nsbuild_ok(args, user))


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_platforms(raw: dict, result: dict, media: str = OCI_INDEX) -> None:
    """The index as a reader sees it: its type, the platforms in the order given, the digests --json said."""
    assert raw["mediaType"] == media
    got = [(m["platform"]["architecture"], m["platform"].get("variant")) for m in raw["manifests"]]
    assert got == [(a, v) for a, v in PLATFORMS[: len(got)]]
    assert all(m["platform"]["os"] == "linux" for m in raw["manifests"])
    assert [m["digest"] for m in raw["manifests"]] == [p["digest"] for p in result["platforms"]]


def test_index_to_layout_and_archive(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    user = user_with_subids
    work = user_tmp(user)
    specs = make_specs(work, user)
    layout = work / "layout"
    result = index_json(specs, f"oci:{layout}:v1", user)
    raw = skopeo_inspect(f"oci:{layout}:v1", user=user, raw=True)
    check_platforms(raw, result)
    assert _sha(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()) == result["digest"]
    assert result["platforms"][2]["platform"] == "linux/arm/v7"

    # Each platform's own config: its architecture and variant, read back by skopeo choosing the platform.
    for (arch, variant), plat in zip(PLATFORMS, result["platforms"], strict=True):
        copy = work / f"copy-{arch}"
        skopeo_for(arch, variant, ["copy", "--insecure-policy", f"oci:{layout}:v1", f"oci:{copy}:x"], user)
        copied = json.loads((copy / "index.json").read_text())["manifests"][0]
        manifest = json.loads((copy / "blobs/sha256" / copied["digest"][7:]).read_text())
        assert manifest["config"]["digest"] == plat["config_digest"]
        config = json.loads((copy / "blobs/sha256" / plat["config_digest"][7:]).read_text())
        assert (config["architecture"], config.get("variant")) == (arch, variant)

    # Layers the platforms share are stored once: busybox, common, customisation layer shared; one
    # platform layer and one config per platform; the manifests, the index, and the SBOM referrers.
    manifests = [json.loads((layout / "blobs/sha256" / p["digest"][7:]).read_text()) for p in result["platforms"]]
    layer_sets = [[d["digest"] for d in m["layers"]] for m in manifests]
    assert layer_sets[0][0] == layer_sets[1][0] == layer_sets[2][0]  # the busybox layer
    unique_layers = {d for layers in layer_sets for d in layers}
    assert len(unique_layers) == 3 + 3
    referrer_blobs = {d for p in result["platforms"] for d in p["referrers"]}
    assert len(referrer_blobs) == 9  # spdx, cyclonedx, provenance per platform
    blobs = set(os.listdir(layout / "blobs/sha256"))
    # + 9 documents and the empty config of the referrers
    assert len(blobs) == len(unique_layers) + 3 + 3 + 1 + 9 + 9 + 1

    # skopeo copy --all: the whole index into another layout, byte for byte.
    copy_all = work / "copy-all"
    skopeo_copy(f"oci:{layout}:v1", f"oci:{copy_all}:v1", "--all", user=user)
    assert skopeo_inspect(f"oci:{copy_all}:v1", user=user, raw=True) == raw

    # The archive: the same index (same digest), reproducible bytes, readable by skopeo; no SBOMs by
    # default (as for one image written to an archive).
    archive = work / "multi.tar"
    again = index_json(specs, f"oci-archive:{archive}:v1", user)
    assert again["digest"] == result["digest"]
    assert all(p["referrers"] == [] for p in again["platforms"])
    first = archive.read_bytes()
    index_json(specs, f"oci-archive:{archive}:v1", user)
    assert archive.read_bytes() == first
    check_platforms(skopeo_inspect(f"oci-archive:{archive}", user=user, raw=True), result)
    from_archive = work / "from-archive"
    skopeo_copy(f"oci-archive:{archive}", f"oci:{from_archive}:v1", "--all", user=user)
    assert skopeo_inspect(f"oci:{from_archive}:v1", user=user, raw=True) == raw

    # buildah reads the layout's index: every platform, the same manifests.
    store = work / "buildah"
    b = ["buildah", "--root", str(store / "root"), "--runroot", str(store / "run"), "--storage-driver", "vfs"]
    run_tool([*b, "manifest", "create", "multilist"], user)
    run_tool([*b, "manifest", "add", "--all", "multilist", f"oci:{layout}:v1"], user)
    listed = json.loads(run_tool([*b, "manifest", "inspect", "multilist"], user).stdout)
    assert [m["digest"] for m in listed["manifests"]] == [p["digest"] for p in result["platforms"]]
    assert [m["platform"].get("variant") for m in listed["manifests"]] == [None, None, "v7"]
    run_tool([*b, "rmi", "--all", "--force"], user)

    # `nsbuild inspect` lists the platforms, text and JSON.
    text = nsbuild_ok(["inspect", f"oci:{layout}:v1"], user)
    assert text.splitlines()[0].startswith(f"index {result['digest']} ({OCI_INDEX}), 3 platforms")
    assert "linux/arm/v7" in text and result["platforms"][2]["digest"] in text
    report = json.loads(nsbuild_ok(["inspect", f"oci-archive:{archive}", "--json"], user))
    assert [p["platform"] for p in report["index"]["platforms"]] == [_name(a, v) for a, v in PLATFORMS]


def test_index_runs_on_host_platform(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    """podman pulls the host's image out of the index and runs it."""
    user = user_with_subids
    arch, variant = host_platform()
    if (arch, variant) not in PLATFORMS:
        pytest.skip(f"no image for this machine's platform ({arch}) in the test index")
    work = user_tmp(user)
    specs = make_specs(work, user)
    layout = work / "layout"
    index_json(specs, f"oci:{layout}:v1", user, "--sbom", "none")
    with podman_store(user) as store:
        link = store.dir / "multi-layout"
        link.symlink_to(layout)
        image = store.pull(f"oci:{link}:v1")
        assert store.run(image).strip() == _name(arch, variant)


def test_index_to_registry(user_with_subids: str | None, user_tmp, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    reg: Registry = registry_factory()
    user = user_with_subids
    work = user_tmp(user)
    specs = make_specs(work, user)
    ref = f"docker://{reg}/team/multi:v1"
    result = index_json(specs, ref, user, TLS_OFF)
    assert result["push"]["reference"] == f"{reg}/team/multi:v1"
    status, headers, body = reg.request(
        "/v2/team/multi/manifests/v1", headers={"Accept": f"{OCI_INDEX}, {DOCKER_LIST}"}
    )
    assert status == 200 and headers["Content-Type"] == OCI_INDEX
    assert _sha(body) == result["digest"] == headers["Docker-Content-Digest"]
    check_platforms(skopeo_inspect(ref, TLS_OFF, user=user, raw=True), result)
    # Shared layers went up once: 3 shared + 3 platform layers + 3 configs.
    assert result["push"]["uploaded"] == 9
    assert result["push"]["skipped"] == 2 * 3  # platforms 2 and 3 found the shared layers there
    # Every platform's SBOM referrers are attached to its manifest (the referrers tag of distribution 2.8).
    for plat in result["platforms"]:
        tag = "sha256-" + plat["digest"][7:]
        referrers = skopeo_inspect(f"docker://{reg}/team/multi:{tag}", TLS_OFF, user=user, raw=True)
        assert sorted(m["digest"] for m in referrers["manifests"]) == sorted(plat["referrers"])
    # The platform images were pushed by digest: the index's tag (and referrers tags) only.
    assert sorted(t for t in reg.tags("team/multi") if not t.startswith("sha256-")) == ["v1"]

    # Pulled back per platform: the config each platform's spec made.
    for (arch, variant), plat in zip(PLATFORMS, result["platforms"], strict=True):
        pulled = work / f"pulled-{arch}"
        skopeo_for(
            arch, variant, ["copy", "--insecure-policy", TLS_OFF.replace("--", "--src-"), ref, f"oci:{pulled}:x"], user
        )
        top = json.loads((pulled / "index.json").read_text())["manifests"][0]
        manifest = json.loads((pulled / "blobs/sha256" / top["digest"][7:]).read_text())
        assert manifest["config"]["digest"] == plat["config_digest"]

    # skopeo copy --all from the registry; podman manifest inspect of the pushed list.
    copy_all = work / "copy-all"
    skopeo_copy(ref, f"oci:{copy_all}:v1", "--all", "--src-tls-verify=false", user=user)
    assert [
        m["digest"] for m in json.loads((copy_all / "blobs/sha256" / result["digest"][7:]).read_text())["manifests"]
    ] == [p["digest"] for p in result["platforms"]]
    conf = work / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{reg}"\ninsecure = true\n')
    conf.chmod(0o644)
    with podman_store(user) as store:
        store.env["CONTAINERS_REGISTRIES_CONF"] = str(conf)
        listed = json.loads(store.podman("manifest", "inspect", f"{reg}/team/multi:v1").stdout)
    assert [m["digest"] for m in listed["manifests"]] == [p["digest"] for p in result["platforms"]]
    assert [m["platform"]["architecture"] for m in listed["manifests"]] == ["amd64", "arm64", "arm"]

    text = nsbuild_ok(["inspect", ref, TLS_OFF], user)
    assert f"index {result['digest']}" in text and "linux/arm/v7" in text

    # An index made by nsbuild index is a fromImage for each platform (registry and layout).
    layout = work / "layout"
    index_json(specs, f"oci:{layout}:v1", user, "--sbom", "none")
    for base in (ref, f"oci:{layout}:v1"):
        for (arch, variant), plat in zip(PLATFORMS, result["platforms"], strict=True):
            child = {"name": "child", "tag": "1", "architecture": arch, "fromImage": base, "contents": []}
            if variant:
                child["variant"] = variant
            spec = write_spec(work, child, "child.json")
            chown_tree(user, spec)
            out = json.loads(
                nsbuild_ok(
                    [
                        "layered",
                        str(spec),
                        "-o",
                        f"oci:{work / 'child'}",
                        "--no-cache",
                        "--json",
                        TLS_OFF,
                        "--sbom",
                        "none",
                    ],
                    user,
                )
            )
            base_layers = json.loads((layout / "blobs/sha256" / plat["digest"][7:]).read_text())["layers"]
            assert [layer["digest"] for layer in out["layers"]][: len(base_layers)] == [
                d["digest"] for d in base_layers
            ]
    child["variant"] = "v6"
    chown_tree(user, write_spec(work, child, "child.json"))
    proc = run_nsbuild(["layered", str(work / "child.json"), "-o", f"oci:{work / 'c6'}", "--no-cache"], user)
    assert proc.returncode == 1 and "no linux/arm/v6 image in the index" in proc.stderr, describe(proc)


def test_docker_manifest_list(user_with_subids: str | None, user_tmp, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    """--manifest-format docker: a Docker manifest list of Docker v2 schema 2 manifests, pushed to the
    registry and read by skopeo; the same list in a layout, then pushed with nsbuild push (skopeo
    reads no Docker list from a layout), is the same digest."""
    reg = registry_factory()
    user = user_with_subids
    work = user_tmp(user)
    specs = make_specs(work, user, PLATFORMS[:2])
    ref = f"docker://{reg}/multi:d"
    result = index_json(specs, ref, user, TLS_OFF, "--manifest-format", "docker")
    raw = skopeo_inspect(ref, TLS_OFF, user=user, raw=True)
    check_platforms(raw, result, DOCKER_LIST)
    assert {m["mediaType"] for m in raw["manifests"]} == {DOCKER_MANIFEST}
    for (arch, _), plat in zip(PLATFORMS[:2], result["platforms"], strict=True):
        manifest = json.loads(skopeo_for(arch, None, ["inspect", TLS_OFF, ref], user))
        assert manifest["Architecture"] == arch and manifest["Digest"] == result["digest"]  # the list's
        status, _, body = reg.request(f"/v2/multi/manifests/{plat['digest']}", headers={"Accept": DOCKER_MANIFEST})
        doc = json.loads(body)
        assert status == 200 and doc["config"]["mediaType"] == DOCKER_CONFIG
        assert {d["mediaType"] for d in doc["layers"]} == {DOCKER_GZIP}

    layout = work / "dlayout"
    local = index_json(specs, f"oci:{layout}:d", user, "--manifest-format", "docker")
    assert local["digest"] == result["digest"] and local["mediaType"] == DOCKER_LIST
    pushed = json.loads(nsbuild_ok(["push", f"oci:{layout}:d", f"docker://{reg}/copy:d", TLS_OFF, "--json"], user))
    assert pushed["digest"] == result["digest"] and pushed["mediaType"] == DOCKER_LIST
    assert skopeo_inspect(f"docker://{reg}/copy:d", TLS_OFF, user=user, raw=True) == raw
    # The layout's SBOM referrers went with it, attached to the Docker v2 manifests they describe.
    for plat in local["platforms"]:
        tag = "sha256-" + plat["digest"][7:]
        assert tag in reg.tags("copy")
        referrers = skopeo_inspect(f"docker://{reg}/copy:{tag}", TLS_OFF, user=user, raw=True)
        assert sorted(m["digest"] for m in referrers["manifests"]) == sorted(plat["referrers"])
        assert len(plat["referrers"]) == 3


def test_push_index_layout(user_with_subids: str | None, user_tmp, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    """nsbuild push of an OCI archive whose tag names an index: every platform's image and the index
    (skopeo copy --all), blobs the platforms share uploaded once."""
    reg = registry_factory()
    user = user_with_subids
    work = user_tmp(user)
    specs = make_specs(work, user)
    archive = work / "multi.tar"
    result = index_json(specs, f"oci-archive:{archive}:v1", user)
    before = reg.blobs_on_disk()
    pushed = json.loads(
        nsbuild_ok(["push", f"oci-archive:{archive}", f"docker://{reg}/pushed:v1", TLS_OFF, "--json"], user)
    )
    assert pushed["digest"] == result["digest"] and pushed["mediaType"] == OCI_INDEX
    assert pushed["uploaded"] == 9 and pushed["skipped"] == 6
    # 9 blobs, 3 manifests, the index
    assert len(reg.blobs_on_disk() - before) == 9 + 3 + 1
    check_platforms(skopeo_inspect(f"docker://{reg}/pushed:v1", TLS_OFF, user=user, raw=True), result)
    copy = work / "copy"
    skopeo_copy(f"docker://{reg}/pushed:v1", f"oci:{copy}:v1", "--all", "--src-tls-verify=false", user=user)
    assert (
        skopeo_inspect(f"oci:{copy}:v1", user=user, raw=True)["manifests"]
        == skopeo_inspect(f"oci-archive:{archive}", user=user, raw=True)["manifests"]
    )


OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OVERRIDES = ["--compressor", "zstd", "--label", "org.example.label=L", "--annotation", "org.example.note=N"]


def _check_overridden(manifests: list[dict], configs: list[dict], media: str = OCI_ZSTD) -> None:
    """--compressor, --label and --annotation reached every platform: its layers, config and manifest."""
    assert len(manifests) == len(configs) == len(PLATFORMS)
    for manifest, config in zip(manifests, configs, strict=True):
        assert {d["mediaType"] for d in manifest["layers"]} == {media}
        assert manifest["annotations"]["org.example.note"] == "N"
        assert config["config"]["Labels"]["org.example.label"] == "L"


def test_index_per_image_options(user_with_subids: str | None, user_tmp, registry_factory: RegistryFactory) -> None:  # noqa: ANN001
    """The per-image output options of `nsbuild layered` reach every platform of an index: the layer
    compressor, config labels, manifest annotations (also on the OCI index itself) and --sbom-output
    (one file per platform); the same in a layout, an archive and a registry."""
    reg = registry_factory()
    user = user_with_subids
    work = user_tmp(user)
    specs = make_specs(work, user)
    layout = work / "layout"
    sbom = work / "sbom.json"
    result = index_json(specs, f"oci:{layout}:v1", user, *OVERRIDES, "--sbom", "spdx", "--sbom-output", str(sbom))
    raw = skopeo_inspect(f"oci:{layout}:v1", user=user, raw=True)
    check_platforms(raw, result)
    assert raw["annotations"] == {"org.example.note": "N"} == result["annotations"]
    blobs = layout / "blobs/sha256"
    manifests = [json.loads((blobs / p["digest"][7:]).read_text()) for p in result["platforms"]]
    configs = []
    for arch, variant in PLATFORMS:  # the config each platform's skopeo picks out of the index
        configs.append(json.loads(skopeo_for(arch, variant, ["inspect", "--config", f"oci:{layout}:v1"], user)))
    _check_overridden(manifests, configs)
    # --sbom-output: each platform's SBOM (one format: one file), named after the platform.
    for (arch, variant), plat in zip(PLATFORMS, result["platforms"], strict=True):
        path = work / f"sbom.linux-{arch}{'-' + variant if variant else ''}.json"
        assert plat["sbom_files"] == [str(path)]
        assert json.loads(path.read_text())["spdxVersion"] == "SPDX-2.3"
        assert len(plat["referrers"]) == 2  # the SPDX document and the provenance

    # An archive: the same index (annotations included), the same digest; skopeo reads it.
    archive = work / "multi.tar"
    again = index_json(specs, f"oci-archive:{archive}:v1", user, *OVERRIDES, "--sbom", "none")
    assert again["digest"] == result["digest"]  # the SBOMs are referrers: the index is the same
    assert skopeo_inspect(f"oci-archive:{archive}", user=user, raw=True)["annotations"] == {"org.example.note": "N"}

    # A registry: the index and every platform manifest as the registry serves them.
    ref = f"docker://{reg}/opts:v1"
    pushed = index_json(specs, ref, user, TLS_OFF, *OVERRIDES, "--sbom", "none")
    raw = skopeo_inspect(ref, TLS_OFF, user=user, raw=True)
    check_platforms(raw, pushed)
    assert raw["annotations"] == {"org.example.note": "N"}
    manifests = []
    for plat in pushed["platforms"]:
        status, _, body = reg.request(f"/v2/opts/manifests/{plat['digest']}", headers={"Accept": OCI_MANIFEST})
        assert status == 200
        manifests.append(json.loads(body))
    configs = [json.loads(skopeo_for(a, v, ["inspect", TLS_OFF, "--config", ref], user)) for a, v in PLATFORMS]
    _check_overridden(manifests, configs)
    assert pushed["digest"] == result["digest"]

    # nsbuild push of the index: pushed byte for byte, so a compressor that would change it is refused
    # (exit 2, naming the option); `none` is what a byte-for-byte push does.
    proc = run_nsbuild(["push", f"oci:{layout}:v1", f"docker://{reg}/copy:v1", TLS_OFF, "--compressor", "gz"], user)
    assert proc.returncode == 2 and "--compressor gz" in proc.stderr and "index" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr
    assert reg.request("/v2/copy/manifests/v1", headers={"Accept": OCI_INDEX})[0] == 404  # nothing pushed
    copied = json.loads(
        nsbuild_ok(
            ["push", f"oci:{layout}:v1", f"docker://{reg}/copy:v1", TLS_OFF, "--compressor", "none", "--json"], user
        )
    )
    assert copied["digest"] == result["digest"]
    assert skopeo_inspect(f"docker://{reg}/copy:v1", TLS_OFF, user=user, raw=True)["annotations"] == {
        "org.example.note": "N"
    }


def test_index_annotations_docker_list(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    """A Docker manifest list (and its Docker v2 manifests) has no annotations: a warning, none written;
    the label and the compressor still reach every platform."""
    user = user_with_subids
    work = user_tmp(user)
    specs = make_specs(work, user)
    layout = work / "dlayout"
    args = ["index", *map(str, specs), "-o", f"oci:{layout}:d", "--no-cache", "--json", "--sbom", "none"]
    proc = run_nsbuild([*args, "--manifest-format", "docker", *OVERRIDES[2:], "--compressor", "gz"], user)
    assert proc.returncode == 0, describe(proc)
    assert "--annotation: a Docker manifest list and its Docker v2 manifests have no annotations" in proc.stderr
    result = json.loads(proc.stdout)
    blobs = layout / "blobs/sha256"
    raw = json.loads((blobs / result["digest"][7:]).read_text())
    assert raw["mediaType"] == DOCKER_LIST and "annotations" not in raw and "annotations" not in result
    for plat in result["platforms"]:
        manifest = json.loads((blobs / plat["digest"][7:]).read_text())
        assert manifest["mediaType"] == DOCKER_MANIFEST and "annotations" not in manifest
        assert {d["mediaType"] for d in manifest["layers"]} == {DOCKER_GZIP}
        config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
        assert config["config"]["Labels"]["org.example.label"] == "L"


def _fails(args: list[str], user: str | None, message: str) -> None:
    proc = run_nsbuild(args, user)
    assert proc.returncode == 2, describe(proc)
    assert message in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr


def test_index_errors(unprivileged_user: str | None, user_tmp) -> None:  # noqa: ANN001
    user = unprivileged_user
    work = user_tmp(user)
    amd = write_spec(work, {"name": "m", "architecture": "amd64"}, "amd.json")
    amd2 = write_spec(work, {"name": "m", "architecture": "amd64", "tag": "x"}, "amd2.json")
    arm64 = write_spec(work, {"name": "m", "architecture": "arm64"}, "arm64.json")
    arm64v8 = write_spec(work, {"name": "m", "architecture": "arm64", "variant": "v8"}, "arm64v8.json")
    zstd = write_spec(work, {"name": "m", "architecture": "arm64", "compressor": "zstd"}, "zstd.json")
    bad_variant = write_spec(work, {"name": "m", "architecture": "386", "variant": "v7"}, "badv.json")
    arm_v9 = write_spec(work, {"name": "m", "architecture": "arm", "variant": "v9"}, "armv9.json")
    chown_tree(user, work)
    out = work / "out"
    _fails(["index", str(amd), str(amd2), "-o", f"oci:{out}"], user, "platform linux/amd64 is given twice")
    _fails(["index", str(arm64), str(arm64v8), "-o", f"oci:{out}"], user, "platform linux/arm64")
    _fails(["index", str(amd), "-o", f"docker-archive:{work / 'x.tar'}"], user, "docker-archive holds one image")
    _fails(["index", str(amd), "-o", str(work / "x.tar")], user, "name the transport")
    _fails(["index", str(amd), str(zstd), "-o", f"oci:{out}", "--manifest-format", "docker"], user, "compressor zstd")
    _fails(["index", str(bad_variant), "-o", f"oci:{out}"], user, "variant: architecture 386 has no variants")
    _fails(["index", str(arm_v9), "-o", f"oci:{out}"], user, "variant: expected one of v5, v6, v7, v8")
    _fails(["layered", str(arm_v9), "-o", f"oci:{out}"], user, "variant:")
    _fails(["index", str(amd), "-o", f"oci:{out}", "--manifest-format", "v2s2"], user, "--manifest-format")
    for bad, message in (
        (["--compressor", "xz"], "--compressor: expected one of gz, zstd, none, got 'xz'"),
        (["--label", "nokey"], "--label 'nokey': expected KEY=VALUE"),
        (["--annotation", "=v"], "--annotation '=v': expected KEY=VALUE"),
        (["--sbom", "none", "--sbom-output", str(work / "s.json")], "--sbom-output: no SBOM is made with --sbom none"),
        (["--sbom", "all"], "--sbom: expected one of"),
        (["--compressor", "zstd", "--manifest-format", "docker"], "--compressor zstd: a Docker manifest list"),
    ):
        _fails(["index", str(amd), str(arm64), "-o", f"oci:{out}", *bad], user, message)
    assert not out.exists()  # nothing was built or written


def test_variant_in_config_only_when_set(user_tmp) -> None:  # noqa: ANN001
    """A spec without variant keeps the config's bytes (no "variant" key); with one, it is written."""
    work = user_tmp(None)
    plain = write_spec(work, {"name": "v", "tag": "1", "architecture": "arm"}, "plain.json")
    v7 = write_spec(work, {"name": "v", "tag": "1", "architecture": "arm", "variant": "v7"}, "v7.json")
    configs = []
    for spec in (plain, v7):
        out = work / spec.stem
        result = json.loads(
            nsbuild_ok(["layered", str(spec), "-o", f"oci:{out}", "--no-cache", "--json", "--sbom", "none"], None)
        )
        configs.append(json.loads((out / "blobs/sha256" / result["config_digest"][7:]).read_text()))
    assert "variant" not in configs[0] and configs[1]["variant"] == "v7"
    assert {k: v for k, v in configs[1].items() if k != "variant"} == configs[0]


def _tampered(layout: Path, dest: Path, change: str) -> Path:
    """A copy of `layout` whose index (tagged v1) is rewritten by `change`, re-tagged by digest so
    that only the one defect is left to find."""
    shutil.copytree(layout, dest, symlinks=True)
    top = json.loads((dest / "index.json").read_text())
    entry = next(m for m in top["manifests"] if "artifactType" not in m)
    blob = dest / "blobs/sha256" / entry["digest"][7:]
    index = json.loads(blob.read_text())
    if change == "nested":
        index["manifests"][1]["mediaType"] = OCI_INDEX
    elif change == "platform":
        index["manifests"][0]["platform"] = ["linux", "amd64"]
    elif change == "digest":
        index["manifests"][0]["digest"] = "sha256:" + "0" * 64
    data = json.dumps(index).encode()
    if change == "bytes":
        blob.write_bytes(blob.read_bytes() + b" ")  # the blob no longer has its digest
        data = b""
    if data:
        new = dest / "blobs/sha256" / hashlib.sha256(data).hexdigest()
        new.write_bytes(data)
        entry.update({"digest": _sha(data), "size": len(data)})
        (dest / "index.json").write_text(json.dumps(top))
    return dest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("bytes", "digest mismatch"),
        ("nested", "not an image manifest (nested indexes are refused)"),
        ("platform", "no platform object of strings"),
        ("digest", "is not in the layout"),
    ],
)
def test_hostile_index_layout(user_with_subids: str | None, user_tmp, change: str, message: str) -> None:  # noqa: ANN001
    """An index read from a layout is checked like a manifest: digests before use, types, media types;
    inspect and push say what is wrong in one line (exit 1), and push sends nothing."""
    user = user_with_subids
    work = user_tmp(user)
    specs = make_specs(work, user, PLATFORMS[:2])
    layout = work / "layout"
    index_json(specs, f"oci:{layout}:v1", user, "--sbom", "none")
    bad = _tampered(layout, work / f"bad-{change}", change)
    chown_tree(user, bad)
    for args in (["inspect", f"oci:{bad}:v1"], ["push", f"oci:{bad}:v1", "docker://127.0.0.1:1/x:1", TLS_OFF]):
        proc = run_nsbuild(args, user)
        assert proc.returncode == 1, describe(proc)
        assert message in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    if change == "platform":
        child = write_spec(work, {"name": "c", "architecture": "amd64", "fromImage": f"oci:{bad}:v1"}, "c.json")
        chown_tree(user, child)
        proc = run_nsbuild(["layered", str(child), "-o", f"oci:{work / 'c'}", "--no-cache"], user)
        assert proc.returncode == 1 and "has no platform object of strings" in proc.stderr, describe(proc)


def test_index_of_buildimage_specs(unprivileged_user: str | None, user_tmp) -> None:  # noqa: ANN001
    """--kind image: buildImage specs (copyToRoot) as the platforms, as any account."""
    user = unprivileged_user
    work = user_tmp(user)
    root = _tree(work, "root", {"etc/hello": "hi\n"})
    specs = []
    for arch, variant in PLATFORMS:
        spec = {"name": "single", "tag": "2", "architecture": arch, "copyToRoot": [str(root)]}
        if variant:
            spec["variant"] = variant
        specs.append(write_spec(work, spec, f"image-{arch}.json"))
    chown_tree(user, work)
    layout = work / "layout"
    result = index_json(specs, f"oci:{layout}", user, "--kind", "image", "--sbom", "none")
    assert result["tag"] == "2"  # the first spec's tag
    check_platforms(skopeo_inspect(f"oci:{layout}:2", user=user, raw=True), result)
    configs = [json.loads((layout / "blobs/sha256" / p["config_digest"][7:]).read_text()) for p in result["platforms"]]
    assert [(c["architecture"], c.get("variant")) for c in configs] == PLATFORMS
    # One layer, the same on every platform: stored once.
    manifests = [json.loads((layout / "blobs/sha256" / p["digest"][7:]).read_text()) for p in result["platforms"]]
    assert len({m["layers"][0]["digest"] for m in manifests}) == 1


def _entry(image: dict, platform: object) -> dict:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": image["manifest"],
        "size": len(image["manifest_bytes"]),
        "platform": platform,
    }


def test_registry_index_variant_and_hostile_entries(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    """A registry index of arm/v6 and arm/v7 images (a server that serves what the test says): the
    spec's variant picks the image; inspect lists the platforms; an index whose entries have the
    wrong types, or whose bytes are not the digest announced, is refused in one line."""
    user = user_with_subids
    work = user_tmp(user)
    reg = HostileRegistry()
    try:
        v6 = reg.add_image("base", None, {"etc/which": b"v6\n"}, architecture="arm")
        v7 = reg.add_image("base", None, {"etc/which": b"v7\n"}, architecture="arm")
        both = [_entry(v6, {"os": "linux", "architecture": "arm", "variant": "v6"})]
        both.append(_entry(v7, {"os": "linux", "architecture": "arm", "variant": "v7"}))
        index = reg.add_index("base", "arm", both)
        for variant, image in (("v7", v7), ("v6", v6)):
            spec = {"name": "c", "architecture": "arm", "variant": variant, "fromImage": reg.ref("base", "arm")}
            path = write_spec(work, spec, f"c-{variant}.json")
            chown_tree(user, path)
            args = ["layered", str(path), "-o", f"oci:{work / variant}", "--no-cache", "--json", TLS_OFF]
            out = json.loads(nsbuild_ok([*args, "--sbom", "none"], user))
            assert out["layers"][0]["digest"] == image["layer"] and out["base"]["manifest_digest"] == image["manifest"]
        report = json.loads(nsbuild_ok(["inspect", reg.ref("base", "arm"), TLS_OFF, "--json"], user))
        assert report["index"]["digest"] == index
        assert [p["platform"] for p in report["index"]["platforms"]] == ["linux/arm/v6", "linux/arm/v7"]

        reg.add_index("base", "badplatform", [_entry(v7, ["linux", "arm"])])
        nodigest = {k: v for k, v in _entry(v7, {"os": "linux", "architecture": "arm"}).items() if k != "digest"}
        reg.add_index("base", "nodigest", [nodigest])
        reg.faults.announce_digest["arm"] = "sha256:" + "1" * 64
        for tag, message in (
            ("badplatform", "platform is not an object of strings"),
            ("nodigest", "has no valid sha256 digest"),
            ("arm", "refusing it"),
        ):
            proc = run_nsbuild(["inspect", reg.ref("base", tag), TLS_OFF], user)
            assert proc.returncode == 1 and message in proc.stderr, describe(proc)
            assert len(proc.stderr.strip().splitlines()) == 1, describe(proc)
    finally:
        reg.stop()


@pytest.mark.parametrize("text", ['{"manifests": 5}', '{"manifests": [1]}', "[]", "\xff"])
def test_an_index_json_that_is_no_index_is_refused_untouched(
    unprivileged_user: str | None, user_tmp, text: str
) -> None:  # noqa: ANN001
    """A layout whose index.json is not an OCI index is refused by both writers (one image, an index)
    with the file named, no traceback, and the file left as it was."""
    user = unprivileged_user
    work = user_tmp(user)
    spec = write_spec(work, {"name": "m", "architecture": "amd64"}, "amd.json")
    out = work / "out"
    out.mkdir()
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (out / "index.json").write_text(text, encoding="latin-1")
    chown_tree(user, work)
    for command in ("layered", "index"):
        proc = run_nsbuild([command, str(spec), "-q", "-o", f"oci:{out}:x"], user)
        assert proc.returncode != 0, describe(proc)
        assert f"{out / 'index.json'}: exists but is not a valid OCI index" in proc.stderr, describe(proc)
        assert "Traceback" not in proc.stderr
        assert (out / "index.json").read_text(encoding="latin-1") == text
