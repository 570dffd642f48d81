"""The SBOM's package scan remembered in the layer cache (issue 17, nsbuild.cache.scans): a rebuild of
an unchanged image makes the same documents byte for byte and reads none of its layer blobs; an entry
that is damaged, or recorded for other layers, is never used.

The builds run as the unprivileged test account. That no layer is read is checked in the process
itself: an audit hook (sys.addaudithook) sees every file the build opens."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from support.core import write_spec
from support.users import UserTmpFactory, chown_tree, describe, is_root, run_as, run_nsbuild

from nsbuild.cache.scans import PackageScans
from nsbuild.sbom.packages import Package, scan_identity

DPKG_STATUS = "Package: hello\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.10-3\n"
METADATA = "Metadata-Version: 2.1\nName: Tiny_Lib\nVersion: 1.2.3\n"
LAYER_A = "sha256:" + "a" * 64
LAYER_B = "sha256:" + "b" * 64


@pytest.fixture
def user() -> str | None:
    return "test" if is_root() else None


def _tree(work: Path, name: str, version: str) -> None:
    tree = work / name
    (tree / "var/lib/dpkg").mkdir(parents=True)
    (tree / "var/lib/dpkg/status").write_text(DPKG_STATUS.replace("2.10-3", version))
    dist = tree / "usr/lib/python3/dist-packages/tiny_lib-1.2.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(METADATA)
    for p in [tree, *tree.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def work(user: str | None, user_tmp: UserTmpFactory) -> Path:
    """Two specs of one small tree each (the packages differ by a version), owned by `user`."""
    work = user_tmp(user)
    _tree(work, "tree", "2.10-3")
    _tree(work, "other", "9.9-9")
    write_spec(work, {"name": "sbomapp", "tag": "1", "contents": ["tree"], "compressor": "gz"})
    write_spec(work, {"name": "sbomapp", "tag": "1", "contents": ["other"], "compressor": "gz"}, "other.json")
    chown_tree(user, work)
    return work


def _build(work: Path, user: str | None, out: str, *extra: str, spec: str = "spec.json") -> None:
    proc = run_nsbuild(["layered", "-q", str(work / spec), "-o", f"oci:{work / out}:1", *extra], user)
    assert proc.returncode == 0, describe(proc)


def _documents(layout: Path) -> dict[str, bytes]:
    """The attached documents of a layout by artifact type, and its index.json."""
    index = json.loads((layout / "index.json").read_bytes())
    out = {"index.json": (layout / "index.json").read_bytes()}
    for desc in index["manifests"]:
        if "artifactType" in desc:
            manifest = json.loads((layout / "blobs/sha256" / desc["digest"].split(":")[1]).read_bytes())
            blob = manifest["layers"][0]["digest"].split(":")[1]
            out[desc["artifactType"]] = (layout / "blobs/sha256" / blob).read_bytes()
    return out


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "sbom").glob("*.json"))


def test_cached_documents_are_byte_identical(work: Path, user: str | None) -> None:
    cache = work / "cache"
    _build(work, user, "fresh", "--no-cache")
    _build(work, user, "first", "--cache-dir", str(cache))
    assert len(_entries(cache)) == 1
    _build(work, user, "second", "--cache-dir", str(cache))
    fresh, first, second = (_documents(work / d) for d in ("fresh", "first", "second"))
    assert len(fresh) == 4  # index.json, SPDX, CycloneDX, provenance
    assert fresh == first == second
    assert b"pkg:deb/debian/hello@2.10-3" in fresh["application/spdx+json"]


def test_an_entry_recorded_for_another_image_is_not_used(work: Path, user: str | None) -> None:
    """The other image's entry copied over this one's (a forged entry: right form, wrong layers), and a
    truncated entry: the layers are scanned again, the documents are a fresh build's, the entry is mended."""
    cache, other_cache = work / "cache", work / "other-cache"
    _build(work, user, "fresh", "--no-cache")
    _build(work, user, "first", "--cache-dir", str(cache))
    _build(work, user, "o", "--cache-dir", str(other_cache), spec="other.json")
    (mine,), (theirs,) = _entries(cache), _entries(other_cache)
    good = mine.read_bytes()
    for damaged in (theirs.read_bytes(), good[: len(good) // 2], good.replace(b"2.10-3", b"2.10-4")):
        mine.write_bytes(damaged)
        _build(work, user, "again", "--cache-dir", str(cache))
        assert _documents(work / "again") == _documents(work / "fresh")
        assert mine.read_bytes() == good


AUDIT = """
import sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        opened.append(args[0] if isinstance(args[0], str) else args[0].decode("utf-8", "replace"))
sys.addaudithook(hook)
sys.argv = ["nsbuild", *sys.argv[2:]]
try:
    from nsbuild.cli.cli import main
    main()
finally:
    with open(LOG, "w") as f:
        f.write("\\n".join(opened))
"""


def test_an_up_to_date_rebuild_reads_no_layer(work: Path, user: str | None) -> None:
    cache = work / "cache"
    args = ["layered", "-q", str(work / "spec.json"), "-o", f"oci:{work / 'out'}:1", "--cache-dir", str(cache)]
    _build(work, user, "out", "--cache-dir", str(cache))
    # Linking blobs into the new layout moved their ctime: this build hashes them once more (cache.py).
    _build(work, user, "out", "--cache-dir", str(cache))
    log = work / "opened.txt"
    script = AUDIT.replace("LOG", repr(str(log)))
    python = Path(os.path.dirname(sys.executable)) / "python"
    proc = run_as([str(python), "-c", script, "-", *args], user)
    assert proc.returncode == 0, describe(proc)
    opened = log.read_text().splitlines()
    assert any(p.endswith("index.json") for p in opened)  # the hook saw the build's files
    manifest_desc = next(
        d for d in json.loads((work / "out/index.json").read_bytes())["manifests"] if "artifactType" not in d
    )
    manifest = json.loads((work / "out/blobs/sha256" / manifest_desc["digest"].split(":")[1]).read_bytes())
    layers = [d["digest"].split(":")[1] for d in manifest["layers"]]
    read = [p for p in opened if any(p.endswith(h) for h in layers)]
    assert read == [], f"the rebuild opened layer blobs: {read}"


def test_scan_entries_round_trip_and_refuse_damage(tmp_path: Path) -> None:
    scans = PackageScans(tmp_path)
    pkgs = (
        Package("deb", "hello", "2.10-3", "pkg:deb/debian/hello@2.10-3?arch=amd64", "/var/lib/dpkg/status", LAYER_A),
        Package(
            "nix", "zlib", "1.3", "pkg:nix/zlib@1.3", "/nix/store/x-zlib-1.3", LAYER_B, references=("/nix/store/y",)
        ),
    )
    ident = scan_identity([LAYER_A, LAYER_B], "/nix/store", None)
    assert ident != scan_identity([LAYER_A, LAYER_B], "/gnu/store", None)
    assert ident != scan_identity([LAYER_B, LAYER_A], "/nix/store", None)
    assert scans.get(ident, [LAYER_A, LAYER_B]) is None
    scans.put(ident, pkgs)
    assert scans.get(ident, [LAYER_A, LAYER_B]) == pkgs
    # Recorded for other layers: refused even with its checksum and identity made to fit.
    assert scans.get(ident, [LAYER_A]) is None
    entry = tmp_path / "sbom" / f"{ident}.json"
    other = scan_identity([LAYER_A], "/nix/store", None)
    (tmp_path / "sbom" / f"{other}.json").write_bytes(entry.read_bytes())
    assert scans.get(other, [LAYER_A]) is None
    data = json.loads(entry.read_bytes())
    data["packages"][0]["version"] = "9"
    entry.write_text(json.dumps(data))
    assert scans.get(ident, [LAYER_A, LAYER_B]) is None
    entry.write_text("{")
    assert scans.get(ident, [LAYER_A, LAYER_B]) is None
