"""OCI distribution client: push images to and pull images from registries (issue 6).

Names load on first use (PEP 562): a build that talks to no registry does not import the HTTP stack
(requests takes ~60 ms, a tenth of a rebuild that the cache answers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {
    "AuthOptions": "auth",
    "Credential": "auth",
    "find_credential": "auth",
    "RegistryError": "client",
    "RegistryOptions": "options",
    "RetryPolicy": "options",
    "options_from_cli": "options",
    "PulledBlob": "pull",
    "PulledImage": "pull",
    "fetch_blob": "pull",
    "fetch_manifest": "pull",
    "pull_image": "pull",
    "BlobRecord": "push",
    "ProgressEvent": "push",
    "PushResult": "push",
    "PushTuning": "push",
    "push_image": "push",
    "push_manifest": "push",
    "Reference": "reference",
    "parse_reference": "reference",
}

__all__ = [
    "AuthOptions",
    "BlobRecord",
    "Credential",
    "ProgressEvent",
    "PulledBlob",
    "PulledImage",
    "PushResult",
    "PushTuning",
    "Reference",
    "RegistryError",
    "RegistryOptions",
    "RetryPolicy",
    "fetch_blob",
    "fetch_manifest",
    "find_credential",
    "options_from_cli",
    "parse_reference",
    "pull_image",
    "push_image",
    "push_manifest",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


if TYPE_CHECKING:
    from nsbuild.registry.auth import AuthOptions, Credential, find_credential
    from nsbuild.registry.client import RegistryError
    from nsbuild.registry.options import RegistryOptions, RetryPolicy, options_from_cli
    from nsbuild.registry.pull import PulledBlob, PulledImage, fetch_blob, fetch_manifest, pull_image
    from nsbuild.registry.push import BlobRecord, ProgressEvent, PushResult, PushTuning, push_image, push_manifest
    from nsbuild.registry.reference import Reference, parse_reference
