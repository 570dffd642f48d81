"""Provenance: an in-toto Statement v1 whose predicate is SLSA Provenance v1.

The external parameters are the spec itself (as a JSON object, serialised canonically with the
statement), the resolved dependencies the base image by digest and each content layer's digest with
the path it was made from, the builder nsbuild with its version. Reproducible: without explicit start
and finish times both are the image's `created`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nsbuild import __version__
from nsbuild.image.image import canonical_json

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
MEDIA_IN_TOTO = "application/vnd.in-toto+json"
MEDIA_DSSE = "application/vnd.dsse.envelope.v1+json"  # a signed statement (nsbuild.sbom.dsse)
# A URI naming the build's template, as SLSA asks; nsbuild's own, versioned with the format of
# externalParameters (the spec), not with nsbuild.
BUILD_TYPE = "urn:nsbuild:build-type:layered:v1"
DEFAULT_BUILDER_ID = "urn:nsbuild:builder:local"


@dataclass(frozen=True)
class ContentLayer:
    """One layer the build made from a source: the path (or "customisation", "store paths"), the
    layer's blob digest and media type, its diff_id."""

    source: str
    digest: str
    media_type: str = ""
    diff_id: str = ""


@dataclass(frozen=True)
class ProvenanceInput:
    """What the build knows: the image (name and manifest digest), the spec as parsed JSON, the base
    image (reference as written and manifest digest, or none), the content layers, the builder."""

    image_name: str
    manifest_digest: str
    created: str
    spec: Mapping[str, Any]
    layers: Sequence[ContentLayer] = ()
    base_ref: str = ""
    base_digest: str = ""
    command: str = "layered"
    builder_id: str = DEFAULT_BUILDER_ID
    build_type: str = BUILD_TYPE
    started_on: str = ""  # "" = created (reproducible)
    finished_on: str = ""


def _digest(digest: str) -> dict[str, str]:
    algo, _, value = digest.partition(":")
    return {algo: value}


def resolved_dependencies(inp: ProvenanceInput) -> list[dict[str, Any]]:
    deps: list[dict[str, Any]] = []
    if inp.base_ref or inp.base_digest:
        base: dict[str, Any] = {"name": "fromImage"}
        if inp.base_ref:
            base["uri"] = inp.base_ref
        if inp.base_digest:
            base["digest"] = _digest(inp.base_digest)
        deps.append(base)
    for layer in inp.layers:
        dep: dict[str, Any] = {"name": layer.source, "digest": _digest(layer.digest)}
        if layer.media_type:
            dep["mediaType"] = layer.media_type
        if layer.diff_id:
            dep["annotations"] = {"diffID": layer.diff_id}
        deps.append(dep)
    return deps


def provenance_statement(inp: ProvenanceInput) -> dict[str, Any]:
    """The in-toto Statement (a JSON-ready dict)."""
    # The spec through a JSON round trip: what is recorded is exactly what canonical JSON can carry.
    spec = json.loads(canonical_json(dict(inp.spec)))
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": inp.image_name, "digest": _digest(inp.manifest_digest)}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": inp.build_type,
                "externalParameters": {"command": inp.command, "spec": spec},
                "resolvedDependencies": resolved_dependencies(inp),
            },
            "runDetails": {
                "builder": {"id": inp.builder_id, "version": {"nsbuild": __version__}},
                "metadata": {
                    "startedOn": inp.started_on or inp.created,
                    "finishedOn": inp.finished_on or inp.created,
                },
            },
        },
    }


def statement_bytes(statement: Mapping[str, Any]) -> bytes:
    """The statement as it is stored and signed: canonical JSON (sorted keys, no whitespace)."""
    return canonical_json(dict(statement))
