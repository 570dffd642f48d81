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
