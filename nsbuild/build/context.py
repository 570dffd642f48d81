"""The values every build module shares: options in, result out, and the private workspace."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.core.progress import Progress
from nsbuild.core.refs import ImageRef
from nsbuild.image.image import Image
from nsbuild.sandbox import sweep
from nsbuild.spec.spec import Spec

if TYPE_CHECKING:
    from nsbuild.registry import PushResult, RegistryOptions


@dataclass(frozen=True)
class BuildOptions:
    isolation: str = "auto"
    network: str = "none"
    cache_dir: Path | None = None  # None: no cache
    jobs: int = 0  # layers built at once; 0: one per CPU
    registry: RegistryOptions | None = None  # auth/TLS for docker:// outputs, bases and caches
    manifest_format: str = "oci"  # docker:// outputs: oci | docker (v2 schema 2)
    cache_from: str | None = None  # docker://REF of a shared layer cache to use
    cache_to: str | None = None  # docker://REF to push this build's layer cache to
    sbom: str | None = None  # --sbom spdx|cyclonedx|both|none; None: by the output (build.attest)
    sbom_output: Path | None = None  # --sbom-output FILE: the SBOM as a plain file too
    sign_key: Path | None = None  # --sign-key KEY.pem: the provenance in a signed DSSE envelope
    # An oci:DIR output holds a Docker v2 schema 2 manifest (nsbuild index --manifest-format docker
    # builds each platform into a private layout, then writes the Docker manifest list).
    docker_layout: bool = False


@dataclass(frozen=True)
class BuildResult:
    image: Image
    output: str
    format: str
    push: PushResult | None = None  # docker:// output
    base: dict[str, Any] | None = None  # docker:// fromImage: what was pulled
    cache_push: PushResult | None = None  # --cache-to
    remote_hits: int = 0  # layers taken from --cache-from
    written: bool = True  # False: the output file already held these bytes
    loaded: str | None = None  # --load: the name podman or docker reports having loaded
    # Per layer of the image, in order: where it came from (base | built | cache | cache-from) and
    # the seconds it took.
    layer_sources: tuple[tuple[str, float], ...] = ()
    store_paths: tuple[Path, ...] = ()  # the image's store closure (for --depfile)
    sbom: dict[str, Any] | None = None  # the SBOM and provenance made and where they went (--json)


@dataclass(frozen=True)
class BuildContext:
    """One build's inputs and its workspace, handed to every step instead of a long parameter list."""

    spec: Spec
    output: ImageRef
    options: BuildOptions
    progress: Progress
    ws: Workspace
    compression: str  # the new layers' blobs (steps.layer_compression)

    @property
    def keep_tar(self) -> bool:
        """Uncompressed layers: their tar is the blob, kept on disk."""
        return self.compression == "none"

    @property
    def docker(self) -> bool:
        """The layers go into a docker-archive (a file, stdout or a client's `load`)."""
        return self.output.format in ("docker-archive", "load")


class Workspace:
    """The build's private temporary tree; removed whatever happens. It holds a lock while the build
    lives: a build killed outright leaves its tree, and the next build removes it (nsbuild.sandbox.sweep)."""

    def __init__(self) -> None:
        parent = Path(tempfile.gettempdir())
        sweep.sweep_workspaces(parent)
        self.root, self._lock = sweep.new_workspace(parent)
        os.chmod(self.root, 0o700)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir()

    def path(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(exist_ok=True)
        return p

    def close(self) -> None:
        # Whatever cannot be removed now stays with its lock file: the next build's sweep retries.
        sweep.remove_workspace(self.root)
        with contextlib.suppress(OSError):
            os.close(self._lock)
