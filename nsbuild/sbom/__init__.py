"""SBOMs (SPDX 2.3, CycloneDX 1.6) and SLSA provenance for images, attached as OCI 1.1 referrers (issue 15).

nsbuild.sbom.referrers (registry attachment) is not imported here: it needs requests. The signing
names (nsbuild.sbom.dsse, which needs cryptography) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nsbuild.sbom.attach import Artifact, Subject, attach_to_layout, layout_referrers
from nsbuild.sbom.documents import (
    Documents,
    SbomRequest,
    documents_for,
    facts_from_image,
    facts_from_layers,
    make_documents,
    render_packages,
    sbom_formats,
    scan_packages,
)
from nsbuild.sbom.layout import BaseFacts, ImageFacts, LayerFacts
from nsbuild.sbom.packages import Package
from nsbuild.sbom.provenance import ContentLayer
from nsbuild.sbom.publish import Published, PublishTarget, publish

__all__ = [
    "Artifact",
    "BaseFacts",
    "ContentLayer",
    "Documents",
    "ImageFacts",
    "LayerFacts",
    "Package",
    "PublishTarget",
    "Published",
    "SbomRequest",
    "Subject",
    "attach_to_layout",
    "documents_for",
    "facts_from_image",
    "facts_from_layers",
    "layout_referrers",
    "load_signing_key",
    "load_signing_key_file",
    "make_documents",
    "publish",
    "render_packages",
    "sbom_formats",
    "scan_packages",
]

_DSSE = ("load_signing_key", "load_signing_key_file")


def __getattr__(name: str) -> Any:
    if name in _DSSE:
        return getattr(importlib.import_module("nsbuild.sbom.dsse"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from nsbuild.sbom.dsse import load_signing_key, load_signing_key_file
