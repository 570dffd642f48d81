"""SBOMs (SPDX 2.3, CycloneDX 1.6) and SLSA provenance for images, attached as OCI 1.1 referrers (issue 15).

Every name loads its module on first use: a build that makes no documents (a docker-archive) does not
pay for the document code at start (issue 17), nsbuild.sbom.referrers (registry attachment) needs
requests, and the signing names (nsbuild.sbom.dsse) need cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "EMPTY_CONFIG": "attach",
    "artifact_manifest": "attach",
    "referrer_descriptor": "attach",
    "BASE_DIGEST": "layout",
    "nix_info_from_closure": "nix",
    "packages_from_json": "packages",
    "packages_to_json": "packages",
    "scan_identity": "packages",
    "Artifact": "attach",
    "Subject": "attach",
    "attach_to_layout": "attach",
    "layout_referrers": "attach",
    "Documents": "documents",
    "SbomRequest": "documents",
    "documents_for": "documents",
    "facts_from_image": "documents",
    "facts_from_layers": "documents",
    "make_documents": "documents",
    "render_packages": "documents",
    "scan_packages": "documents",
    "sbom_formats": "formats",
    "BaseFacts": "layout",
    "ImageFacts": "layout",
    "LayerFacts": "layout",
    "Package": "packages",
    "ContentLayer": "provenance",
    "Published": "publish",
    "PublishTarget": "publish",
    "publish": "publish",
    "load_signing_key": "dsse",
    "load_signing_key_file": "dsse",
}

__all__ = [
    "Artifact",
    "BASE_DIGEST",
    "BaseFacts",
    "ContentLayer",
    "Documents",
    "EMPTY_CONFIG",
    "ImageFacts",
    "LayerFacts",
    "Package",
    "PublishTarget",
    "Published",
    "SbomRequest",
    "Subject",
    "artifact_manifest",
    "attach_to_layout",
    "documents_for",
    "facts_from_image",
    "facts_from_layers",
    "layout_referrers",
    "load_signing_key",
    "load_signing_key_file",
    "make_documents",
    "nix_info_from_closure",
    "packages_from_json",
    "packages_to_json",
    "publish",
    "referrer_descriptor",
    "render_packages",
    "sbom_formats",
    "scan_identity",
    "scan_packages",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _WHERE[name]
    module = importlib.import_module(f"nsbuild.sbom.{where}")
    # Importing nsbuild.sbom.publish bound the package's `publish` to that module: every name of the
    # module is bound here now, the function `publish` over the module of the same name.
    globals().update({n: getattr(module, n) for n, w in _WHERE.items() if w == where})
    return getattr(module, name)


if TYPE_CHECKING:
    from nsbuild.sbom.attach import (
        EMPTY_CONFIG,
        Artifact,
        Subject,
        artifact_manifest,
        attach_to_layout,
        layout_referrers,
        referrer_descriptor,
    )
    from nsbuild.sbom.documents import (
        Documents,
        SbomRequest,
        documents_for,
        facts_from_image,
        facts_from_layers,
        make_documents,
        render_packages,
        scan_packages,
    )
    from nsbuild.sbom.dsse import load_signing_key, load_signing_key_file
    from nsbuild.sbom.formats import sbom_formats
    from nsbuild.sbom.layout import BASE_DIGEST, BaseFacts, ImageFacts, LayerFacts
    from nsbuild.sbom.nix import nix_info_from_closure
    from nsbuild.sbom.packages import Package, packages_from_json, packages_to_json, scan_identity
    from nsbuild.sbom.provenance import ContentLayer
    from nsbuild.sbom.publish import Published, PublishTarget, publish
