"""Image references as skopeo users write them: docker-archive:, oci:, oci-archive:, docker://."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from nsbuild.errors import UsageError

FORMATS = ("docker-archive", "oci-dir", "oci-archive")
# skopeo's transports for the local stores, and the client that loads into each.
LOAD_CLIENTS = {"containers-storage": "podman", "docker-daemon": "docker"}
TRANSPORT_FORMAT = {"docker-archive": "docker-archive", "oci": "oci-dir", "oci-archive": "oci-archive"}


@dataclass(frozen=True)
class ImageRef:
    format: str  # docker-archive | oci-dir | oci-archive | registry | load
    location: str  # a path, HOST/REPO[:TAG] for a registry, the client to load into ("": either)
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
    if sep and transport in LOAD_CLIENTS:
        # skopeo's names of the local stores: the image is loaded into podman / docker
        name, _, tag = body.rpartition(":") if ":" in body.rpartition("/")[2] else (body, "", "")
        return ImageRef("load", LOAD_CLIENTS[transport], name or None, tag or None)
    if sep and transport in ("docker", "dir"):
        raise UsageError(
            f"{text!r}: the {transport}: transport is not supported (use docker-archive:, "
            "oci:, oci-archive:, docker://, containers-storage: or docker-daemon:)"
        )
    if sep and (guess := _mistyped_transport(transport)):
        raise UsageError(
            f"{text!r}: unknown transport {transport + ':'!r}; did you mean {guess}? "
            f"(a file whose name has a colon: write ./{text})"
        )
    return ImageRef(default_format or "auto", text)


# Every transport prefix a user may mean, as skopeo spells them.
_TRANSPORTS = ("docker-archive:", "oci:", "oci-archive:", "docker://", "containers-storage:", "docker-daemon:")


def _mistyped_transport(word: str) -> str | None:
    """The transport `word:` is a typo of, if it looks like one (a bare word close to a known name)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z-]*", word):
        return None
    names = [t.rstrip(":/") for t in _TRANSPORTS]
    close = difflib.get_close_matches(word.lower(), names, n=1, cutoff=0.6)
    return _TRANSPORTS[names.index(close[0])] if close else None


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
