"""SBOMs and attestations attached to an image in a registry (OCI distribution 1.1 referrers).

Each artifact manifest (nsbuild.sbom.attach) goes up by digest with its blobs. A registry with the
referrers API (`GET /v2/REPO/referrers/DIGEST` answers with an index) indexes it by its subject
itself; one without it (distribution 2.8 answers 404) gets the referrers tag schema: the index
tagged `sha256-<hex of the subject>` lists the artifacts, read, extended and written back by the
client, as the distribution spec asks of clients.

This module imports nsbuild.registry (requests): import it only when a registry is the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nsbuild.errors import BuildError
from nsbuild.image.image import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, canonical_json, sha256_digest
from nsbuild.registry.client import RegistryClient
from nsbuild.registry.options import RegistryOptions
from nsbuild.registry.push import push_manifest
from nsbuild.registry.reference import Reference, parse_reference
from nsbuild.sbom.attach import EMPTY_CONFIG, Artifact, Subject, artifact_manifest, referrer_descriptor


@dataclass(frozen=True)
class Attached:
    """What was pushed: the artifact manifests' descriptors and how the registry finds them
    (`api`: its referrers API; `tag`: the tag `fallback_tag`)."""

    descriptors: tuple[dict[str, Any], ...]
    mode: str
    fallback_tag: str = ""


def fallback_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: `<alg>-<hex>`."""
    algo, _, value = digest.partition(":")
    return f"{algo}-{value}"


def _referrers_api(client: RegistryClient, repo: str, digest: str) -> bool:
    resp = client.request("GET", f"/v2/{repo}/referrers/{digest}", headers={"Accept": MEDIA_OCI_INDEX})
    try:
        if resp.status_code == 404:
            return False
        if resp.status_code != 200:
            client.raise_for(resp, f"listing the referrers of {digest}")
        kind = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return kind == MEDIA_OCI_INDEX
    finally:
        resp.close()


def _tag_index(client: RegistryClient, repo: str, tag: str) -> dict[str, Any]:
    resp = client.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": MEDIA_OCI_INDEX})
    try:
        if resp.status_code == 404:
            return {"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": []}
        if resp.status_code != 200:
            client.raise_for(resp, f"reading the referrers tag {tag}")
        index = json.loads(resp.content)
    except ValueError:
        raise BuildError(f"registry {client.registry}: the referrers tag {tag} is not an index") from None
    finally:
        resp.close()
    if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
        raise BuildError(f"registry {client.registry}: the referrers tag {tag} is not an index")
    return index


def attach_to_registry(
    image: str | Reference,
    subject: Subject,
    artifacts: list[Artifact],
    *,
    created: str = "",
    options: RegistryOptions | None = None,
) -> Attached:
    """Push `artifacts` as referrers of `subject` into the repository of `image` (HOST/REPO[:TAG])."""
    target = parse_reference(image) if isinstance(image, str) else image
    added = []
    for artifact in artifacts:
        manifest = artifact_manifest(artifact, subject, created)
        blobs: dict[str, bytes | Any] = {sha256_digest(EMPTY_CONFIG): EMPTY_CONFIG, artifact.digest: artifact.data}
        push_manifest(
            Reference(target.registry, target.repository, None, sha256_digest(manifest)),
            manifest,
            MEDIA_OCI_MANIFEST,
            blobs=blobs,
            options=options,
        )
        added.append(referrer_descriptor(artifact, manifest))
    with RegistryClient(target, options, actions=("pull", "push")) as client:
        if _referrers_api(client, target.repository, subject.digest):
            return Attached(tuple(added), "api")
        tag = fallback_tag(subject.digest)
        index = _tag_index(client, target.repository, tag)
    new = {d["digest"] for d in added}
    index["manifests"] = [m for m in index.get("manifests", []) if m.get("digest") not in new] + added
    tagged = Reference(target.registry, target.repository, tag, None)
    push_manifest(tagged, canonical_json(index), MEDIA_OCI_INDEX, options=options)
    return Attached(tuple(added), "tag", tag)
