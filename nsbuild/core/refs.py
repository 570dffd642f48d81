"""Image references as skopeo users write them: docker-archive:, oci:, oci-archive:, docker://."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nsbuild.errors import UsageError

FORMATS = ("docker-archive", "oci-dir", "oci-archive")
TRANSPORT_FORMAT = {"docker-archive": "docker-archive", "oci": "oci-dir", "oci-archive": "oci-archive"}


@dataclass(frozen=True)
class ImageRef:
    format: str  # docker-archive | oci-dir | oci-archive | registry
    location: str  # a path, or HOST/REPO[:TAG] for a registry
    name: str | None = None  # docker-archive: repository name written to RepoTags
    tag: str | None = None  # tag (docker-archive RepoTags, OCI ref.name)

    @property
    def path(self) -> Path:
        return Path(self.location)


def parse_ref(text: str, default_format: str | None = None) -> ImageRef:
    """Parse `-o`/`fromImage`: a transport reference or a bare path (format from the caller)."""
    if text.startswith("docker://"):
        return ImageRef("registry", text[len("docker://") :])
    transport, sep, body = text.partition(":")
    if sep and transport in TRANSPORT_FORMAT:
        if not body:
            raise UsageError(f"{text!r}: missing the path after '{transport}:'")
        fmt = TRANSPORT_FORMAT[transport]
        path, _, rest = body.partition(":")
        if fmt == "docker-archive":
            name, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
            if rest and (not name or not tag):
                raise UsageError(f"{text!r}: expected docker-archive:PATH[:NAME:TAG]")
            return ImageRef(fmt, path, name or None, tag or None)
        return ImageRef(fmt, path, None, rest or None)
    if sep and transport in ("docker", "containers-storage", "dir", "docker-daemon"):
        raise UsageError(
            f"{text!r}: the {transport}: transport is not supported (use docker-archive:, "
            "oci:, oci-archive: or docker://)"
        )
    return ImageRef(default_format or "auto", text)


def is_registry(text: str | None) -> bool:
    """A `docker://` reference (a registry), as opposed to a file or directory."""
    return bool(text) and str(text).startswith("docker://")


def split_registry_host(name: str) -> tuple[str | None, str]:
    """(host, rest) when `name`'s first component is a registry host, else (None, name).

    docker/distribution's rule, which skopeo and docker share: the first of several components is a
    host when it has a dot or a port, or is `localhost`; otherwise the name is a Docker Hub path."""
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return None, name
