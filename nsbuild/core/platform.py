"""Platform names: this machine's `uname -m` as the GOARCH (and variant) that images and indexes use."""

from __future__ import annotations

import platform

# The architectures a spec may name (GOARCH spellings, as image configs and indexes carry them).
ARCHITECTURES = (
    "amd64",
    "arm64",
    "386",
    "arm",
    "ppc64le",
    "ppc64",
    "s390x",
    "riscv64",
    "mips",
    "mipsle",
    "mips64",
    "mips64le",
    "loong64",
    "wasm",
)

# `uname -m` → (GOARCH, variant); a machine not listed is taken as its own GOARCH, with no variant.
MACHINES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "i386": ("386", None),
    "i686": ("386", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
    "loongarch64": ("loong64", None),
}


def host_platform() -> tuple[str, str | None]:
    """(GOARCH, variant) of this machine."""
    machine = platform.machine().lower()
    return MACHINES.get(machine, (machine, None))


def host_architecture() -> str:
    """GOARCH of this machine."""
    return host_platform()[0]


# The variants a GOARCH may carry in an image config or an index's platform (GOARM, GOARM64,
# GOAMD64 spellings, as containerd and the image spec write them); an architecture not listed here
# has no variant.
VARIANTS: dict[str, tuple[str, ...]] = {
    "arm": ("v5", "v6", "v7", "v8"),
    "arm64": ("v8", "v8.1", "v8.2", "v8.3", "v8.4", "v8.5", "v8.6", "v8.7", "v8.8", "v8.9", "v9", "v9.1", "v9.2"),
    "amd64": ("v1", "v2", "v3", "v4"),
}


def variant_problem(architecture: str, variant: str) -> str | None:
    """Why `variant` cannot go with `architecture` (None: it can)."""
    allowed = VARIANTS.get(architecture)
    if allowed is None:
        return f"architecture {architecture} has no variants"
    if variant not in allowed:
        return f"expected one of {', '.join(allowed)} for architecture {architecture}, got {variant!r}"
    return None


def variant_matches(architecture: str, wanted: str | None, have: str | None) -> bool:
    """Whether an image of variant `have` serves a request for `wanted` (None: any variant)."""
    if wanted is None:
        return True
    if architecture == "arm64":
        # Docker's normalisation: arm64 is v8 unless said otherwise.
        return (wanted or "v8") == (have or "v8")
    return wanted == have


def platform_name(os_name: str, architecture: str, variant: str | None = None) -> str:
    """linux/arm/v7, as podman, skopeo and buildah print a platform."""
    return "/".join([os_name, architecture] + ([variant] if variant else []))
