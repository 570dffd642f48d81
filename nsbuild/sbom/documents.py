"""One entry point: an image (an OCI layout, or the build's own values) → its SBOMs and provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.errors import UsageError
from nsbuild.image.image import Image, oci_manifest
from nsbuild.layer.layer import Layer
from nsbuild.sbom.attach import Artifact, Subject, subject_of
from nsbuild.sbom.cyclonedx import cyclonedx_document
from nsbuild.sbom.formats import FORMATS
from nsbuild.sbom.layout import BaseFacts, ImageFacts, LayerFacts, read_layout, with_base
from nsbuild.sbom.packages import DEFAULT_STORE_DIR, LayerBlob, Package, scan_layers
from nsbuild.sbom.provenance import (
    DEFAULT_BUILDER_ID,
    MEDIA_DSSE,
    MEDIA_IN_TOTO,
    ContentLayer,
    ProvenanceInput,
    provenance_statement,
    statement_bytes,
)
from nsbuild.sbom.spdx import spdx_document

if TYPE_CHECKING:  # cryptography is imported only by whoever loads a signing key
    from nsbuild.sbom.dsse import SigningKey

MEDIA_SPDX = "application/spdx+json"
MEDIA_CYCLONEDX = "application/vnd.cyclonedx+json"


@dataclass(frozen=True)
class SbomRequest:
    """What to make. `formats`: see sbom_formats. `store_dir`: the spec's storeDir. `nix_info`: {store
    path: {"narHash", "references"}} when the build knows them (else the image's Nix database is read).
    `base`: the base image when the caller knows it better than the layout. `spec` (parsed spec.json):
    with it, a provenance statement is made too, with `content_layers` (default: the image's own
    layers, named by their history comments), `base_ref`, `builder_id` and `command`; `sign_key`
    wraps it in a signed DSSE envelope. `name`: the image's repository (default: the spec's name, else
    the layout directory's)."""

    formats: tuple[str, ...] = FORMATS
    store_dir: str = DEFAULT_STORE_DIR
    nix_info: Mapping[str, Mapping[str, Any]] | None = None
    base: BaseFacts | None = None
    spec: Mapping[str, Any] | None = None
    content_layers: Sequence[ContentLayer] | None = None
    base_ref: str = ""
    builder_id: str = DEFAULT_BUILDER_ID
    command: str = "layered"
    sign_key: SigningKey | None = None
    work_dir: Path | None = None
    name: str = ""


@dataclass(frozen=True)
class Documents:
    """The image described and the documents (bytes, None when not asked for)."""

    image: ImageFacts
    packages: tuple[Package, ...]
    spdx: bytes | None = None
    cyclonedx: bytes | None = None
    provenance: bytes | None = None  # an in-toto statement, or a DSSE envelope of one when signed
    provenance_signed: bool = False

    @property
    def subject(self) -> Subject:
        return subject_of(self.image.manifest, self.image.media_type or "application/vnd.oci.image.manifest.v1+json")

    def artifacts(self) -> list[Artifact]:
        """The documents as artifacts to attach (nsbuild.sbom.attach / nsbuild.sbom.referrers)."""
        out = []
        if self.spdx is not None:
            out.append(Artifact(MEDIA_SPDX, "sbom.spdx.json", self.spdx))
        if self.cyclonedx is not None:
            out.append(Artifact(MEDIA_CYCLONEDX, "sbom.cdx.json", self.cyclonedx))
        if self.provenance is not None:
            kind = MEDIA_DSSE if self.provenance_signed else MEDIA_IN_TOTO
            out.append(Artifact(kind, "provenance.intoto.json", self.provenance))
        return out


def document_bytes(doc: Mapping[str, Any]) -> bytes:
    """An SBOM as written: sorted keys, two-space indent, UTF-8, a final newline."""
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


def make_documents(image_dir_or_layout: Path, request: SbomRequest | None = None, tag: str | None = None) -> Documents:
    """The documents of the image in the OCI layout `image_dir_or_layout` (the one tagged `tag`, or
    the only image there)."""
    request = request or SbomRequest()
    name = request.name or str((request.spec or {}).get("name") or "")
    facts = read_layout(Path(image_dir_or_layout), tag, name)
    if request.base is not None:
        facts = with_base(facts, request.base)
    return documents_for(facts, request)


def facts_from_image(image: Image, sources: Sequence[str] = (), base: BaseFacts | None = None) -> ImageFacts:
    """The build's own Image value as ImageFacts (its layers' tars read where the build left them);
    `sources[i]`: what layer i was made from (default: its comment)."""
    layers = []
    for i, layer in enumerate(image.layers):
        blob = layer.tar if layer.tar.path is not None else layer.compressed
        source = sources[i] if i < len(sources) else layer.comment
        layers.append(
            LayerFacts(
                layer.digest,
                layer.diff_id,
                layer.media_type,
                layer.size,
                blob.path,
                source,
                bool(base and i < base.layers),
            )
        )
    manifest = json.loads(image.manifest)
    annotations = {str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()}
    config = json.loads(image.config)
    media = str(manifest.get("mediaType") or "application/vnd.oci.image.manifest.v1+json")
    return ImageFacts(image.name, image.tag, image.manifest, media, config, tuple(layers), base, annotations)


def facts_from_layers(
    name: str, tag: str, config: bytes, layers: Sequence[Layer], base: BaseFacts | None = None
) -> ImageFacts:
    """An image read some other way (a docker-archive or OCI archive through nsbuild.sources, whose
    Layer values keep their tars on disk) as ImageFacts. Its subject is the OCI manifest of these
    blobs (what an OCI output of the same image would carry): a docker-archive has no manifest digest."""
    manifest = oci_manifest(config, list(layers))
    image = Image(name=name, tag=tag, layers=list(layers), config=config, manifest=manifest)
    return facts_from_image(image, base=base)


def scan_packages(facts: ImageFacts, request: SbomRequest) -> list[Package]:
    """The packages of the image, read from its layers on disk (none when no SBOM format is asked for)."""
    if not request.formats:
        return []
    blobs = []
    for layer in facts.layers:
        if layer.path is None:
            raise UsageError(f"layer {layer.digest} is not on disk: its packages cannot be read")
        blobs.append(LayerBlob(layer.digest, layer.path))
    return scan_layers(blobs, store_dir=request.store_dir, nix_info=request.nix_info, work_dir=request.work_dir)


def documents_for(facts: ImageFacts, request: SbomRequest, packages: Sequence[Package] | None = None) -> Documents:
    """The documents of an image given as ImageFacts (see facts_from_image, read_layout); `packages`:
    its scan_packages result when the caller has it already (remembered by the cache)."""
    for kind in request.formats:
        if kind not in FORMATS:
            raise UsageError(f"unknown SBOM format {kind!r} (spdx or cyclonedx)")
    packages = list(packages) if packages is not None else scan_packages(facts, request)
    spdx = document_bytes(spdx_document(facts, packages)) if "spdx" in request.formats else None
    cdx = document_bytes(cyclonedx_document(facts, packages)) if "cyclonedx" in request.formats else None
    provenance = None
    if request.spec is not None:
        statement = statement_bytes(provenance_statement(provenance_input(facts, request)))
        if request.sign_key is not None:
            provenance = json.dumps(request.sign_key.envelope(statement), sort_keys=True).encode()
        else:
            provenance = statement
    return Documents(
        facts, tuple(packages), spdx, cdx, provenance, request.sign_key is not None and provenance is not None
    )


def provenance_input(facts: ImageFacts, request: SbomRequest) -> ProvenanceInput:
    layers = request.content_layers
    if layers is None:
        layers = [
            ContentLayer(lay.source, lay.digest, lay.media_type, lay.diff_id) for lay in facts.layers if not lay.base
        ]
    base = facts.base
    return ProvenanceInput(
        image_name=facts.name,
        manifest_digest=facts.digest,
        created=facts.created,
        spec=request.spec or {},
        layers=tuple(layers),
        base_ref=request.base_ref or (base.name if base else ""),
        base_digest=base.digest if base else "",
        command=request.command,
        builder_id=request.builder_id,
    )


def render_packages(docs: Documents) -> str:
    """`nsbuild inspect IMAGE --sbom`: the packages, layer by layer."""
    lines = []
    for i, layer in enumerate(docs.image.layers):
        held = [p for p in docs.packages if p.layer == layer.digest]
        what = f" ({layer.source})" if layer.source else ""
        lines.append(f"layer {i} {layer.digest}{what}: {len(held)} package{'s' if len(held) != 1 else ''}")
        for p in held:
            lines.append(f"  {p.kind:<5} {p.name} {p.version}".rstrip() + f"  {p.purl}")
    return "\n".join(lines) + "\n"
