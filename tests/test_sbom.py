"""nsbuild.sbom's parts on small inputs made here (issue 15): Nix's name/version split and hash forms
against real Nix, layer semantics (whiteouts, compression), the package databases, DSSE signatures
checked by securesystemslib's verifier. The images built end to end: tests/test_sbom_images.py."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from nsbuild.errors import BuildError
from nsbuild.sbom.dsse import load_signing_key, sign_envelope
from nsbuild.sbom.nix import nix32_decode, parse_drv_name, sha256_hex
from nsbuild.sbom.packages import LayerBlob, scan_layers
from nsbuild.sbom.purl import purl

NIX_INSTANTIATE = shutil.which("nix-instantiate")
NIX_HASH = shutil.which("nix-hash")

# Nix's own examples (the manual's and its test suite's), and edges of the rule.
DRV_NAMES = [
    "ripgrep-1.2",
    "rip-grep-1.2",
    "7zip_archiver-0.2",
    "gcc-1-2",
    "bash--1-2",
    "xvidtune-?1-2",
    "nix-0.12pre12876",
    "apache-httpd-2.0.48",
    "hello",
    "foo-",
    "-1.0",
    "a-B-1",
    "python3.11-requests-2.31.0",
    "glibc-2.37-8-bin",
    "libX11-1.8.7",
    "source",
    "zlib-1.3-dev",
    "x-_y-1",
]


def _nix_env(tmp: Path) -> dict[str, str]:
    conf = tmp / "etc-nix"
    conf.mkdir(exist_ok=True)
    (conf / "nix.conf").write_text("build-users-group =\nsandbox = false\nsubstituters =\n")
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "NIX_CONF_DIR": str(conf), "USER": "root"}


@pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate is not installed (Debian package nix-bin)")
def test_parse_drv_name_is_nixs(tmp_path: Path) -> None:
    expr = "map builtins.parseDrvName [" + " ".join(json.dumps(n) for n in DRV_NAMES) + "]"
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--store", f"local?root={tmp_path}/s", "--eval", "--json", "--strict", "-E", expr],
        env=_nix_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    nix = [(d["name"], d["version"]) for d in json.loads(proc.stdout)]
    assert [parse_drv_name(n) for n in DRV_NAMES] == nix


def test_parse_drv_name_examples() -> None:
    assert parse_drv_name("apache-httpd-2.0.48") == ("apache-httpd", "2.0.48")
    assert parse_drv_name("bash--1-2") == ("bash", "-1-2")
    assert parse_drv_name("hello") == ("hello", "")


@pytest.mark.skipif(NIX_HASH is None, reason="nix-hash is not installed (Debian package nix-bin)")
def test_nar_hash_forms_match_nix_hash(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"nsbuild").hexdigest()
    env = _nix_env(tmp_path)
    nix32 = subprocess.run(
        [NIX_HASH, "--type", "sha256", "--to-base32", digest], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert nix32_decode(nix32).hex() == digest
    sri = "sha256-" + base64.b64encode(bytes.fromhex(digest)).decode()
    for form in ("sha256:" + digest, "sha256:" + nix32, sri, digest):
        assert sha256_hex(form) == digest
    for bad in ("md5:abc", "sha256:" + "e" * 52, "sha256-AAAA"):
        with pytest.raises(ValueError):
            sha256_hex(bad)


def test_purl_encoding() -> None:
    assert purl("deb", "debian", "libc6", "2.36-9+deb12u4", {"arch": "amd64"}) == (
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64"
    )
    assert purl("deb", "debian", "e2fsprogs", "1:1.47.0-2") == "pkg:deb/debian/e2fsprogs@1:1.47.0-2"
    assert purl("nix", "", "hello", "") == "pkg:nix/hello"


# --- layers ---------------------------------------------------------------------------------------


def _layer(path: Path, files: dict[str, bytes | None], compress: str = "none") -> LayerBlob:
    """A layer tar: name → bytes (a file) or None (a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compress == "gz":
        raw = gzip.compress(raw, mtime=0)
    elif compress == "zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return LayerBlob("sha256:" + hashlib.sha256(raw).hexdigest(), path)


DPKG = b"""Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4+deb12u5
Description: base
 system files

Package: gone
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: libc6
Status: install ok installed
Multi-Arch: same
Architecture: amd64
Version: 2.36-9+deb12u4
"""

APK = b"""C:Q1abc=
P:musl
V:1.2.4-r2
A:x86_64

C:Q1def=
P:busybox
V:1.36.1-r15
A:x86_64
"""


def _meta(name: str, version: str) -> bytes:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: x\n\nlong description\n".encode()


def test_packages_per_layer_with_whiteouts_and_compression(tmp_path: Path) -> None:
    store = "nix/store/"
    h1, h2 = "0" * 32, "1" * 32
    layers = [
        _layer(
            tmp_path / "l0",
            {
                "var/lib/dpkg/status": DPKG,
                "lib/apk/db/installed": APK,
                "usr/lib/python3/dist-packages/six-1.16.0.dist-info/METADATA": _meta("six", "1.16.0"),
                "opt/v/lib/python3.11/site-packages/Foo_Bar-2.0.dist-info/METADATA": _meta("Foo_Bar", "2.0"),
            },
            "gz",
        ),
        _layer(
            tmp_path / "l1",
            {
                store[:-1]: None,
                f"{store}{h1}-hello-2.12.1": None,
                f"{store}{h1}-hello-2.12.1/bin/hello": b"x",
                f"./{store}{h2}-tool/bin/tool": b"y",
                f"{store}{h2}-x.drv": b"Derive(",
                "opt/v/lib/python3.11/site-packages/.wh.Foo_Bar-2.0.dist-info": b"",
            },
            "zstd",
        ),
        _layer(
            tmp_path / "l2",
            {
                "lib/apk/db/.wh..wh..opq": b"",
                f"{store}.wh.{h2}-tool": b"",
                "var/lib/dpkg/status": DPKG.replace(b"12.4+deb12u5", b"12.4+deb12u6"),
            },
        ),
    ]
    got = scan_layers(layers)
    where = {(p.kind, p.name, p.version): p.layer for p in got}
    assert where == {
        ("deb", "base-files", "12.4+deb12u6"): layers[2].digest,  # the later status replaces the first
        ("deb", "libc6", "2.36-9+deb12u4"): layers[2].digest,
        ("pypi", "six", "1.16.0"): layers[0].digest,
        ("nix", "hello", "2.12.1"): layers[1].digest,
    }
    six = next(p for p in got if p.name == "six")
    assert six.purl == "pkg:pypi/six@1.16.0"
    assert six.path == "/usr/lib/python3/dist-packages/six-1.16.0.dist-info/METADATA"
    hello = next(p for p in got if p.kind == "nix")
    assert hello.path == f"/nix/store/{h1}-hello-2.12.1" and hello.purl == "pkg:nix/hello@2.12.1"
    # Without the later layers: apk's packages, Foo_Bar and the tool are there.
    first = {(p.kind, p.name, p.purl) for p in scan_layers(layers[:2])}
    assert ("apk", "musl", "pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64") in first
    assert ("nix", "tool", "pkg:nix/tool") in first
    assert ("pypi", "Foo_Bar", "pkg:pypi/foo-bar@2.0") not in first  # whited out in layer 1
    assert ("pypi", "Foo_Bar", "pkg:pypi/foo-bar@2.0") in {(p.kind, p.name, p.purl) for p in scan_layers(layers[:1])}


def test_distroless_apk3_egg_info_and_hard_links(tmp_path: Path) -> None:
    lay = _layer(
        tmp_path / "l",
        {
            "var/lib/dpkg/status.d/libc6": b"Package: libc6\nVersion: 2.36\nArchitecture: amd64\n",
            "var/lib/dpkg/status.d/libc6.md5sums": b"0123  usr/lib/x\n",
            "usr/lib/apk/db/installed": b"P:musl\nV:1.2.5-r0\nA:aarch64\n",
            "usr/lib/python3/dist-packages/chardet-5.1.0.egg-info/PKG-INFO": _meta("chardet", "5.1.0"),
            "opt/a/x-1.dist-info/METADATA": _meta("x", "1"),
        },
    )
    with tarfile.open(tmp_path / "l", "a") as tar:  # a hard link to a METADATA of the same layer
        info = tarfile.TarInfo("opt/b/x-1.dist-info/METADATA")
        info.type, info.linkname = tarfile.LNKTYPE, "opt/a/x-1.dist-info/METADATA"
        tar.addfile(info)
    lay = LayerBlob("sha256:" + hashlib.sha256((tmp_path / "l").read_bytes()).hexdigest(), tmp_path / "l")
    got = {(p.kind, p.name, p.version, p.path) for p in scan_layers([lay])}
    assert got == {
        ("deb", "libc6", "2.36", "/var/lib/dpkg/status.d/libc6"),
        ("apk", "musl", "1.2.5-r0", "/usr/lib/apk/db/installed"),
        ("pypi", "chardet", "5.1.0", "/usr/lib/python3/dist-packages/chardet-5.1.0.egg-info/PKG-INFO"),
        ("pypi", "x", "1", "/opt/a/x-1.dist-info/METADATA"),
        ("pypi", "x", "1", "/opt/b/x-1.dist-info/METADATA"),
    }


def test_store_info_given_by_the_caller(tmp_path: Path) -> None:
    h1, h2 = "a" * 32, "b" * 32
    lay = _layer(tmp_path / "l", {f"s/{h1}-app-1.0/x": b"", f"s/{h2}-lib-2/y": b""})
    nar = hashlib.sha256(b"nar").hexdigest()
    info = {f"/s/{h1}-app-1.0": {"narHash": "sha256:" + nar, "references": [f"{h2}-lib-2", f"/s/{h1}-app-1.0"]}}
    got = {p.name: p for p in scan_layers([lay], store_dir="/s", nix_info=info)}
    assert got["app"].nar_hash == nar and got["app"].references == (f"/s/{h2}-lib-2",)
    assert got["lib"].nar_hash == "" and got["lib"].references == ()


def test_store_info_from_the_build_closure(tmp_path: Path) -> None:
    from nsbuild.plan.store import StorePath
    from nsbuild.sbom.nix import nix_info_from_closure

    h1, h2 = "c" * 32, "d" * 32
    closure = {
        f"{h1}-app-1.0": StorePath(tmp_path / f"{h1}-app-1.0", references={h2, h1}),
        f"{h2}-lib-2": StorePath(tmp_path / f"{h2}-lib-2"),
    }
    nar = hashlib.sha256(b"lib").hexdigest()
    info = nix_info_from_closure(closure, "/s", {f"{h2}-lib-2": "sha256:" + nar})
    assert info == {
        f"/s/{h1}-app-1.0": {"references": [f"/s/{h2}-lib-2"]},
        f"/s/{h2}-lib-2": {"references": [], "narHash": "sha256:" + nar},
    }
    lay = _layer(tmp_path / "l", {f"s/{h1}-app-1.0/x": b"", f"s/{h2}-lib-2/y": b""})
    got = {p.name: p for p in scan_layers([lay], store_dir="/s", nix_info=info)}
    assert got["app"].references == (f"/s/{h2}-lib-2",) and got["lib"].nar_hash == nar


def test_malformed_layer_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a tar" * 100)
    with pytest.raises(BuildError, match="not a sound tar"):
        scan_layers([LayerBlob("sha256:" + "0" * 64, bad)])


# --- DSSE ------------------------------------------------------------------------------------------


def _pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_dsse_envelope_verified_by_securesystemslib(kind: str) -> None:
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    private = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
    key = load_signing_key(_pem(private))
    payload = json.dumps({"_type": "https://in-toto.io/Statement/v1"}).encode()
    envelope = sign_envelope(payload, key)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # its own key id, computed from the public key alone
    verifier = SSlibKey.from_crypto(serialization.load_pem_public_key(public_pem))
    assert verifier.keyid == key.keyid
    parsed = Envelope.from_dict(json.loads(json.dumps(envelope)))
    assert parsed.payload == payload
    assert list(parsed.verify([verifier], 1)) == [key.keyid]
    tampered = dict(envelope, payload=base64.b64encode(payload + b" ").decode())
    with pytest.raises(VerificationError):
        Envelope.from_dict(json.loads(json.dumps(tampered))).verify([verifier], 1)


def test_signing_key_errors(tmp_path: Path) -> None:
    from nsbuild.errors import UsageError

    with pytest.raises(UsageError, match="not a PEM private key"):
        load_signing_key(b"-----BEGIN NOTHING-----\n")
    rsa_pem = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
        capture_output=True,
        check=True,
    ).stdout
    with pytest.raises(UsageError, match="ed25519 or ECDSA P-256"):
        load_signing_key(rsa_pem)
