"""Error types that map to the CLI's exit codes (DESIGN.md §5)."""

from __future__ import annotations


class NsbuildError(Exception):
    """Base class; `exit_code` decides the process exit status."""

    exit_code = 1


class SpecError(NsbuildError):
    """Bad usage or an invalid spec: exit 2, one line naming the field."""

    exit_code = 2

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class UsageError(NsbuildError):
    exit_code = 2


class BuildError(NsbuildError):
    """A script, I/O or input failure while building: exit 1."""

    exit_code = 1
