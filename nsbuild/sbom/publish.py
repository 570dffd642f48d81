"""Where the documents go once made: plain files, the OCI layout the image was written to, the
registry it was pushed to. One call for the build and the CLI (`--sbom`, `--sbom-output`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.errors import BuildError
from nsbuild.sbom.attach import atomic_write, attach_to_layout
from nsbuild.sbom.documents import Documents

if TYPE_CHECKING:  # a type only: nsbuild.registry stays unloaded by builds without a registry
    from nsbuild.registry.options import RegistryOptions


@dataclass(frozen=True)
class PublishTarget:
    """Any of: `files` (format → path: "spdx", "cyclonedx", "provenance"), an OCI `layout` to attach
    the documents to, a `registry` reference (HOST/REPO[:TAG]) of the pushed image to attach them to."""

    files: tuple[tuple[str, Path], ...] = ()
    layout: Path | None = None
    registry: str | None = None
    registry_options: RegistryOptions | None = None


@dataclass(frozen=True)
class Published:
    files: tuple[str, ...]
    layout_referrers: tuple[dict[str, Any], ...]
    registry_referrers: tuple[dict[str, Any], ...]
    registry_mode: str  # "api", "tag" or "" (no registry)


def publish(docs: Documents, target: PublishTarget) -> Published:
    by_kind = {"spdx": docs.spdx, "cyclonedx": docs.cyclonedx, "provenance": docs.provenance}
    written = []
    for kind, path in target.files:
        data = by_kind.get(kind)
        if data is None:
            raise BuildError(f"{path}: no {kind} document was made (see --sbom)")
        try:
            atomic_write(Path(path), data)
        except OSError as exc:
            raise BuildError(f"{path}: cannot write the {kind} document: {exc.strerror}") from None
        written.append(str(path))
    artifacts = docs.artifacts()
    in_layout: list[dict[str, Any]] = []
    if target.layout is not None and artifacts:
        in_layout = attach_to_layout(target.layout, docs.subject, artifacts, docs.image.created)
    in_registry: tuple[dict[str, Any], ...] = ()
    mode = ""
    if target.registry is not None and artifacts:
        from nsbuild.sbom import referrers  # requests only when a registry is the output

        attached = referrers.attach_to_registry(
            target.registry, docs.subject, artifacts, created=docs.image.created, options=target.registry_options
        )
        in_registry, mode = attached.descriptors, attached.mode
    return Published(tuple(written), tuple(in_layout), in_registry, mode)
