"""SPDX 2.3 JSON: the image, its base, its layers and the packages each layer holds.

Reproducible: the creation time is the image's `created`, every identifier is derived from content
(the namespace from the manifest digest, package ids from what the package is and where it lies),
lists are sorted and the JSON has sorted keys.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from nsbuild import __version__
from nsbuild.sbom.layout import ImageFacts, LayerFacts
from nsbuild.sbom.packages import Package
from nsbuild.sbom.purl import oci_purl

NOASSERTION = "NOASSERTION"
# uuid5 namespace of the identifiers nsbuild derives (itself a uuid5 of a fixed name: stable forever)
NSBUILD_UUID_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:nsbuild:sbom")


def content_uuid(*parts: str) -> uuid.UUID:
    return uuid.uuid5(NSBUILD_UUID_NS, "\0".join(parts))


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def package_id(pkg: Package) -> str:
    return f"SPDXRef-Package-{pkg.kind}-{short_hash(*pkg.sort_key)}"


def layer_id(layer: LayerFacts) -> str:
    return f"SPDXRef-Layer-{layer.digest.split(':', 1)[-1][:16]}"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1]


def _base_package(
    spdxid: str, name: str, purpose: str, *, version: str = "", digest: str = "", purl: str = ""
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "SPDXID": spdxid,
        "name": name,
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": False,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "primaryPackagePurpose": purpose,
    }
    if version:
        doc["versionInfo"] = version
    if digest:
        doc["checksums"] = [{"algorithm": "SHA256", "checksumValue": _hex(digest)}]
    if purl:
        doc["externalRefs"] = [
            {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": purl}
        ]
    return doc


def _layer_package(index: int, layer: LayerFacts) -> dict[str, Any]:
    doc = _base_package(layer_id(layer), f"layer {index}", "ARCHIVE", version=layer.digest, digest=layer.digest)
    notes = [f"diff_id {layer.diff_id}", f"media type {layer.media_type}"]
    if layer.source:
        notes.append(f"made from {layer.source}")
    doc["comment"] = "; ".join(notes)
    return doc


def _package(pkg: Package) -> dict[str, Any]:
    doc = _base_package(package_id(pkg), pkg.name, "LIBRARY", version=pkg.version, purl=pkg.purl)
    doc["sourceInfo"] = f"{pkg.path} in layer {pkg.layer}"
    if pkg.nar_hash:
        doc["checksums"] = [{"algorithm": "SHA256", "checksumValue": pkg.nar_hash}]
        doc["comment"] = "checksum: the store path's NAR hash"
    return doc


def spdx_document(image: ImageFacts, packages: list[Package]) -> dict[str, Any]:
    """The SPDX 2.3 document (a JSON-ready dict) describing `image` and `packages`."""
    image_name = image.name.rsplit("/", 1)[-1] or "image"
    packages_doc = [
        _base_package(
            "SPDXRef-Image",
            image.name,
            "CONTAINER",
            version=image.digest,
            digest=image.digest,
            purl=oci_purl(image_name, image.digest, tag=image.tag),
        )
    ]
    rels = [("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Image")]
    by_digest: dict[str, str] = {}
    for i, layer in enumerate(image.layers):
        packages_doc.append(_layer_package(i, layer))
        by_digest.setdefault(layer.digest, layer_id(layer))
        rels.append(("SPDXRef-Image", "CONTAINS", layer_id(layer)))
    if image.base is not None:
        base = image.base
        packages_doc.append(
            _base_package(
                "SPDXRef-BaseImage", base.name or "base image", "CONTAINER", version=base.digest, digest=base.digest
            )
        )
        rels.append(("SPDXRef-Image", "DESCENDANT_OF", "SPDXRef-BaseImage"))
        rels += [("SPDXRef-BaseImage", "CONTAINS", layer_id(lay)) for lay in image.layers if lay.base]
    ids = {pkg.path: package_id(pkg) for pkg in packages if pkg.kind == "nix"}
    for pkg in packages:
        packages_doc.append(_package(pkg))
        rels.append((by_digest.get(pkg.layer, "SPDXRef-Image"), "CONTAINS", package_id(pkg)))
        rels += [(package_id(pkg), "DEPENDS_ON", ids[ref]) for ref in pkg.references if ref in ids]
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image.name}:{image.tag}" if image.tag else f"{image.name}@{image.digest}",
        "documentNamespace": f"urn:uuid:{content_uuid('spdx', image.digest)}",
        "creationInfo": {"created": image.created, "creators": [f"Tool: nsbuild-{__version__}"]},
        "packages": sorted(_unique(packages_doc), key=lambda p: p["SPDXID"]),
        "relationships": [
            {"spdxElementId": a, "relationshipType": kind, "relatedSpdxElement": b} for a, kind, b in sorted(set(rels))
        ],
    }


def _unique(packages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per SPDXID (an image may hold the same layer twice)."""
    seen: dict[str, dict[str, Any]] = {}
    for p in packages:
        seen.setdefault(p["SPDXID"], p)
    return list(seen.values())
