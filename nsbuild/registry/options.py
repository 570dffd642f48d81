"""How to talk to registries (auth, TLS, retries), from the CLI's flags; importing it costs no HTTP stack."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.errors import UsageError
from nsbuild.registry.auth import AuthOptions

__all__ = ["RegistryOptions", "RetryPolicy", "options_from_cli"]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff: float = 0.25  # seconds before the 2nd attempt, doubled each time
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff * (2**attempt), self.max_backoff)


@dataclass(frozen=True)
class RegistryOptions:
    """Everything about talking to a registry that is not the image: auth, TLS, retries."""

    auth: AuthOptions = field(default_factory=AuthOptions)
    tls_verify: bool = True
    cert_dir: Path | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float = 60.0  # per socket operation, not per transfer


def options_from_cli(
    *,
    authfile: Path | None = None,
    creds: str | None = None,
    tls_verify: bool = True,
    cert_dir: Path | None = None,
) -> RegistryOptions:
    """RegistryOptions from the CLI's flags (`--authfile`, `--creds USER:PASSWORD`, `--tls-verify`,
    `--cert-dir`), as skopeo spells them."""
    username = password = None
    if creds is not None:
        username, sep, password = creds.partition(":")
        if not sep or not username:
            raise UsageError("--creds must be USER:PASSWORD")
    if authfile is not None and not Path(authfile).is_file():
        raise UsageError(f"--authfile {authfile} does not exist")
    auth = AuthOptions(authfile=Path(authfile) if authfile else None, username=username, password=password)
    return RegistryOptions(auth=auth, tls_verify=tls_verify, cert_dir=Path(cert_dir) if cert_dir else None)
