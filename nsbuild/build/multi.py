"""`nsbuild index`: one image per spec (each its own architecture and variant), built by the ordinary
pipeline into a private OCI layout each (SBOMs and provenance attached there as for a single image),
then one image index over them — an OCI image index, or a Docker manifest list of Docker v2 schema 2
manifests — written to an OCI layout, an OCI archive or a registry."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.build.build import build_image
from nsbuild.build.context import BuildOptions, BuildResult, Workspace
from nsbuild.core.progress import Progress
from nsbuild.core.refs import ImageRef
from nsbuild.errors import NsbuildError, UsageError
from nsbuild.image.image import MEDIA_DOCKER_MANIFEST, MEDIA_OCI_MANIFEST, docker_manifest, sha256_digest
from nsbuild.image.index import (
    INDEX_OF_MANIFEST,
    MEDIA_DOCKER_LIST,
    Attached,
    BlobFile,
    ImageIndex,
    Platform,
    PlatformManifest,
    duplicate_platform,
)
from nsbuild.sinks.indexsink import write_index_archive, write_index_dir
from nsbuild.sinks.sinks import check_destination, check_ref_name
from nsbuild.spec.spec import Spec

if TYPE_CHECKING:
    from nsbuild.sinks.indexpush import IndexPush

OUTPUTS = ("oci-dir", "oci-archive", "registry")


@dataclass(frozen=True)
class IndexRequest:
    specs: tuple[Spec, ...]
    output: ImageRef
    manifest_format: str = "oci"  # oci: OCI image index | docker: Docker manifest list
    tag: str | None = None  # --tag (else the output's, the first spec's, or the index's digest)
    # --annotation K=V: on the OCI image index itself (each platform's manifest has them from its spec)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexResult:
    index: ImageIndex
    output: str
    tag: str
    builds: tuple[BuildResult, ...]
    push: IndexPush | None = None
    sbom_modes: tuple[str, ...] = ()  # per platform, a registry output: how its referrers are found

    def to_json(self, specs: tuple[Spec, ...]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "output": self.output,
            "mediaType": self.index.media_type,
            "digest": self.push.index.digest if self.push else self.index.digest,
            "tag": self.tag,
            "platforms": [
                {
                    "platform": m.platform.name,
                    **m.platform.as_json(),
                    "digest": m.digest,
                    "mediaType": m.media_type,
                    "config_digest": m.blobs[0].digest,
                    "spec": str(spec.spec_path),
                    "referrers": [r.descriptor["digest"] for r in m.referrers],
                    "sbom_files": (build.sbom or {}).get("files", []),
                }
                for m, spec, build in zip(self.index.manifests, specs, self.builds, strict=True)
            ],
        }
        if self.index.annotations and self.index.media_type != MEDIA_DOCKER_LIST:
            doc["annotations"] = dict(sorted(self.index.annotations.items()))
        if self.push is not None:
            doc["push"] = {"reference": self.push.index.reference, "digest": self.push.index.digest}
            doc["push"]["uploaded"] = sum(len(p.uploaded_blobs) for p in self.push.platforms)
            doc["push"]["skipped"] = sum(len(p.skipped_blobs) for p in self.push.platforms)
        return doc


def platform_of(spec: Spec) -> Platform:
    return Platform("linux", spec.architecture, spec.variant)


def check_request(req: IndexRequest) -> None:
    """Everything refused before a layer is built: an output that holds one image, a platform given
    twice, a Docker list of zstd layers."""
    out = req.output
    if out.format == "auto":
        raise UsageError(
            f"-o {out.location}: name the transport: oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker://HOST/REPO[:TAG]"
        )
    if out.format not in OUTPUTS or out.location == "-":
        raise UsageError(
            f"-o: an index goes to oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker://HOST/REPO[:TAG]; "
            f"{out.format} holds one image (build each platform with nsbuild layered)"
        )
    if not req.specs:
        raise UsageError("SPEC: give one spec per platform")
    if (dup := duplicate_platform([platform_of(s) for s in req.specs])) is not None:
        paths = [str(s.spec_path) for s in req.specs if _same(platform_of(s), dup)]
        raise UsageError(
            f"platform {dup.name} is given twice ({', '.join(paths)}); set architecture/variant in each spec"
        )
    if req.manifest_format == "docker":
        for spec in req.specs:
            if spec.compressor == "zstd":
                raise UsageError(
                    f"{spec.spec_path}: compressor zstd: a Docker manifest list's images have no zstd "
                    "layer type; use gz (or none), or --manifest-format oci"
                )
    if req.tag is not None:
        check_ref_name(req.tag)
    if out.format != "registry":
        check_destination(out.format, out.path, tag=out.tag)


def _same(a: Platform, b: Platform) -> bool:
    return duplicate_platform([a, b]) is not None


def index_tag(req: IndexRequest) -> str | None:
    """The tag the index is written under, when known before building (see IndexRequest.tag)."""
    if req.tag is not None:
        return req.tag
    if req.output.format == "registry":
        from nsbuild.registry.usage import has_explicit_tag, registry_reference

        text = "docker://" + req.output.location
        if has_explicit_tag(text):
            return registry_reference(text, "-o").tag
        return req.specs[0].tag
    return req.output.tag or req.specs[0].tag


def build_index(req: IndexRequest, progress: Progress, options: BuildOptions) -> IndexResult:
    check_request(req)
    if req.output.format == "registry":
        from nsbuild.sinks import push as push_sink

        push_sink.preflight("docker://" + req.output.location, "-o", options.registry)
    tag = index_tag(req)
    if req.manifest_format == "docker" and req.output.format != "registry":
        progress.warn(
            "a Docker manifest list in an OCI layout is read by crane and nsbuild, not by skopeo or podman "
            "(they look for OCI types in index.json); push it (nsbuild push) or use --manifest-format oci"
        )
    if req.manifest_format == "docker" and req.annotations:
        progress.warn(
            "--annotation: a Docker manifest list and its Docker v2 manifests have no annotations; "
            "none are written (use --manifest-format oci to keep them)"
        )
    ws = Workspace()
    try:
        if options.cache_dir is None:
            # --no-cache: none is used or kept, but the platforms' common layers are built once, not
            # once per platform (a cache private to this command, removed with its workspace).
            options = dataclasses.replace(options, cache_dir=ws.path("cache"))
        built = [_build_platform(req, i, tag, progress, options, ws) for i in range(len(req.specs))]
        media = INDEX_OF_MANIFEST[MEDIA_DOCKER_MANIFEST if req.manifest_format == "docker" else MEDIA_OCI_MANIFEST]
        index = ImageIndex(tuple(m for m, _ in built), media_type=media, annotations=dict(req.annotations))
        tag = tag or hashlib.sha256(index.data).hexdigest()[:32]
        return _write(req, index, tag, tuple(b for _, b in built), progress, options)
    finally:
        ws.close()


def _build_platform(
    req: IndexRequest, i: int, tag: str | None, progress: Progress, options: BuildOptions, ws: Workspace
) -> tuple[PlatformManifest, BuildResult]:
    spec, n = req.specs[i], len(req.specs)
    platform = platform_of(spec)
    progress.info(f"[platform {i + 1}/{n}] building {platform.name} from {spec.spec_path}")
    layout = ws.root / f"platform-{i}"
    sbom = options.sbom
    if sbom is None:  # the default of a single image written to the same output
        sbom = "both" if req.output.format in ("oci-dir", "registry") or options.sbom_output else "none"
    opts = dataclasses.replace(
        options,
        sbom=sbom,
        sbom_output=platform_sbom_output(options.sbom_output, platform),
        docker_layout=req.manifest_format == "docker",
        manifest_format="oci",
    )
    result = build_image(spec, ImageRef("oci-dir", str(layout), tag=tag), progress, opts)
    image = result.image
    manifest = docker_manifest(image) if req.manifest_format == "docker" else image.manifest
    media = MEDIA_DOCKER_MANIFEST if req.manifest_format == "docker" else MEDIA_OCI_MANIFEST
    blob_dir = layout / "blobs" / "sha256"
    blobs = {image.config_digest: BlobFile(image.config_digest, len(image.config), data=image.config)}
    for layer in image.layers:
        blobs.setdefault(layer.digest, BlobFile(layer.digest, layer.size, path=blob_dir / layer.digest[7:]))
    referrers = _referrers(layout, sha256_digest(manifest))
    return PlatformManifest(platform, manifest, media, tuple(blobs.values()), referrers), result


def platform_sbom_output(path: Path | None, platform: Platform) -> Path | None:
    """--sbom-output FILE of an index: one file (or pair, as for a single image) per platform, the
    platform after FILE's stem: sbom.json → sbom.linux-arm-v7.json (→ .spdx.json and .cdx.json)."""
    if path is None:
        return None
    slug = platform.name.replace("/", "-")
    if path.name.endswith(".json") and path.name != ".json":
        return path.with_name(f"{path.name.removesuffix('.json')}.{slug}.json")
    return path.with_name(f"{path.name}.{slug}")


