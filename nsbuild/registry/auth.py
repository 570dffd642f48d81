"""Registry credentials, found where skopeo/podman and docker look for them.

Order (containers-auth.json(5)): `--authfile` or `REGISTRY_AUTH_FILE` when given (then only that file),
else `${XDG_RUNTIME_DIR}/containers/auth.json`, `${XDG_CONFIG_HOME:-~/.config}/containers/auth.json`
and `${DOCKER_CONFIG:-~/.docker}/config.json`. In each file, `credHelpers[registry]` wins, then an
`auths` entry (the most specific `registry/namespace` key), then `credsStore`.  Helpers are run as
`docker-credential-NAME get`, exactly as docker runs them.

Secrets live only in `Credential.password`, which is kept out of every repr and message.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nsbuild.errors import BuildError
from nsbuild.registry.reference import DOCKER_HUB, DOCKER_HUB_LEGACY_KEY

# docker's config.json and helpers also name Docker Hub by these.
_HUB_ALIASES = {DOCKER_HUB, "index.docker.io", "registry-1.docker.io"}
# A helper answering this (or nothing) has no entry for the registry; it is not an error.
_HELPER_NOT_FOUND = "credentials not found"


@dataclass(frozen=True)
class Credential:
    """A username and a secret. `identity_token` means the secret is an OAuth2 refresh token (docker's
    `identitytoken`, or a helper answering Username `<token>`); `source` says where it came from."""

    username: str
    password: str = field(repr=False)
    source: str = ""
    identity_token: bool = False

    def __repr__(self) -> str:
        return f"Credential(username={self.username!r}, source={self.source!r}, password=<hidden>)"


@dataclass(frozen=True)
class AuthOptions:
    """Where to look for credentials. `username`/`password` are explicit ones (`--creds`); `env`
    defaults to os.environ (tests pass their own); `home` defaults to $HOME."""

    authfile: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    env: Mapping[str, str] | None = field(default=None, repr=False)  # may hold unrelated secrets
    home: Path | None = None


@dataclass
class Lookup:
    """The result of a search: the credential (or None) and the sources tried, for error messages."""

    credential: Credential | None
    tried: list[str]


def _auth_files(opts: AuthOptions) -> list[tuple[Path, str]]:
    env = os.environ if opts.env is None else opts.env
    home = opts.home or Path(env.get("HOME") or Path.home())
    if opts.authfile is not None:
        return [(Path(opts.authfile), f"--authfile {opts.authfile}")]
    if env.get("REGISTRY_AUTH_FILE"):
        path = Path(env["REGISTRY_AUTH_FILE"])
        return [(path, f"REGISTRY_AUTH_FILE={path}")]
    files: list[tuple[Path, str]] = []
    if env.get("XDG_RUNTIME_DIR"):
        path = Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"
        files.append((path, str(path)))
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    path = config_home / "containers" / "auth.json"
    files.append((path, str(path)))
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    path = docker_dir / "config.json"
    files.append((path, str(path)))
    return files


def _normalize_key(key: str) -> str:
    """`https://index.docker.io/v1/` → `docker.io`; `http://host:5000/` → `host:5000`."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            # docker's legacy keys are URLs whose path is an API version, not a namespace.
            key = key.split("/", 1)[0]
            break
    key = key.rstrip("/")
    host, slash, rest = key.partition("/")
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
    return host + slash + rest


def _helper_server(registry: str) -> str:
    return DOCKER_HUB_LEGACY_KEY if registry == DOCKER_HUB else registry


def run_helper(name: str, registry: str, where: str, env: Mapping[str, str] | None = None) -> Credential | None:
    """Ask `docker-credential-NAME get` for the registry's credential (None when it has none)."""
    program = f"docker-credential-{name}"
    run_env = dict(os.environ if env is None else env)
    exe = shutil.which(program, path=run_env.get("PATH"))
    source = f"{where} (credential helper {program})"
    if exe is None:
        raise BuildError(f"credential helper {program} named in {where} is not on PATH")
    try:
        proc = subprocess.run(
            [exe, "get"],
            input=_helper_server(registry).encode(),
            capture_output=True,
            env=run_env,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"credential helper {program} failed: {type(e).__name__}") from None
    if proc.returncode != 0:
        # The helper's message, not its stdout: stdout could carry a partial secret.
        message = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace")
        if _HELPER_NOT_FOUND in message.lower() or not message.strip():
            return None
        first = message.strip().splitlines()[0][:200]
        raise BuildError(f"credential helper {program} failed for {registry}: {first}")
    try:
        answer = json.loads(proc.stdout)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise BuildError(f"credential helper {program} gave an unreadable answer for {registry}") from None
    if username == "<token>":
        return Credential("<token>", secret, source, identity_token=True)
    return Credential(username, secret, source)


def _from_entry(entry: object, source: str) -> Credential | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("identitytoken"):
        return Credential(str(entry.get("username") or "<token>"), str(entry["identitytoken"]), source, True)
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=False).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise BuildError(f"{source}: the 'auth' entry is not base64 of user:password") from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise BuildError(f"{source}: the 'auth' entry is not base64 of user:password")
        return Credential(user, password, source)
    if entry.get("username") and entry.get("password"):
        return Credential(str(entry["username"]), str(entry["password"]), source)
    return None


def _lookup_file(
    path: Path, label: str, registry: str, repository: str, env: Mapping[str, str] | None
) -> Credential | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BuildError(f"cannot read auth file {path}: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise BuildError(f"auth file {path} is not a JSON object")

    helpers = data.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _normalize_key(key) == registry:
                return run_helper(str(helper), registry, label, env)

    auths = data.get("auths") or {}
    if isinstance(auths, dict):
        # A key may name a namespace (host/ns or host/ns/repo); the longest matching key wins.
        target = f"{registry}/{repository}"
        best: tuple[int, object] | None = None
        for key, entry in auths.items():
            norm = _normalize_key(key)
            if (norm == registry or target == norm or target.startswith(norm + "/")) and (
                best is None or len(norm) > best[0]
            ):
                best = (len(norm), entry)
        if best is not None:
            cred = _from_entry(best[1], label)
            if cred is not None:
                return cred

    store = data.get("credsStore")
    if isinstance(store, str) and store:
        return run_helper(store, registry, label, env)
    return None


def find_credential(registry: str, repository: str, opts: AuthOptions | None = None) -> Lookup:
    """The credential for `registry` (as in Reference.registry) and the sources that were tried."""
    opts = opts or AuthOptions()
    if opts.username is not None:
        return Lookup(Credential(opts.username, opts.password or "", "--creds"), ["--creds"])
    tried: list[str] = []
    for path, label in _auth_files(opts):
        tried.append(label)
        cred = _lookup_file(path, label, registry, repository, opts.env)
        if cred is not None:
            return Lookup(cred, tried)
    return Lookup(None, tried)
