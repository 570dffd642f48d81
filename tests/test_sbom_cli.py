"""`--sbom`, `--sbom-output`, `--sign-key` and `inspect --sbom` end to end (issue 15), as the
unprivileged test account: the documents validated by spdx-tools and cyclonedx-python-lib, the
referrers read back from an OCI layout (skopeo, index.json), an OCI archive and a real registry (the
referrers tag over raw HTTP), the signed provenance verified by securesystemslib.

The image is a tiny tree with a dpkg status file and a Python .dist-info directory: the package
databases' parsers are checked against real systems in tests/test_sbom_images.py."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from support.core import FakeStore, write_spec
from support.registry import RegistryFactory
from support.users import UserTmpFactory, chown_tree, describe, is_root, run_nsbuild
from support.verifiers import skopeo_inspect

SPDX = "application/spdx+json"
CDX = "application/vnd.cyclonedx+json"
IN_TOTO = "application/vnd.in-toto+json"
DSSE = "application/vnd.dsse.envelope.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
DPKG_STATUS = """\
Package: hello
Status: install ok installed
Architecture: amd64
Version: 2.10-3

Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4+deb12u5
"""
METADATA = "Metadata-Version: 2.1\nName: Tiny_Lib\nVersion: 1.2.3\n"


@pytest.fixture
def user() -> str | None:
    """The unprivileged test account when run as root (the builds that matter run as it)."""
    return "test" if is_root() else None


@pytest.fixture
def work(user: str | None, user_tmp: UserTmpFactory) -> Path:
    """A spec of one tree holding a dpkg database and a Python distribution, owned by `user`."""
    work = user_tmp(user)
    tree = work / "tree"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_text(DPKG_STATUS)
    dist = tree / "usr/lib/python3/dist-packages/tiny_lib-1.2.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(METADATA)
    (tree / "etc").mkdir()
    (tree / "etc/motd").write_text("v1\n")
    for p in [tree, *tree.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    write_spec(work, {"name": "sbomapp", "tag": "1", "contents": ["tree"], "config": {"Cmd": ["/bin/sh"]}})
    chown_tree(user, work)
    return work


def nsbuild(args: list[str], user: str | None, ok: bool = True) -> Any:
    proc = run_nsbuild(args, user)
    if ok:
        assert proc.returncode == 0, describe(proc)
    return proc


def build_json(work: Path, output: str, user: str | None, *extra: str) -> dict[str, Any]:
    proc = nsbuild(["layered", str(work / "spec.json"), "-o", output, "--no-cache", "-q", "--json", *extra], user)
    return json.loads(proc.stdout)


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def referrer_documents(layout: Path) -> dict[str, tuple[dict[str, Any], bytes]]:
    """artifactType → (its manifest, its document) for every referrer index.json lists."""
    index = json.loads((layout / "index.json").read_bytes())
    out = {}
    for desc in index["manifests"]:
        if "artifactType" in desc:
            manifest = json.loads(blob(layout, desc["digest"]))
            out[desc["artifactType"]] = (manifest, blob(layout, manifest["layers"][0]["digest"]))
    return out


def check_spdx(data: bytes, tmp: Path) -> dict[str, Any]:
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    path = tmp / "check.spdx.json"
    path.write_bytes(data)
    assert validate_full_spdx_document(parse_file(str(path))) == []
    return json.loads(data)


def check_cyclonedx(data: bytes) -> dict[str, Any]:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode())
    assert error is None, error
    return json.loads(data)


def purls_spdx(doc: dict[str, Any]) -> set[str]:
    return {
        ref["referenceLocator"]
        for pkg in doc["packages"]
        for ref in pkg.get("externalRefs", [])
        if ref.get("referenceType") == "purl"
    }


def test_oci_layout_gets_both_sboms_and_provenance_by_default(work: Path, user: str | None, tmp_path: Path) -> None:
    layout = work / "layout"
    result = build_json(work, f"oci:{layout}:t", user)
    digest = result["image_digest"]
    sbom = result["sbom"]
    assert sbom["subject"] == digest and sbom["formats"] == ["spdx", "cyclonedx"]
    assert [a["artifactType"] for a in sbom["attestations"]] == [SPDX, CDX, IN_TOTO]
    index = json.loads((layout / "index.json").read_bytes())
    tagged = [m for m in index["manifests"] if REF_NAME in m.get("annotations", {})]
    assert [m["digest"] for m in tagged] == [digest]
    listed = [m for m in index["manifests"] if "artifactType" in m]
    assert [m["digest"] for m in listed] == [a["digest"] for a in sbom["attestations"]]
    docs = referrer_documents(layout)
    for manifest, _ in docs.values():
        assert manifest["subject"]["digest"] == digest
        assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    # The image as an independent client reads it: the tag names the image, not an artifact.
    assert skopeo_inspect(f"oci:{layout}:t", user=user)["Digest"] == digest
    spdx = check_spdx(docs[SPDX][1], tmp_path)
    assert {"pkg:deb/debian/hello@2.10-3?arch=amd64", "pkg:pypi/tiny-lib@1.2.3"} <= purls_spdx(spdx)
    cdx = check_cyclonedx(docs[CDX][1])
    assert any(c.get("purl") == "pkg:deb/debian/hello@2.10-3?arch=amd64" for c in _components(cdx))
    statement = json.loads(docs[IN_TOTO][1])
    assert statement["subject"][0]["digest"] == {"sha256": digest.split(":", 1)[1]}
    assert statement["predicate"]["buildDefinition"]["externalParameters"]["spec"]["name"] == "sbomapp"
    # nsbuild's own readers skip the referrers: the untagged layout is the image.
    inspected = json.loads(nsbuild(["inspect", f"oci:{layout}", "--json"], user).stdout)
    assert len(inspected["layers"]) == 2


def _components(cdx: dict[str, Any]) -> list[dict[str, Any]]:
    out, todo = [], list(cdx.get("components", []))
    while todo:
        c = todo.pop()
        out.append(c)
        todo += c.get("components", [])
    return out


def test_same_layout_bytes_on_a_rebuild_and_stale_referrers_dropped(work: Path, user: str | None) -> None:
    first, again = work / "a", work / "b"
    one = build_json(work, f"oci:{first}:t", user)
    build_json(work, f"oci:{again}:t", user)
    assert _tree_digest(first) == _tree_digest(again)
    # Rebuilt with other content under the same tag: the old image's referrers go with it.
    (work / "tree/etc/motd").write_text("v2\n")
    two = build_json(work, f"oci:{first}:t", user)
    assert two["image_digest"] != one["image_digest"]
    build_json(work, f"oci:{first}:other", user, "--sbom", "none")
    index = json.loads((first / "index.json").read_bytes())
    referrers = [m for m in index["manifests"] if "artifactType" in m]
    subjects = [json.loads(blob(first, m["digest"]))["subject"]["digest"] for m in referrers]
    assert subjects == [two["image_digest"]] * 3


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + b"\0" + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


def test_oci_archive_attaches_only_when_asked(work: Path, user: str | None, tmp_path: Path) -> None:
    plain = work / "plain.oci.tar"
    assert "sbom" not in build_json(work, f"oci-archive:{plain}:t", user)
    with tarfile.open(plain) as tar:
        assert len(json.loads(tar.extractfile("index.json").read())["manifests"]) == 1  # type: ignore[union-attr]
    archive = work / "img.oci.tar"
    result = build_json(work, f"oci-archive:{archive}:t", user, "--sbom", "spdx")
    assert [a["artifactType"] for a in result["sbom"]["attestations"]] == [SPDX, IN_TOTO]
    out = tmp_path / "x"
    with tarfile.open(archive) as tar:
        tar.extractall(out)  # noqa: S202 - our own archive
    docs = referrer_documents(out)  # every blob an artifact names is inside the archive
    assert set(docs) == {SPDX, IN_TOTO}
    check_spdx(docs[SPDX][1], tmp_path)
    assert skopeo_inspect(f"oci-archive:{archive}:t", user=user)["Digest"] == result["image_digest"]
    # Reproducible, SBOMs and all: the same bytes when the caller (root, if we are) builds it again.
    again = tmp_path / "again.oci.tar"
    build_json(work, f"oci-archive:{again}:t", None, "--sbom", "spdx")
    assert again.read_bytes() == archive.read_bytes()


def test_docker_archive_has_no_sbom_unless_a_file_is_asked(work: Path, user: str | None, tmp_path: Path) -> None:
    result = build_json(work, str(work / "img.tar"), user)
    assert "sbom" not in result
    with tarfile.open(work / "img.tar") as tar:
        assert not [n for n in tar.getnames() if "spdx" in n or "cdx" in n]
    result = build_json(work, str(work / "img.tar"), user, "--sbom-output", str(work / "sbom.json"))
    assert sorted(Path(f).name for f in result["sbom"]["files"]) == ["sbom.cdx.json", "sbom.spdx.json"]
    check_spdx((work / "sbom.spdx.json").read_bytes(), tmp_path)
    check_cyclonedx((work / "sbom.cdx.json").read_bytes())
    one = work / "one.json"
    build_json(work, str(work / "img.tar"), user, "--sbom", "cyclonedx", "--sbom-output", str(one))
    assert check_cyclonedx(one.read_bytes())["bomFormat"] == "CycloneDX"


def test_signed_provenance_verifies_with_securesystemslib(work: Path, user: str | None) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    private = ed25519.Ed25519PrivateKey.generate()
    key = work / "key.pem"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    chown_tree(user, key)
    layout = work / "layout"
    result = build_json(work, f"oci:{layout}:t", user, "--sign-key", str(key))
    assert result["sbom"]["attestations"][-1]["artifactType"] == DSSE
    envelope = Envelope.from_dict(json.loads(referrer_documents(layout)[DSSE][1]))
    verifier = SSlibKey.from_crypto(private.public_key())
    assert list(envelope.verify([verifier], 1)) == [verifier.keyid]
    statement = json.loads(envelope.payload)
    assert statement["subject"][0]["digest"]["sha256"] == result["image_digest"].split(":", 1)[1]


def test_option_errors(work: Path, user: str | None) -> None:
    spec = str(work / "spec.json")
    proc = nsbuild(["layered", spec, "-o", f"oci:{work}/l:t", "--sbom", "xml"], user, ok=False)
    assert proc.returncode == 2 and "--sbom" in proc.stderr
    proc = nsbuild(["layered", spec, "-o", f"oci:{work}/l:t", "--sbom", "none", "--sign-key", spec], user, ok=False)
    assert proc.returncode == 2 and "--sign-key" in proc.stderr
    proc = nsbuild(["layered", spec, "-o", f"oci:{work}/l:t", "--sign-key", spec], user, ok=False)
    assert proc.returncode == 2 and "not a PEM private key" in proc.stderr
    assert not (work / "l").exists()  # refused before anything was built


def test_inspect_sbom_lists_the_packages_per_layer(work: Path, user: str | None) -> None:
    build_json(work, str(work / "img.tar"), user)
    text = nsbuild(["inspect", str(work / "img.tar"), "--sbom"], user).stdout
    lines = text.splitlines()
    assert lines[0].startswith("layer 0 sha256:") and "3 packages" in lines[0]
    assert any(line.split()[:3] == ["deb", "hello", "2.10-3"] for line in lines)
    assert any(line.split()[0] == "pypi" and line.endswith("pkg:pypi/tiny-lib@1.2.3") for line in lines)
    packages = json.loads(nsbuild(["inspect", str(work / "img.tar"), "--sbom", "--json"], user).stdout)["packages"]
    assert {p["purl"].split("@")[0] for p in packages} == {
        "pkg:deb/debian/hello",
        "pkg:deb/debian/base-files",
        "pkg:pypi/tiny-lib",
    }


def test_registry_push_attaches_referrers_under_the_referrers_tag(
    work: Path, user: str | None, registry_factory: RegistryFactory
) -> None:
    reg = registry_factory()
    result = build_json(work, f"docker://{reg}/team/sbomapp:1", user, "--tls-verify=false")
    digest = result["push"]["digest"]
    assert result["sbom"]["subject"] == digest
    assert result["sbom"]["registry_mode"] == "tag"  # distribution 2.8 has no referrers API
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    status, _, body = reg.request(f"/v2/team/sbomapp/manifests/sha256-{digest.split(':', 1)[1]}", headers=accept)
    assert status == 200, body
    listed = json.loads(body)["manifests"]
    assert [m["artifactType"] for m in listed] == [SPDX, CDX, IN_TOTO]
    as_manifest = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    status, _, manifest = reg.request(f"/v2/team/sbomapp/manifests/{listed[0]['digest']}", headers=as_manifest)
    assert status == 200 and json.loads(manifest)["subject"]["digest"] == digest
    layer = json.loads(manifest)["layers"][0]["digest"]
    status, _, document = reg.request(f"/v2/team/sbomapp/blobs/{layer}")
    assert status == 200 and json.loads(document)["spdxVersion"] == "SPDX-2.3"
    # Pushed again: the same referrers, listed once.
    build_json(work, f"docker://{reg}/team/sbomapp:1", user, "--tls-verify=false")
    status, _, body = reg.request(f"/v2/team/sbomapp/manifests/sha256-{digest.split(':', 1)[1]}", headers=accept)
    assert [m["digest"] for m in json.loads(body)["manifests"]] == [m["digest"] for m in listed]


def test_docker_manifest_push_and_push_of_an_untagged_layout(
    work: Path, user: str | None, registry_factory: RegistryFactory
) -> None:
    """The subject is the manifest the registry holds (a Docker v2 one with --manifest-format docker);
    `nsbuild push oci:DIR` takes the image of a layout that also lists its SBOMs."""
    reg = registry_factory()
    args = ["--tls-verify=false", "--manifest-format", "docker", "--sbom", "spdx"]
    result = build_json(work, f"docker://{reg}/team/d:1", user, *args)
    digest = result["push"]["digest"]
    assert result["push"]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert result["sbom"]["subject"] == digest
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    status, _, body = reg.request(f"/v2/team/d/manifests/sha256-{digest.split(':', 1)[1]}", headers=accept)
    assert status == 200 and [m["artifactType"] for m in json.loads(body)["manifests"]] == [SPDX, IN_TOTO]
    layout = work / "layout"
    image = build_json(work, f"oci:{layout}:t", user)["image_digest"]
    pushed = nsbuild(["push", f"oci:{layout}", f"docker://{reg}/team/p:1", "--tls-verify=false", "--json"], user)
    assert json.loads(pushed.stdout)["digest"] == image


def test_provenance_names_a_local_base_by_its_digest(work: Path, user: str | None) -> None:
    base = work / "base"
    base_digest = build_json(work, f"oci:{base}:b", user)["image_digest"]
    write_spec(work, {"name": "child", "tag": "1", "fromImage": f"oci:{base}:b", "contents": []}, "child.json")
    chown_tree(user, work / "child.json")
    layout = work / "child"
    proc = nsbuild(["layered", str(work / "child.json"), "-o", f"oci:{layout}:t", "--no-cache", "-q"], user)
    assert proc.returncode == 0
    docs = referrer_documents(layout)
    deps = json.loads(docs[IN_TOTO][1])["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert deps[0]["name"] == "fromImage" and deps[0]["digest"] == {"sha256": base_digest.split(":", 1)[1]}
    spdx = json.loads(docs[SPDX][1])
    assert any(base_digest.split(":", 1)[1] in json.dumps(p) for p in spdx["packages"])


def test_build_image_sbom_has_the_store_closure_with_its_references(work: Path, user: str | None) -> None:
    store = FakeStore(work / "store")
    lib = store.add("libz-1.3", {"lib/libz.so": b"\x7fELF"})
    app = store.add("app-2.0", {"bin/app": "#!/bin/sh\n"}, refs=[lib])
    spec = {"name": "img", "tag": "1", "storeDir": str(store.dir), "copyToRoot": ["tree", str(app)]}
    write_spec(work, spec, "image.json")
    chown_tree(user, work)
    layout = work / "layout"
    proc = nsbuild(["image", str(work / "image.json"), "-o", f"oci:{layout}:t", "--no-cache", "-q"], user)
    assert proc.returncode == 0
    spdx = json.loads(referrer_documents(layout)[SPDX][1])
    assert {"pkg:nix/app@2.0", "pkg:nix/libz@1.3", "pkg:deb/debian/hello@2.10-3?arch=amd64"} <= purls_spdx(spdx)
    ids = {p["name"]: p["SPDXID"] for p in spdx["packages"]}
    depends = {(r["spdxElementId"], r["relatedSpdxElement"]) for r in spdx["relationships"]}
    assert (ids["app"], ids["libz"]) in {(a, b) for a, b in depends}
    statement = json.loads(referrer_documents(layout)[IN_TOTO][1])
    assert statement["predicate"]["buildDefinition"]["externalParameters"]["command"] == "image"


def test_a_registry_refusing_the_artifacts_keeps_the_push_unless_sbom_was_asked(work: Path, user: str | None) -> None:
    from support.hostile_registry import HostileRegistry

    reg = HostileRegistry()
    try:
        reg.faults.fail["PUT /manifests/sha256-"] = 100  # the referrers tag's index is never taken
        fast = {"NSBUILD_REGISTRY_RETRIES": "1", "NSBUILD_REGISTRY_BACKOFF": "0", "NSBUILD_REGISTRY_TIMEOUT": "5"}
        args = ["layered", str(work / "spec.json"), "-o", reg.ref("app", "1"), "--tls-verify=false", "--no-cache"]
        proc = run_nsbuild([*args, "--json"], user, env=fast)
        assert proc.returncode == 0, describe(proc)
        assert "its SBOM and provenance are not" in proc.stderr
        result = json.loads(proc.stdout)
        assert result["sbom"]["registry_mode"] is None and result["sbom"]["registry_error"]
        assert "1" in reg.manifests["app"]  # the image itself is there
        proc = run_nsbuild([*args, "--sbom", "both"], user, env=fast)
        assert proc.returncode == 1 and proc.stderr.splitlines()[-1].startswith("nsbuild: error:"), describe(proc)
    finally:
        reg.stop()
