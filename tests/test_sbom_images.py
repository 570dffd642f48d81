"""SBOMs of images built by `nsbuild layered` (issue 15), checked against independent oracles.

One image per module: a real Debian rootfs made by mmdebstrap as its base (an OCI layout made here,
one layer), store paths built by Debian's Nix (offline, busybox builders) with includeNixDB, and a
venv as a content tree. The package lists must be what `dpkg-query -W`, `pip list` and `nix-store
-qR` say; the SPDX document must pass spdx-tools' full validation, the CycloneDX one
cyclonedx-python-lib's strict schema validation; the provenance must verify with securesystemslib;
the attached referrers must be where skopeo still finds the image, and on a registry without the
referrers API under the referrers tag, read back with plain HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from support.core import build, write_spec
from support.layouts import Layout, layer_descriptor
from support.users import is_root
from support.verifiers import skopeo_copy, skopeo_inspect

from nsbuild.sbom import (
    BaseFacts,
    SbomRequest,
    attach_to_layout,
    layout_referrers,
    load_signing_key,
    make_documents,
    render_packages,
)
from nsbuild.sbom.nix import sha256_hex

NIX_BUILD = shutil.which("nix-build")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NIX_BUILD is None, reason="nix-build is not installed (Debian package nix-bin)"),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap is not installed"),
]
BUSYBOX = "/bin/busybox"
DERIVATIONS = r"""
let
  mk = name: script: env: derivation ({
    inherit name; system = builtins.currentSystem; builder = "@BUSYBOX@";
    args = [ "sh" "-c" ("export PATH=@BBDIR@; " + script) ];
  } // env);
  libfoo = mk "libfoo-1.0" "mkdir -p $out/lib; echo foo > $out/lib/libfoo" {};
  data = mk "data-files-2024.1-r2" "echo data > $out" {};
  hello = mk "hello-2.12.1" "mkdir -p $out/bin; echo $libfoo $data > $out/bin/hello" { inherit libfoo data; };
  tool = mk "tool" "mkdir -p $out/bin; echo $out > $out/bin/tool" {};
in { inherit hello tool; }
"""


@dataclass
class World:
    root: Path
    store_dir: Path
    nix_env: dict[str, str]
    nix_uri: str
    contents: list[str]  # the store paths of spec.contents
    rootfs: Path  # var/lib/dpkg of the Debian rootfs, unpacked
    venv: Path
    spec: dict[str, Any]
    layout: Path

    def nix(self, *args: str) -> str:
        proc = subprocess.run(
            ["nix-store", "--store", self.nix_uri, *args], env=self.nix_env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


def _remove(path: Path) -> None:
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _debian(work: Path) -> Path:
    rootfs = work / "rootfs.tar"
    args = ["mmdebstrap", "--variant=essential", "--format=tar", "--aptopt=Acquire::Check-Valid-Until false"]
    if not is_root():
        args.append("--mode=unshare")
    proc = subprocess.run([*args, "stable", str(rootfs)], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.skip(f"mmdebstrap could not make a rootfs here (no mirror?): {proc.stderr[-300:]}")
    return rootfs


def _base_layout(rootfs_tar: Path, layout: Path) -> None:
    """An OCI layout holding one image whose only layer is the rootfs tar (tagged `base`)."""
    oci = Layout(layout)
    layer = oci.put_file(rootfs_tar)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-05-06T07:08:09Z",
            "rootfs": {"type": "layers", "diff_ids": [layer]},
            "history": [{"created": "2024-05-06T07:08:09Z", "created_by": "mmdebstrap"}],
        }
    ).encode()
    oci.finish(config, [layer_descriptor(layer, rootfs_tar.stat().st_size)], ref_name="base")


def _nix_store(root: Path) -> tuple[Path, dict[str, str], str, dict[str, str]]:
    store_dir = root / "nix" / "store"
    uri = f"local?store={store_dir}&state={root}/nix/var/nix&log={root}/nix/var/log/nix"
    conf = root / "etc-nix"
    conf.mkdir()
    (conf / "nix.conf").write_text("build-users-group =\nsandbox = false\nsubstituters =\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "NIX_CONF_DIR": str(conf), "USER": "root"}
    (root / "bb").mkdir()
    subprocess.run([BUSYBOX, "--install", "-s", str(root / "bb")], check=True)
    expr = root / "d.nix"
    expr.write_text(DERIVATIONS.replace("@BUSYBOX@", BUSYBOX).replace("@BBDIR@", str(root / "bb")))
    paths = {}
    for attr in ("hello", "tool"):
        proc = subprocess.run(
            [NIX_BUILD or "nix-build", "--store", uri, str(expr), "-A", attr, "--no-out-link"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        paths[attr] = proc.stdout.split()[-1]
    return store_dir, env, uri, paths


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = Path(tempfile.mkdtemp(prefix="nsbuild-sbom-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    try:
        store_dir, env, uri, paths = _nix_store(root)
        rootfs_tar = _debian(root)
        _base_layout(rootfs_tar, root / "base")
        dpkg = root / "debian"
        dpkg.mkdir()
        subprocess.run(["tar", "-xf", rootfs_tar, "-C", dpkg, "./var/lib/dpkg"], check=True)
        venv = root / "venv"
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=300)
        spec = {
            "name": "sbom-test",
            "tag": "t",
            "fromImage": f"oci:{root / 'base'}:base",
            "storeDir": str(store_dir),
            "includeNixDB": True,
            "created": "2025-01-02T03:04:05Z",
            "contents": [paths["hello"], paths["tool"], {"path": str(venv), "target": "/opt/venv"}],
        }
        spec_path = write_spec(root, spec)
        build(spec_path, f"oci:{root / 'image'}:t")
        yield World(root, store_dir, env, uri, [paths["hello"], paths["tool"]], dpkg, venv, spec, root / "image")
    finally:
        _remove(root)


def _request(world: World, **kw: Any) -> SbomRequest:
    return SbomRequest(store_dir=str(world.store_dir), **kw)


def test_packages_are_what_dpkg_pip_and_nix_say(world: World) -> None:
    docs = make_documents(world.layout, _request(world), tag="t")
    manifest = json.loads(docs.image.manifest)
    layer_digests = [d["digest"] for d in manifest["layers"]]
    got = {(p.kind, p.name, p.version) for p in docs.packages}
    dpkg = subprocess.run(
        ["dpkg-query", f"--admindir={world.rootfs}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    want_deb = {("deb", *line.split("\t")) for line in dpkg.splitlines()}
    assert len(want_deb) > 50
    assert {x for x in got if x[0] == "deb"} == want_deb
    assert {p.layer for p in docs.packages if p.kind == "deb"} == {layer_digests[0]}  # the base's one layer
    pip = json.loads(
        subprocess.run(
            [world.venv / "bin" / "python", "-m", "pip", "list", "--format", "json"], capture_output=True, check=True
        ).stdout
    )
    in_venv = {(p.name, p.version) for p in docs.packages if p.kind == "pypi" and p.path.startswith("/opt/venv/")}
    assert in_venv == {(d["name"], d["version"]) for d in pip} and in_venv
    text = render_packages(docs)  # what `nsbuild inspect IMAGE --sbom` prints
    assert text.startswith(f"layer 0 {layer_digests[0]}") and "\n  deb   libc6 " in text
    closure = set(world.nix("-qR", *world.contents).split())
    nix = {p.path: p for p in docs.packages if p.kind == "nix"}
    assert set(nix) == closure
    names = {(p.name, p.version) for p in nix.values()}
    assert {("hello", "2.12.1"), ("libfoo", "1.0"), ("data-files", "2024.1-r2"), ("tool", "")} <= names
    for path, pkg in nix.items():
        assert pkg.nar_hash == sha256_hex(world.nix("-q", "--hash", path).strip())
        assert set(pkg.references) == set(world.nix("-q", "--references", path).split()) - {path}
        assert pkg.layer in layer_digests[1:]
        with tarfile.open(world.layout / "blobs" / "sha256" / pkg.layer.split(":")[1]) as tf:
            assert path.lstrip("/") in {m.name.removeprefix("./").rstrip("/") for m in tf}


def test_documents_validate_and_are_reproducible(world: World, tmp_path: Path) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    docs = make_documents(world.layout, _request(world), tag="t")
    assert docs.spdx is not None and docs.cyclonedx is not None
    (tmp_path / "sbom.spdx.json").write_bytes(docs.spdx)
    spdx = parse_file(str(tmp_path / "sbom.spdx.json"))
    assert validate_full_spdx_document(spdx) == []
    assert len(spdx.packages) == len(docs.packages) + len(docs.image.layers) + 2  # + the image and its base
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(docs.cyclonedx.decode())
    assert error is None, error
    cdx = json.loads(docs.cyclonedx)
    assert cdx["metadata"]["timestamp"] == "2025-01-02T03:04:05Z"
    assert json.loads(docs.spdx)["creationInfo"]["created"] == "2025-01-02T03:04:05Z"
    assert cdx["metadata"]["component"]["version"] == docs.image.digest
    again = make_documents(world.layout, _request(world), tag="t")
    assert (again.spdx, again.cyclonedx) == (docs.spdx, docs.cyclonedx)
    # Nix references as relationships, checked against nix-store by name (SPDX) and by bom-ref (CycloneDX).
    spdx_json = json.loads(docs.spdx)
    spdx_names = {p["SPDXID"]: p["name"] for p in spdx_json["packages"]}
    depends = {
        (spdx_names[r["spdxElementId"]], spdx_names[r["relatedSpdxElement"]])
        for r in spdx_json["relationships"]
        if r["relationshipType"] == "DEPENDS_ON"
    }
    assert depends == {("hello", "libfoo"), ("hello", "data-files")}
    cdx_names = {}
    for layer in cdx["components"]:
        for inner in [layer, *layer.get("components", [])]:
            cdx_names.update({c["bom-ref"]: c["name"] for c in inner.get("components", [])})
    cdx_depends = {
        (cdx_names[d["ref"]], cdx_names[x])
        for d in cdx["dependencies"]
        for x in d.get("dependsOn", [])
        if d["ref"] in cdx_names
    }
    assert cdx_depends == depends
    contains = [r for r in spdx_json["relationships"] if r["relationshipType"] == "CONTAINS"]
    assert len([r for r in contains if r["spdxElementId"].startswith("SPDXRef-Layer-")]) == len(docs.packages)


def test_a_docker_archive_read_by_nsbuild_sources_gives_the_same_packages(world: World, tmp_path: Path) -> None:
    from nsbuild.sbom import documents_for, facts_from_layers
    from nsbuild.sources.baseimage import load_base

    spec_path = write_spec(tmp_path, world.spec)
    build(spec_path, tmp_path / "img.tar")  # a gzip-compressed docker-archive
    (tmp_path / "blobs").mkdir()
    (tmp_path / "work").mkdir()
    base = load_base(str(tmp_path / "img.tar"), tmp_path / "blobs", tmp_path / "work", architecture="amd64")
    assert base.raw_config is not None
    facts = facts_from_layers("sbom-test", "t", base.raw_config, base.layers)
    docs = documents_for(facts, _request(world))
    from_layout = make_documents(world.layout, _request(world), tag="t")
    as_set = {(p.kind, p.name, p.version, p.path, p.nar_hash) for p in docs.packages}
    assert as_set == {(p.kind, p.name, p.version, p.path, p.nar_hash) for p in from_layout.packages}


def test_provenance_is_signed_and_names_what_went_in(world: World) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    base_index = json.loads((world.root / "base" / "index.json").read_text())
    base_digest = base_index["manifests"][0]["digest"]
    # What the build passes: the base as the spec names it, with its manifest digest.
    base = BaseFacts(world.spec["fromImage"], base_digest, 1)
    request = _request(world, spec=world.spec, sign_key=load_signing_key(pem), base=base)
    docs = make_documents(world.layout, request, tag="t")
    assert docs.provenance is not None and docs.provenance_signed
    envelope = Envelope.from_dict(json.loads(docs.provenance))
    verifier = SSlibKey.from_crypto(private.public_key())
    assert len(envelope.verify([verifier], 1)) == 1
    statement = json.loads(envelope.payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"] == [{"name": "sbom-test", "digest": {"sha256": docs.image.digest.split(":")[1]}}]
    predicate = statement["predicate"]
    assert predicate["buildDefinition"]["externalParameters"]["spec"] == world.spec
    deps = predicate["buildDefinition"]["resolvedDependencies"]
    assert deps[0] == {"name": "fromImage", "uri": world.spec["fromImage"], "digest": {"sha256": base_digest[7:]}}
    layers = json.loads(docs.image.manifest)["layers"]
    assert [d["digest"]["sha256"] for d in deps if d["name"] != "fromImage"] == [
        lay["digest"].split(":")[1] for lay in layers[1:]
    ]
    assert predicate["runDetails"]["metadata"]["startedOn"] == "2025-01-02T03:04:05Z"
    unsigned = make_documents(world.layout, _request(world, spec=world.spec, base=base), tag="t")
    assert unsigned.provenance == envelope.payload  # ed25519: deterministic; the payload is the statement


def _layout_copy(world: World, dest: Path) -> Path:
    shutil.copytree(world.layout, dest)
    return dest


def test_attached_to_the_layout_skopeo_still_reads_the_image(world: World, tmp_path: Path) -> None:
    layout = _layout_copy(world, tmp_path / "oci")
    docs = make_documents(layout, _request(world, spec=world.spec), tag="t")
    before = skopeo_inspect(f"oci:{layout}:t")
    added = attach_to_layout(layout, docs.subject, docs.artifacts(), docs.image.created)
    assert len(added) == 3
    attach_to_layout(layout, docs.subject, docs.artifacts(), docs.image.created)  # again: replaced, not doubled
    assert skopeo_inspect(f"oci:{layout}:t")["Digest"] == before["Digest"] == docs.image.digest
    # An independent reading of index.json: the manifests whose subject is the image.
    index = json.loads((layout / "index.json").read_text())
    found = {}
    for desc in index["manifests"]:
        manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_bytes())
        if manifest.get("subject", {}).get("digest") == docs.image.digest:
            assert desc["artifactType"] == manifest["artifactType"] == manifest["layers"][0]["mediaType"]
            blob = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]
            found[manifest["artifactType"]] = blob.read_bytes()
    assert found == {a.media_type: a.data for a in docs.artifacts()}
    assert len(index["manifests"]) == 4
    assert len(layout_referrers(layout, docs.image.digest)) == 3
    # The layout with its referrers is still a layout skopeo copies the image from.
    skopeo_copy(f"oci:{layout}:t", f"dir:{tmp_path / 'copy'}")
    # The SBOM of the layout with referrers is the same: they are not taken for the image.
    assert (
        make_documents(layout, _request(world), tag="t").spdx
        == make_documents(world.layout, _request(world), tag="t").spdx
    )


def test_attached_in_a_registry_through_the_referrers_tag(world: World, registry: str, tmp_path: Path) -> None:
    from nsbuild.registry.options import RegistryOptions
    from nsbuild.sbom.referrers import attach_to_registry, fallback_tag

    docs = make_documents(world.layout, _request(world, spec=world.spec), tag="t")
    skopeo_copy(
        f"oci:{world.layout}:t", f"docker://{registry}/sbom/app:t", "--dest-tls-verify=false", "--preserve-digests"
    )
    result = attach_to_registry(
        f"{registry}/sbom/app:t",
        docs.subject,
        docs.artifacts(),
        created=docs.image.created,
        options=RegistryOptions(tls_verify=False),
    )
    assert result.mode == "tag" and result.fallback_tag == fallback_tag(docs.image.digest)
    again = attach_to_registry(
        f"{registry}/sbom/app:t",
        docs.subject,
        docs.artifacts(),
        created=docs.image.created,
        options=RegistryOptions(tls_verify=False),
    )
    assert again.descriptors == result.descriptors

    def get(path: str, accept: str) -> bytes:
        req = urllib.request.Request(f"http://{registry}/v2/sbom/app/{path}", headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    # The image is what its tag names, as before.
    assert skopeo_inspect(f"docker://{registry}/sbom/app:t", "--tls-verify=false")["Digest"] == docs.image.digest
    index = json.loads(
        get(f"manifests/sha256-{docs.image.digest.split(':')[1]}", "application/vnd.oci.image.index.v1+json")
    )
    assert len(index["manifests"]) == 3  # pushed twice, listed once
    found = {}
    for desc in index["manifests"]:
        manifest = json.loads(get(f"manifests/{desc['digest']}", "application/vnd.oci.image.manifest.v1+json"))
        assert manifest["subject"]["digest"] == docs.image.digest
        found[desc["artifactType"]] = get(f"blobs/{manifest['layers'][0]['digest']}", "*/*")
    assert found == {a.media_type: a.data for a in docs.artifacts()}


def test_publish_writes_files_and_attaches_to_the_layout(world: World, tmp_path: Path) -> None:
    from nsbuild.sbom import PublishTarget, publish

    layout = _layout_copy(world, tmp_path / "oci")
    docs = make_documents(layout, _request(world, formats=("cyclonedx",), spec=world.spec), tag="t")
    files = (("cyclonedx", tmp_path / "sbom.cdx.json"), ("provenance", tmp_path / "prov.json"))
    done = publish(docs, PublishTarget(files=files, layout=layout))
    assert (tmp_path / "sbom.cdx.json").read_bytes() == docs.cyclonedx
    assert (tmp_path / "prov.json").read_bytes() == docs.provenance
    assert [d["artifactType"] for d in done.layout_referrers] == [
        "application/vnd.cyclonedx+json",
        "application/vnd.in-toto+json",
    ]
    assert done.registry_mode == "" and not done.registry_referrers
    from nsbuild.errors import BuildError

    with pytest.raises(BuildError, match="no spdx document"):
        publish(docs, PublishTarget(files=(("spdx", tmp_path / "x.json"),)))
