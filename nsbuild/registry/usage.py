"""How the build and the commands use a registry: references given as options, transfers as progress lines."""

from __future__ import annotations

import threading

from nsbuild.core.progress import Progress, human
from nsbuild.errors import UsageError
from nsbuild.registry.push import ProgressEvent
from nsbuild.registry.reference import Reference, parse_reference


def registry_reference(text: str, what: str) -> Reference:
    """A docker:// reference for an option; a bad one is a usage error naming the option."""
    try:
        return parse_reference(text)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None


def has_explicit_tag(text: str) -> bool:
    body = text[len("docker://") :] if text.startswith("docker://") else text
    last = body.rsplit("/", 1)[-1]
    return ":" in last or "@" in body


class TransferReporter:
    """Registry progress events as progress lines: one per blob, a live byte count on a terminal."""

    def __init__(self, progress: Progress, verb: str) -> None:
        self.progress = progress
        self.verb = verb
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        short = event.digest[:19]
        if event.action in ("uploading", "downloading"):
            self.progress.live(f"{event.action} {short}: {human(event.done)} of {human(event.total)}")
        elif event.action == "exists":
            where = "in the local cache" if self.verb == "pull" else "already in the registry"
            self.progress.info(f"{short}: {where} ({human(event.total)})")
        elif event.action == "mounted":
            self.progress.info(f"{short}: mounted from another repository ({human(event.total)})")
        elif event.action == "uploaded":
            self.progress.info(f"{short}: uploaded {human(event.total)}")
