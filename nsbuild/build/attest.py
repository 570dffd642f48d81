"""SBOMs and provenance of the image a build made (issue 15): which documents, made from what the
build knows, and where they go: beside the image in an OCI layout or archive, to the registry the
image was pushed to, to plain files (`--sbom-output`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild import sbom  # its names load their modules on first use: only builds that make documents
from nsbuild.build.context import BuildContext
from nsbuild.cache.scans import PackageScans
from nsbuild.errors import BuildError, NsbuildError, UsageError
from nsbuild.image.image import Image, docker_manifest
from nsbuild.layer.layer import check_blobs
from nsbuild.plan.store import StorePath
from nsbuild.sbom.formats import sbom_formats
from nsbuild.sinks.sinks import Referrer
from nsbuild.sources.baseimage import BaseImage

if TYPE_CHECKING:
    from nsbuild.build.steps import Written
    from nsbuild.sbom import Documents, ImageFacts, Package, SbomRequest

# Outputs the documents are attached to by default (unless --sbom none). An OCI archive only with an
# explicit --sbom: `podman load` of an archive whose index.json lists referrers beside the image fails
# ("more than one image in oci, choose an image", Debian 12's podman), and it cannot be told which.
ATTACHED = ("oci-dir", "registry")
SUFFIXES = {"spdx": ".spdx.json", "cyclonedx": ".cdx.json"}


def formats(ctx: BuildContext) -> tuple[str, ...]:
    """--sbom, or its default: both formats where the documents are attached (oci:DIR, docker://)
    or a file is asked for (--sbom-output), none for an archive, stdout or --load."""
    choice = ctx.options.sbom
    if choice is None:
        choice = "both" if attached(ctx) or ctx.options.sbom_output is not None else "none"
    return sbom_formats(choice)


def attached(ctx: BuildContext) -> bool:
    return ctx.output.format in ATTACHED and ctx.output.location != "-"


def wanted(ctx: BuildContext) -> bool:
    """Whether this build makes documents (and so must keep every layer's blob on disk to read it)."""
    return bool(formats(ctx))


def output_files(ctx: BuildContext) -> tuple[tuple[str, Path], ...]:
    """--sbom-output FILE: FILE itself for one format; for both FILE.spdx.json and FILE.cdx.json
    (a FILE named *.json loses that suffix first: sbom.json → sbom.spdx.json, sbom.cdx.json)."""
    path, kinds = ctx.options.sbom_output, formats(ctx)
    if path is None:
        return ()
    if len(kinds) == 1:
        return ((kinds[0], path),)
    stem = path.name.removesuffix(".json") or path.name
    return tuple((kind, path.with_name(stem + SUFFIXES[kind])) for kind in kinds)


def check(ctx: BuildContext) -> None:
    """Option combinations refused before anything is built."""
    if ctx.options.sbom_output is not None and not formats(ctx):
        raise UsageError("--sbom-output: no SBOM is made with --sbom none")
    if ctx.options.sign_key is not None and not formats(ctx):
        raise UsageError("--sign-key signs the provenance made with the SBOM: not with --sbom none")
    if ctx.options.sign_key is not None:
        _signing_key(ctx)  # unreadable or unusable: said now, not after the build


@dataclass(frozen=True)
class Known:
    """What the build knows of the image besides the Image value: its base (and the annotations that
    name it), how many of its layers are the base's, and the store closure (layered builds)."""

    base: BaseImage | None = None
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    base_layers: int = 0
    closure: Mapping[str, StorePath] | None = None


def documents(ctx: BuildContext, image: Image, known: Known) -> Documents | None:
    """The SBOMs (--sbom) and the provenance of `image`, as the output will name it; None: none asked."""
    kinds = formats(ctx)
    if not kinds:
        return None
    spec = ctx.spec
    docker_registry = ctx.output.format == "registry" and ctx.options.manifest_format == "docker"
    if docker_registry or (ctx.output.format == "oci-dir" and ctx.options.docker_layout):
        try:  # the subject is the manifest the registry holds
            image = dataclasses.replace(image, manifest=docker_manifest(image))
        except ValueError as exc:
            raise BuildError(f"cannot push a Docker v2 manifest: {exc}") from None
    base = None
    if spec.from_image:
        digest = known.annotations.get(sbom.BASE_DIGEST) or (known.base.manifest_digest if known.base else "")
        base = sbom.BaseFacts(spec.from_image, digest, known.base_layers)
    nix_info = sbom.nix_info_from_closure(known.closure, spec.store_dir) if known.closure else None
    request = sbom.SbomRequest(
        formats=kinds,
        store_dir=spec.store_dir,
        nix_info=nix_info,
        base=base,
        spec=spec.raw,
        base_ref=spec.from_image or "",
        command="image" if spec.kind == "image" else "layered",
        sign_key=_signing_key(ctx) if ctx.options.sign_key is not None else None,
        work_dir=ctx.ws.path("sbom"),
        name=spec.name,
    )
    ctx.progress.info(f"making the SBOM ({', '.join(kinds)}) and provenance")
    facts = sbom.facts_from_image(image, base=base)
    return sbom.documents_for(facts, request, _packages(ctx, image, facts, request))


def _packages(ctx: BuildContext, image: Image, facts: ImageFacts, request: SbomRequest) -> Sequence[Package]:
    """The image's packages: remembered by the layer cache for exactly these layers (a rebuild of an
    unchanged image reads none of them), else scanned and remembered."""
    digests = [layer.digest for layer in image.layers]
    scans = PackageScans(ctx.options.cache_dir) if ctx.options.cache_dir is not None else None
    identity = sbom.scan_identity(digests, request.store_dir, request.nix_info)
    if scans is not None and (known := scans.get(identity, digests)) is not None:
        return known
    check_blobs([layer.compressed for layer in image.layers])  # no byte is read before its digest is checked
    packages = sbom.scan_packages(facts, request)
    if scans is not None:
        scans.put(identity, packages)
    return packages


def _signing_key(ctx: BuildContext) -> Any:
    assert ctx.options.sign_key is not None
    return sbom.load_signing_key_file(ctx.options.sign_key)  # loads cryptography: only when signing


def referrers(ctx: BuildContext, docs: Documents | None) -> tuple[Referrer, ...]:
    """The documents as OCI 1.1 referrers of the image, for an OCI layout, or an OCI archive when
    --sbom says so (see ATTACHED)."""
    if docs is None or ctx.output.format not in ("oci-dir", "oci-archive"):
        return ()
    if ctx.output.format == "oci-archive" and ctx.options.sbom is None:
        return ()
    out = []
    for artifact in docs.artifacts():
        manifest = sbom.artifact_manifest(artifact, docs.subject, docs.image.created)
        out.append(Referrer(sbom.referrer_descriptor(artifact, manifest), (manifest, sbom.EMPTY_CONFIG, artifact.data)))
    return tuple(out)


def finish(ctx: BuildContext, docs: Documents | None, written: Written) -> dict[str, Any] | None:
    """After the image is written: the --sbom-output files, the referrers in the registry pushed to;
    what --json reports under "sbom"."""
    if docs is None:
        return None
    files = sbom.publish(docs, sbom.PublishTarget(files=output_files(ctx))).files
    mode, error = "", None
    if ctx.output.format == "registry" and written.push is not None:
        try:
            mode = _to_registry(ctx, docs, written.push.reference)
        except NsbuildError as exc:
            if ctx.options.sbom is not None:
                raise
            # On by default: a registry that takes the image but not its artifacts keeps the push.
            error = str(exc)
            ctx.progress.warn(f"the image is pushed, its SBOM and provenance are not (--sbom none: none): {exc}")
    return {
        "subject": docs.subject.digest,
        "formats": [kind for kind in ("spdx", "cyclonedx") if getattr(docs, kind) is not None],
        "files": list(files),
        "packages": len(docs.packages),
        "attestations": [
            {"artifactType": a.media_type, "digest": _manifest_digest(docs, a), "document": a.digest}
            for a in docs.artifacts()
        ],
        "registry_mode": mode or None,
        **({"registry_error": error} if error else {}),
    }


def _to_registry(ctx: BuildContext, docs: Documents, reference: str) -> str:
    published = sbom.publish(docs, sbom.PublishTarget(registry=reference, registry_options=ctx.options.registry))
    how = "the referrers API" if published.registry_mode == "api" else "the referrers tag"
    ctx.progress.info(f"attached {len(published.registry_referrers)} referrers to {reference} ({how})")
    return published.registry_mode


def _manifest_digest(docs: Documents, artifact: Any) -> str:
    manifest = sbom.artifact_manifest(artifact, docs.subject, docs.image.created)
    return str(sbom.referrer_descriptor(artifact, manifest)["digest"])
