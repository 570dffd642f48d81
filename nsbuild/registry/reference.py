"""Image references: `[docker://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]` with Docker Hub defaults.

The normalisation follows docker/distribution's `reference` package, which skopeo and docker share:
the first path component is a registry only when it looks like a host (has a dot or a port, or is
`localhost`); otherwise the image is on Docker Hub and one-component names live under `library/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nsbuild.core.refs import split_registry_host
from nsbuild.errors import UsageError

DOCKER_HUB = "docker.io"
# Docker Hub's API is not served from the name people write.
DOCKER_HUB_API = "registry-1.docker.io"
# The key docker's own config.json and credential helpers use for Docker Hub.
DOCKER_HUB_LEGACY_KEY = "https://index.docker.io/v1/"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. `registry` is as written (`docker.io` for Hub), `tag` defaults to
    `latest` only when there is no digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """host[:port] the HTTP requests go to."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse_reference(text: str) -> Reference:
    """Parse `text` (an optional `docker://` prefix is accepted). Raises UsageError with one line."""
    raw = text
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    if not text or text != text.strip():
        raise UsageError(f"invalid image reference {raw!r}")

    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise UsageError(f"invalid image reference {raw!r}: digest must be sha256:<64 hex digits>")

    registry = DOCKER_HUB
    host, rest = split_registry_host(text)
    if host is not None:
        if not _HOST_RE.match(host):
            raise UsageError(f"invalid image reference {raw!r}: bad registry host {host!r}")
        registry, text = host, rest
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB

    tag = None
    # A colon after the last slash is a tag; one before it belongs to the host (already split off).
    name, colon, maybe_tag = text.rpartition(":")
    if colon and "/" not in maybe_tag:
        text, tag = name, maybe_tag
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid image reference {raw!r}: bad tag {tag!r}")

    if registry == DOCKER_HUB and "/" not in text:
        text = f"library/{text}"
    if not _REPO_RE.match(text):
        hint = " (repository names must be lower case)" if text.lower() != text else ""
        raise UsageError(f"invalid image reference {raw!r}: bad repository name {text!r}{hint}")

    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, text, tag, digest)
