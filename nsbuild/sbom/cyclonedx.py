"""CycloneDX 1.6 JSON: the image as the BOM's subject; its layers as components that hold (nest) the
packages found in them; the base image as a component nesting its own layers; Nix references as
dependencies. Reproducible as the SPDX document is (nsbuild.sbom.spdx)."""

from __future__ import annotations

from typing import Any

from nsbuild import __version__
from nsbuild.sbom.layout import ImageFacts, LayerFacts
from nsbuild.sbom.packages import Package
from nsbuild.sbom.purl import oci_purl
from nsbuild.sbom.spdx import content_uuid, short_hash

SCHEMA = "http://cyclonedx.org/schema/bom-1.6.schema.json"
IMAGE_REF = "image"
BASE_REF = "base-image"


def package_ref(pkg: Package) -> str:
    return f"{pkg.kind}-{short_hash(*pkg.sort_key)}"


def layer_ref(layer: LayerFacts) -> str:
    return f"layer-{layer.digest}"


def _props(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in sorted(pairs) if v]


def _sha256(digest: str) -> list[dict[str, str]]:
    return [{"alg": "SHA-256", "content": digest.split(":", 1)[-1]}]


def _package(pkg: Package) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "library", "bom-ref": package_ref(pkg), "name": pkg.name, "purl": pkg.purl}
    if pkg.version:
        doc["version"] = pkg.version
    props = [("nsbuild:path", pkg.path), ("nsbuild:layer", pkg.layer), ("nsbuild:arch", pkg.arch)]
    if pkg.nar_hash:
        doc["hashes"] = _sha256(pkg.nar_hash)
        props.append(("nix:narHash", "sha256:" + pkg.nar_hash))
    doc["properties"] = _props(props)
    return doc


def _layer(index: int, layer: LayerFacts, held: list[Package]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "file",
        "bom-ref": layer_ref(layer),
        "name": f"layer {index}",
        "version": layer.digest,
        "hashes": _sha256(layer.digest),
        "properties": _props(
            [
                ("nsbuild:diffID", layer.diff_id),
                ("nsbuild:mediaType", layer.media_type),
                ("nsbuild:source", layer.source),
                ("nsbuild:layerIndex", str(index)),
            ]
        ),
    }
    if held:
        doc["components"] = sorted((_package(p) for p in held), key=lambda c: c["bom-ref"])
    return doc


def cyclonedx_document(image: ImageFacts, packages: list[Package]) -> dict[str, Any]:
    """The CycloneDX 1.6 BOM (a JSON-ready dict) describing `image` and `packages`."""
    by_layer: dict[str, list[Package]] = {}
    for pkg in packages:
        by_layer.setdefault(pkg.layer, []).append(pkg)
    base_layers: list[dict[str, Any]] = []
    top: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, layer in enumerate(image.layers):
        if layer.digest in seen:
            continue
        seen.add(layer.digest)
        (base_layers if layer.base else top).append(_layer(i, layer, by_layer.pop(layer.digest, [])))
    # Packages of a layer the image does not list cannot happen with scan_layers; keep them visible.
    stray = [_package(p) for held in by_layer.values() for p in held]
    dependencies = _dependencies(packages)
    if image.base is not None:
        base: dict[str, Any] = {"type": "container", "bom-ref": BASE_REF, "name": image.base.name or "base image"}
        if image.base.digest:
            base["version"] = image.base.digest
            base["hashes"] = _sha256(image.base.digest)
        if base_layers:
            base["components"] = base_layers
        top.append(base)
        dependencies.append({"ref": IMAGE_REF, "dependsOn": [BASE_REF]})
    name = image.name.rsplit("/", 1)[-1] or "image"
    subject = {
        "type": "container",
        "bom-ref": IMAGE_REF,
        "name": image.name,
        "version": image.digest,
        "hashes": _sha256(image.digest),
        "purl": oci_purl(name, image.digest, tag=image.tag),
    }
    return {
        "$schema": SCHEMA,
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{content_uuid('cyclonedx', image.digest)}",
        "version": 1,
        "metadata": {
            "timestamp": image.created,
            "tools": {"components": [{"type": "application", "name": "nsbuild", "version": __version__}]},
            "component": subject,
        },
        "components": sorted(top + stray, key=lambda c: c["bom-ref"]),
        "dependencies": sorted(dependencies, key=lambda d: d["ref"]),
    }


def _dependencies(packages: list[Package]) -> list[dict[str, Any]]:
    refs = {p.path: package_ref(p) for p in packages if p.kind == "nix"}
    out = []
    for pkg in packages:
        if pkg.kind != "nix":
            continue
        needs = sorted({refs[r] for r in pkg.references if r in refs})
        out.append({"ref": package_ref(pkg), "dependsOn": needs} if needs else {"ref": package_ref(pkg)})
    return out