def _referrers(layout: Path, digest: str) -> tuple[Attached, ...]:
    """The artifacts the build attached in its private layout to the manifest `digest`."""
    blob_dir = layout / "blobs" / "sha256"
    out = []
    for entry in json.loads((layout / "index.json").read_bytes())["manifests"]:
        if "artifactType" not in entry:
            continue
        manifest = (blob_dir / entry["digest"][7:]).read_bytes()
        doc = json.loads(manifest)
        if (doc.get("subject") or {}).get("digest") != digest:
            continue
        parts = [(blob_dir / d["digest"][7:]).read_bytes() for d in [doc["config"], *doc["layers"]]]
        out.append(Attached(entry, (manifest, *parts)))
    return tuple(out)


def _write(
    req: IndexRequest,
    index: ImageIndex,
    tag: str,
    builds: tuple[BuildResult, ...],
    progress: Progress,
    options: BuildOptions,
) -> IndexResult:
    out = req.output
    if out.format == "oci-dir":
        write_index_dir(index, out.path, tag=tag)
    elif out.format == "oci-archive":
        with_sbom = options.sbom not in (None, "none")  # as for one image: referrers only when asked
        kept = index if with_sbom else _without_referrers(index)
        write_index_archive(kept, out.path, ref=tag, mtime=req.specs[0].mtime)
        index = kept
    else:
        return _push(req, index, tag, builds, progress, options)
    progress.info(f"wrote {out.location} ({out.format}) {tag}: index {index.digest}, {len(index.manifests)} platforms")
    return IndexResult(index, str(out.path), tag, builds)


def _without_referrers(index: ImageIndex) -> ImageIndex:
    return dataclasses.replace(index, manifests=tuple(dataclasses.replace(m, referrers=()) for m in index.manifests))


def _push(
    req: IndexRequest,
    index: ImageIndex,
    tag: str,
    builds: tuple[BuildResult, ...],
    progress: Progress,
    options: BuildOptions,
) -> IndexResult:
    from nsbuild.cache.shared import blob_record
    from nsbuild.registry.usage import registry_reference
    from nsbuild.sinks.indexpush import push_index, push_referrers

    target = registry_reference("docker://" + req.output.location, "-o").with_tag(tag)
    pushed = push_index(
        index, target, options=options.registry, progress=progress, blob_record=blob_record(options.cache_dir)
    )
    modes = []
    for m in index.manifests:
        try:
            modes.append(push_referrers(m, target, options.registry))
        except NsbuildError as exc:
            if options.sbom is not None:
                raise
            progress.warn(f"{m.platform.name} is pushed, its SBOM and provenance are not (--sbom none: none): {exc}")
            modes.append("")
    return IndexResult(index, f"docker://{pushed.index.reference}", tag, builds, pushed, tuple(modes))
