"""OCI distribution client: push images to and pull images from registries (issue 6)."""

from nsbuild.registry.auth import AuthOptions, Credential, find_credential
from nsbuild.registry.client import RegistryError, RegistryOptions, RetryPolicy, options_from_cli
from nsbuild.registry.pull import PulledBlob, PulledImage, fetch_blob, fetch_manifest, pull_image
from nsbuild.registry.push import BlobRecord, ProgressEvent, PushResult, push_image, push_manifest
from nsbuild.registry.reference import Reference, parse_reference

__all__ = [
    "AuthOptions",
    "BlobRecord",
    "Credential",
    "ProgressEvent",
    "PulledBlob",
    "PulledImage",
    "PushResult",
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
