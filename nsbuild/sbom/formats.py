"""`--sbom`'s choices: light, for every build to read before it knows whether it makes documents."""

from __future__ import annotations

from nsbuild.errors import UsageError

FORMATS = ("spdx", "cyclonedx")
CHOICES = {"spdx": ("spdx",), "cyclonedx": ("cyclonedx",), "both": FORMATS, "none": ()}


def sbom_formats(choice: str) -> tuple[str, ...]:
    """`--sbom spdx|cyclonedx|both|none` → the formats to write."""
    try:
        return CHOICES[choice]
    except KeyError:
        raise UsageError(f"--sbom must be one of {', '.join(CHOICES)}, not {choice!r}") from None
