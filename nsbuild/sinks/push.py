"""The registry sink: push an image (docker:// output), with the checks before and the JSON after."""

from __future__ import annotations

from typing import Any

from nsbuild.core.progress import Progress, human
from nsbuild.image.image import Image
from nsbuild.layer.layer import check_blobs
from nsbuild.registry import BlobRecord, PushResult, RegistryOptions, push_image
from nsbuild.registry.client import RegistryClient
from nsbuild.registry.reference import Reference
from nsbuild.registry.usage import TransferReporter, registry_reference


def preflight(text: str, what: str, options: RegistryOptions | None) -> None:
    """Reach the registry and authenticate for a push before the build: a wrong password, a missing
    CA or a typo in the host fails in a second, not after minutes of compression."""
    ref = registry_reference(text, what)
    with RegistryClient(ref, options, actions=("pull", "push")) as client:
        client.ping()
        # Any authenticated request will do; 401/403 raise the clear auth error inside request().
        client.request("GET", f"/v2/{ref.repository}/tags/list").close()


def push(
    image: Image,
    target: Reference,
    *,
    manifest_format: str,
    options: RegistryOptions | None,
    progress: Progress,
    blob_record: BlobRecord | None,
) -> PushResult:
    """`blob_record` (read and updated; nsbuild.cache.shared.blob_record) enables cross-repository mounts."""
    progress.info(f"pushing {target} ({manifest_format} manifest, {len(image.layers)} layers)")
    check_blobs([layer.compressed for layer in image.layers])
    result = push_image(
        image,
        target,
        manifest_format=manifest_format,
        options=options,
        progress=TransferReporter(progress, "push"),
        blob_record=blob_record,
    )
    progress.info(
        f"pushed {result.reference}@{result.digest}: {len(result.uploaded_blobs)} blobs uploaded "
        f"({human(result.uploaded_bytes)}), {len(result.skipped_blobs)} already there, "
        f"{len(result.mounted_blobs)} mounted"
    )
    return result


def push_json(result: PushResult) -> dict[str, Any]:
    """What --json shows of a push: the library's secret-free record plus counts."""
    out = result.to_json()
    out.update(
        {
            "uploaded": len(result.uploaded_blobs),
            "skipped": len(result.skipped_blobs),
            "mounted": len(result.mounted_blobs),
        }
    )
    return out
