"""How to talk to registries (auth, TLS, retries), from the CLI's flags; importing it costs no HTTP stack."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.errors import UsageError
from nsbuild.registry.auth import AuthOptions

__all__ = ["RegistryOptions", "RetryPolicy", "options_from_cli", "tuning_from_env"]

# Environment knobs (documented in the README's "Trust and safety"): a CI runner on a slow link may
# raise the timeouts, a test lowers them so a stalling server fails in a second.
ENV_TIMEOUT = "NSBUILD_REGISTRY_TIMEOUT"  # seconds a socket read may wait for the registry
ENV_CONNECT_TIMEOUT = "NSBUILD_REGISTRY_CONNECT_TIMEOUT"  # seconds to open a connection
ENV_RETRIES = "NSBUILD_REGISTRY_RETRIES"  # attempts per request (1 = no retry)
ENV_BACKOFF = "NSBUILD_REGISTRY_BACKOFF"  # seconds before the 2nd attempt, doubled each time
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_READ_TIMEOUT = 60.0


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
    timeout: float = DEFAULT_READ_TIMEOUT  # per socket read, not per transfer
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @property
    def timeouts(self) -> tuple[float, float]:
        """(connect, read) as requests takes them."""
        return (self.connect_timeout, self.timeout)


def _env_number(env: Mapping[str, str], name: str, default: float, minimum: float, integer: bool = False) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise UsageError(f"{name}={text[:40]!r}: expected a {'whole ' if integer else ''}number") from None
    if not value >= minimum or value > 10**6:  # `not >=` also refuses NaN
        raise UsageError(f"{name}={text[:40]!r}: expected a number from {minimum:g} to 1000000")
    return value


def tuning_from_env(env: Mapping[str, str] | None = None) -> tuple[float, float, RetryPolicy]:
    """(connect timeout, read timeout, retry policy) from the NSBUILD_REGISTRY_* variables."""
    env = os.environ if env is None else env
    connect = _env_number(env, ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, 0.01)
    read = _env_number(env, ENV_TIMEOUT, DEFAULT_READ_TIMEOUT, 0.01)
    base = RetryPolicy()
    attempts = int(_env_number(env, ENV_RETRIES, base.attempts, 1, integer=True))
    backoff = _env_number(env, ENV_BACKOFF, base.backoff, 0.0)
    return connect, read, RetryPolicy(attempts=attempts, backoff=backoff, max_backoff=max(base.max_backoff, backoff))


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
    connect, read, retry = tuning_from_env()
    return RegistryOptions(
        auth=auth,
        tls_verify=tls_verify,
        cert_dir=Path(cert_dir) if cert_dir else None,
        retry=retry,
        timeout=read,
        connect_timeout=connect,
    )
