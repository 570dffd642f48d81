"""Package URLs (purl): `pkg:TYPE/NAMESPACE/NAME@VERSION?QUALIFIERS`, each part percent-encoded."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

# Characters a purl component keeps as they are (the purl spec's unreserved set; ':' is no
# separator after the scheme, so versions such as Debian epochs keep it).
_SAFE = "-._~:"


def _enc(text: str) -> str:
    return quote(text, safe=_SAFE)


def purl(kind: str, namespace: str, name: str, version: str = "", qualifiers: Mapping[str, str] | None = None) -> str:
    out = f"pkg:{kind}/"
    if namespace:
        out += "/".join(_enc(part) for part in namespace.split("/")) + "/"
    out += _enc(name)
    if version:
        out += "@" + _enc(version)
    quals = sorted((k.lower(), v) for k, v in (qualifiers or {}).items() if v)
    if quals:
        out += "?" + "&".join(f"{k}={_enc(v)}" for k, v in quals)
    return out


def oci_purl(name: str, digest: str, repository_url: str = "", tag: str = "") -> str:
    """`pkg:oci/NAME@sha256:...`: the purl type for a container image (the last part of its name)."""
    quals = {"repository_url": repository_url, "tag": tag}
    return purl("oci", "", name.rsplit("/", 1)[-1], digest, quals)
