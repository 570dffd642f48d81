"""One registry's HTTP session: TLS, the auth challenge flow, retries, and the registry's errors.

TLS is verified against the system CAs plus the `*.crt` files of `cert_dir` (a `NAME.cert`/`NAME.key`
pair there is a client certificate), as skopeo's `--cert-dir`; without `cert_dir`, the per-registry
directories `/etc/containers/certs.d/HOST[:PORT]` and `/etc/docker/certs.d/HOST[:PORT]` are used
when they exist. `tls_verify=False` tries https without verification, then plain http (as
containers/image does for insecure registries).

Auth: `GET /v2/` tells the scheme. Basic sends the credential on every request; Bearer fetches a
token from the challenge's realm for every repository scope this client needs (one token for all,
so a cross-repository mount works) and fetches a new one once when a request is refused.

Retries with exponential backoff on connection resets, timeouts, 429 and 5xx (`Retry-After` honoured).
Bodies that cannot be replayed (chunk uploads) are retried by the caller, which knows how to resume.

Credentials stay with their origin (scheme, host, port): redirects are followed here, not by
requests, and a hop to another origin (object storage behind a blob, an upload Location elsewhere)
carries no Authorization header. A 401 from another origin never starts the challenge flow (its
realm could be anyone's). Every answer not streamed by the caller is read to at most
MAX_RESPONSE_BYTES: a registry that never stops sending is refused, not held in memory.
"""

from __future__ import annotations

import base64
import email.utils
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from nsbuild.errors import BuildError
from nsbuild.registry.auth import Credential, Lookup, find_credential
from nsbuild.registry.options import ENV_CONNECT_TIMEOUT, ENV_TIMEOUT, RegistryOptions, RetryPolicy
from nsbuild.registry.reference import Reference

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
# Registries cap manifests at 4 MiB (distribution's default); no other answer needs more.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# An answer read whole (manifests, configs' descriptors, errors) may take this many read timeouts in all.
DEADLINE_FACTOR = 10
USER_AGENT = "nsbuild/0.1"
_SENSITIVE_HEADERS = ("authorization", "cookie", "proxy-authorization")


class ResponseTooLarge(BuildError):
    """An answer longer than MAX_RESPONSE_BYTES (or than its caller allows)."""


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL: what credentials are scoped to (the web's same-origin rule)."""
    parts = urlparse(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def json_or_none(data: bytes | str) -> Any:
    """Parsed JSON, or None for anything that is not (deep nesting included: RecursionError)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


class RegistryConnectionError(BuildError):
    """The connection failed (reset, timeout) after the retries: callers that can resume catch this."""


class RegistryError(BuildError):
    """A registry answered with an error; `status` and `code` (e.g. MANIFEST_INVALID) for callers."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def registry_errors(resp: requests.Response) -> list[tuple[str, str]]:
    """The (code, message) pairs of a distribution error body; empty when the body is not one."""
    body = json_or_none(resp.content)
    out = []
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        for err in body["errors"]:
            if isinstance(err, dict):
                message = str(err.get("message") or "")
                detail = err.get("detail")
                if isinstance(detail, str) and detail and detail not in message:
                    message = f"{message} ({detail})" if message else detail
                elif isinstance(detail, dict | list) and detail:
                    message = f"{message} ({_short(str(detail))})"
                out.append((str(err.get("code") or "UNKNOWN"), message))
    return out


def format_errors(errors: list[tuple[str, str]]) -> str:
    """One line for a registry's error list; repeats of a code (one per blob) are counted, not listed."""
    parts: list[str] = []
    seen: dict[str, int] = {}
    for code, message in errors:
        if code in seen:
            seen[code] += 1
            continue
        seen[code] = 0
        parts.append(f"{code}: {message}" if message else code)
    for i, code in enumerate(seen):
        if seen[code]:
            parts[i] += f" (and {seen[code]} more)"
    return "; ".join(parts)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y",scope="a,b"` → ("bearer", {...}). Quoted values may hold commas."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            value = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(value)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost useful exception under requests' wrappers (for one-line messages)."""
    return _chain(exc)[-1]


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions under it, outermost first (requests and urllib3 wrap several deep)."""
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(out) < 10:
        out.append(seen)
        if isinstance(seen, urllib3.exceptions.MaxRetryError) and seen.reason is not None:
            seen = seen.reason
        elif seen.args and isinstance(seen.args[0], BaseException):
            seen = seen.args[0]
        else:
            seen = seen.__cause__ or seen.__context__
    return out


def _timeout_kind(exc: BaseException) -> str | None:
    """ "connect" or "read" when the failure was one of our timeouts, else None."""
    chain = _chain(exc)
    if any(isinstance(e, requests.exceptions.ConnectTimeout) for e in chain):
        return "connect"
    if any(isinstance(e, ConnectionRefusedError | socket.gaierror) for e in chain):
        return None
    if any(isinstance(e, urllib3.exceptions.ConnectTimeoutError) for e in chain) and not any(
        isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain
    ):
        return "connect"
    if any(isinstance(e, requests.exceptions.ReadTimeout | urllib3.exceptions.ReadTimeoutError) for e in chain):
        return "read"
    if any(isinstance(e, TimeoutError | urllib3.exceptions.TimeoutError) for e in chain):
        return "read"
    return None


def describe_exception(exc: BaseException, options: RegistryOptions | None = None) -> str:
    """One phrase for a transport failure; timeouts say which one, how long, and how to change it."""
    kind = _timeout_kind(exc)
    if kind is not None:
        opts = options or RegistryOptions()
        if kind == "connect":
            return f"connect timed out after {opts.connect_timeout:g} s (set {ENV_CONNECT_TIMEOUT} to wait longer)"
        return f"read timed out: no data for {opts.timeout:g} s (set {ENV_TIMEOUT} to wait longer)"
    cause = _root_cause(exc)
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, ConnectionResetError):
        return "connection reset"
    if isinstance(cause, urllib3.exceptions.NameResolutionError | socket.gaierror):
        return "host name not found"
    if isinstance(cause, TimeoutError | urllib3.exceptions.TimeoutError):
        return "timed out"
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verification failed ({cause.verify_message})"
    text = str(cause) or type(cause).__name__
    # urllib3 messages repeat the connection object's repr: keep the errno part.
    if "]" in text and "[Errno" in text:
        text = text[text.index("[Errno") :]
    return _short(text, 160)


def _is_new_connection_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, urllib3.exceptions.NewConnectionError):
            return True
        if isinstance(seen, urllib3.exceptions.MaxRetryError):
            seen = seen.reason
        elif seen.args and isinstance(seen.args[0], BaseException):
            seen = seen.args[0]
        else:
            seen = seen.__cause__ or seen.__context__
    return False


def _find_cert_dir(host: str, cert_dir: Path | None) -> Path | None:
    if cert_dir is not None:
        if not Path(cert_dir).is_dir():
            raise BuildError(f"--cert-dir {cert_dir} is not a directory")
        return Path(cert_dir)
    for base in ("/etc/containers/certs.d", "/etc/docker/certs.d"):
        candidate = Path(base) / host
        if candidate.is_dir():
            return candidate
    return None


def make_ssl_context(cert_dir: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if cert_dir is None:
        return ctx
    for crt in sorted(cert_dir.glob("*.crt")):
        try:
            ctx.load_verify_locations(cafile=str(crt))
        except (ssl.SSLError, OSError) as e:
            raise BuildError(f"cannot load CA certificate {crt}: {e}") from None
    for cert in sorted(cert_dir.glob("*.cert")):
        key = cert.with_suffix(".key")
        if not key.exists():
            raise BuildError(f"client certificate {cert} has no matching {key.name}")
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as e:
            raise BuildError(f"cannot load client certificate {cert}: {e}") from None
    return ctx


class _ContextAdapter(HTTPAdapter):
    """An adapter that verifies with our SSLContext (system CAs + cert_dir) instead of certifi's."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        super().__init__(max_retries=0)

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if verify is not False:
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
            pool_kwargs["ssl_context"] = self._ctx
        return host_params, pool_kwargs


class RegistryClient:
    """HTTP access to one registry for a set of repositories (`scopes`: repo → actions)."""

    def __init__(
        self,
        ref: Reference,
        options: RegistryOptions | None = None,
        actions: Iterable[str] = ("pull",),
        sleep: Any = time.sleep,
    ) -> None:
        self.ref = ref
        self.registry = ref.registry
        self.host = ref.api_host
        self.options = options or RegistryOptions()
        self.scopes: dict[str, set[str]] = {ref.repository: set(actions)}
        self._sleep = sleep
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        # No .netrc credentials sent behind our back; proxies are applied by hand (_proxies_for).
        self.session.trust_env = False
        if not self.options.tls_verify:
            # The caller asked for no verification (--tls-verify=false); a warning per request is noise.
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        cert_dir = _find_cert_dir(self.host, self.options.cert_dir) if self.options.tls_verify else None
        self.session.mount("https://", _ContextAdapter(make_ssl_context(cert_dir)))
        self.session.mount("http://", HTTPAdapter(max_retries=0))
        self.base: str | None = None
        self._lookup: Lookup | None = None
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._token: str | None = None
        self._token_scopes: frozenset[str] = frozenset()
        # Counters the tests and callers read: what actually went over the wire.
        self.retries = 0
        # Blobs move in parallel threads: the token, the challenge and the counters are shared.
        self._lock = threading.RLock()

    # -- public helpers -------------------------------------------------------------------------

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_scope(self, repository: str, action: str) -> None:
        with self._lock:
            self.scopes.setdefault(repository, set()).add(action)

    def url(self, path_or_url: str) -> str:
        if self.base is None:
            self.ping()
        assert self.base is not None
        return urljoin(self.base, path_or_url)

    @property
    def credential(self) -> Credential | None:
        return self._lookup_credential().credential

    def describe(self, exc: BaseException) -> str:
        return describe_exception(exc, self.options)

    def is_registry_origin(self, url: str) -> bool:
        """Whether `url` is on the registry's own origin: the only one its credentials go to."""
        return self.base is not None and origin(url) == origin(self.base)

    def ping(self) -> None:
        """Find the scheme that works and the auth challenge. Raises a one-line BuildError."""
        schemes = ["https"] if self.options.tls_verify else ["https", "http"]
        last: BaseException | None = None
        for scheme in schemes:
            url = f"{scheme}://{self.host}/v2/"
            try:
                resp = self._send(_Request("GET", url), retry_new_connections=False)
            except requests.exceptions.SSLError as e:
                if self.options.tls_verify:
                    raise BuildError(
                        f"registry {self.registry}: TLS failed: {self.describe(e)}; pass the registry's "
                        "CA with --cert-dir, or --tls-verify=false for a plain-http test registry"
                    ) from None
                last = e
                continue
            except requests.RequestException as e:
                last = e
                if _is_new_connection_failure(e) or _timeout_kind(e) == "connect":
                    break  # the port is closed (or silent) for http too
                continue
            self.base = f"{scheme}://{self.host}/"
            if resp.status_code == 401:
                self._set_challenge(resp)
            elif resp.status_code >= 400 and resp.status_code != 404:
                raise RegistryError(
                    f"registry {self.registry}: GET /v2/ answered HTTP {resp.status_code}; is this an OCI registry?",
                    resp.status_code,
                )
            resp.close()
            return
        assert last is not None
        raise BuildError(f"registry {self.registry} is unreachable: {self.describe(last)}")

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
    ) -> requests.Response:
        """Send with auth; re-authenticate once on 401; retry transient failures when `retry`."""
        url = self.url(path_or_url)
        reauthenticated = False
        while True:
            try:
                resp = self._send(_Request(method, url, headers, data, params, stream, auth=True), retry=retry)
            except requests.exceptions.SSLError as e:
                raise BuildError(f"registry {self.registry}: TLS failed: {self.describe(e)}") from None
            except requests.RequestException as e:
                raise RegistryConnectionError(
                    f"registry {self.registry}: {method} {urlparse(url).path} failed: {self.describe(e)}"
                ) from None
            if resp.status_code == 401 and not self.is_registry_origin(resp.url):
                # Object storage (or an attacker) behind a redirect: its challenge is not the
                # registry's, and answering it could hand our credentials to its realm.
                resp.close()
                where = urlparse(resp.url).netloc
                raise RegistryError(
                    f"registry {self.registry}: {method} {urlparse(url).path} was sent on to {where}, "
                    "which answered HTTP 401 (credentials are never sent to another host)",
                    401,
                    "UNAUTHORIZED",
                )
            if resp.status_code == 401 and not reauthenticated:
                reauthenticated = True
                sent = resp.request.headers.get("Authorization")
                with self._lock:
                    self._set_challenge(resp)
                    # Drop the token only if no other thread has replaced it meanwhile.
                    if self._token is not None and sent == f"Bearer {self._token}":
                        self._token = None
                resp.close()
                continue
            if resp.status_code == 401:
                resp.close()
                raise self._auth_error(401, resp)
            if resp.status_code == 403:
                raise self._auth_error(403, resp)
            return resp

    def raise_for(self, resp: requests.Response, what: str) -> None:
        """A one-line RegistryError for an unexpected answer to `what` (e.g. 'upload of sha256:..')."""
        errors = registry_errors(resp)
        codes = {code for code, _ in errors}
        status = resp.status_code
        first_code = errors[0][0] if errors else None
        if status == 404 and "NAME_UNKNOWN" in codes:
            raise RegistryError(
                f"registry {self.registry}: repository {self.ref.repository} not found",
                status,
                "NAME_UNKNOWN",
            )
        text = format_errors(errors)
        if not text:
            text = _short(resp.text, 200) if resp.text else resp.reason or ""
        raise RegistryError(
            self.redact(f"registry {self.registry}: {what} failed: HTTP {status} {text}".rstrip()), status, first_code
        )

    def redact(self, text: str) -> str:
        """`text` (a registry's words, which may quote what we sent) without our secrets in it."""
        secrets: list[str] = []
        cred = self._lookup.credential if self._lookup is not None else None
        if cred is not None and cred.password:
            secrets += [cred.password, _basic(cred).split(" ", 1)[1]]
        if self._token:
            secrets.append(self._token)
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "<hidden>")
        return text

    # -- internals --------------------------------------------------------------------------------

    def _lookup_credential(self) -> Lookup:
        with self._lock:
            if self._lookup is None:
                self._lookup = find_credential(self.registry, self.ref.repository, self.options.auth)
            return self._lookup

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def _scope_strings(self) -> list[str]:
        order = ("pull", "push", "delete")
        return [
            f"repository:{repo}:{','.join(a for a in order if a in actions)}"
            for repo, actions in sorted(self.scopes.items())
        ]

    def _set_challenge(self, resp: requests.Response) -> None:
        header = resp.headers.get("WWW-Authenticate", "")
        if not header:
            raise self._auth_error(401, resp)
        scheme, params = parse_challenge(header)
        if scheme == "bearer":
            # A challenge may ask for a scope we did not predict (e.g. another repository's pull).
            scope = params.get("scope", "")
            for item in scope.split(" "):
                parts = item.split(":")
                if len(parts) == 3 and parts[0] == "repository":
                    for action in parts[2].split(","):
                        if action:
                            self.add_scope(parts[1], action)
            self._challenge = (scheme, params)
        elif scheme == "basic":
            self._challenge = (scheme, params)
        else:
            raise BuildError(f"registry {self.registry}: unsupported auth scheme {scheme!r}")

    def _auth_headers(self) -> dict[str, str]:
        with self._lock:
            return self._auth_headers_locked()

    def _auth_headers_locked(self) -> dict[str, str]:
        if self._challenge is None:
            return {}
        scheme, params = self._challenge
        if scheme == "basic":
            cred = self._lookup_credential().credential
            if cred is None:
                return {}
            return {"Authorization": _basic(cred)}
        scopes = frozenset(self._scope_strings())
        if self._token is None or self._token_scopes != scopes:
            self._token = self._fetch_token(params, sorted(scopes))
            self._token_scopes = scopes
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _fetch_token(self, params: dict[str, str], scopes: list[str]) -> str:
        realm = params.get("realm")
        if not realm:
            raise BuildError(f"registry {self.registry}: bearer challenge without a realm")
        self._check_realm(realm)
        cred = self._lookup_credential().credential
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query += [("scope", s) for s in scopes]
        try:
            if cred is not None and cred.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": cred.password,
                    "client_id": "nsbuild",
                    "scope": " ".join(scopes),
                }
                if params.get("service"):
                    form["service"] = params["service"]
                resp = self._send(_Request("POST", realm, data=form))
            else:
                headers = {}
                if cred is not None:
                    headers["Authorization"] = _basic(cred)
                if cred is not None and cred.username:
                    query.append(("account", cred.username))
                resp = self._send(_Request("GET", realm, headers, params=query))
        except requests.RequestException as e:
            raise BuildError(
                f"registry {self.registry}: token server {urlparse(realm).netloc} is unreachable: {self.describe(e)}"
            ) from None
        if resp.status_code in (401, 403):
            raise self._auth_error(resp.status_code, resp, token_server=True)
        if resp.status_code != 200:
            raise RegistryError(
                f"registry {self.registry}: token server {urlparse(realm).netloc} answered HTTP {resp.status_code}",
                resp.status_code,
            )
        body = json_or_none(resp.content)
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not token or not isinstance(token, str) or any(c in token for c in "\r\n"):
            raise BuildError(f"registry {self.registry}: token server {urlparse(realm).netloc} gave no token")
        return str(token)

    def _check_realm(self, realm: str) -> None:
        """Credentials (and the token) never travel over plain http unless --tls-verify=false said
        plain http is acceptable for this registry."""
        scheme = urlparse(realm).scheme.lower()
        if scheme not in ("http", "https"):
            raise BuildError(f"registry {self.registry}: the token realm {_short(realm, 100)!r} is not an http(s) URL")
        if scheme == "http" and self.options.tls_verify:
            raise BuildError(
                f"registry {self.registry}: its token server {urlparse(realm).netloc} is plain http while the "
                "registry is verified TLS; refusing to send credentials in clear (--tls-verify=false allows it)"
            )

    def _auth_error(self, status: int, resp: requests.Response, token_server: bool = False) -> RegistryError:
        lookup = self._lookup_credential()
        cred = lookup.credential
        details = format_errors(registry_errors(resp))
        where = " from the token server" if token_server else ""
        if status == 403:
            who = f"user {cred.username!r} from {cred.source}" if cred else "anonymous access"
            repo = self.ref.repository
            msg = f"registry {self.registry}: access denied (HTTP 403{where}) to {repo} for {who}"
        elif cred is None:
            tried = ", ".join(lookup.tried) or "none"
            msg = (
                f"registry {self.registry}: authentication required (HTTP 401{where}); "
                f"no credentials found (tried: {tried})"
            )
        else:
            msg = (
                f"registry {self.registry}: authentication failed (HTTP 401{where}) for user "
                f"{cred.username!r} with credentials from {cred.source}"
            )
        if details:
            msg += f": {details}"
        return RegistryError(self.redact(msg), status, "DENIED" if status == 403 else "UNAUTHORIZED")

    def _send(self, req: _Request, *, retry: bool = True, retry_new_connections: bool = True) -> requests.Response:
        policy = self.options.retry
        attempt = 0
        while True:
            try:
                resp = self._exchange(req)
            except requests.exceptions.SSLError:
                raise
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as e:
                if (
                    not retry
                    or attempt + 1 >= policy.attempts
                    or (not retry_new_connections and _is_new_connection_failure(e))
                ):
                    raise
                self._sleep(policy.delay(attempt))
                attempt += 1
                self.count_retry()
                continue
            if resp.status_code in RETRY_STATUSES and retry and attempt + 1 < policy.attempts:
                delay = _retry_after(resp.headers.get("Retry-After"), policy) or policy.delay(attempt)
                resp.close()
                self._sleep(delay)
                attempt += 1
                self.count_retry()
                continue
            return resp

    def _exchange(self, req: _Request) -> requests.Response:
        """One request and the redirects it leads to, followed here (requests would re-send our
        headers): a hop to another origin gets no credentials. An answer the caller does not stream
        is read here, to at most MAX_RESPONSE_BYTES."""
        method, url, data, params = req.method, req.url, req.data, req.params
        first = origin(url)
        for _hop in range(MAX_REDIRECTS + 1):
            sent = dict(req.headers or {})
            if origin(url) != first:
                sent = {k: v for k, v in sent.items() if k.lower() not in _SENSITIVE_HEADERS}
            if req.auth and self.is_registry_origin(url):
                sent.update(self._auth_headers())
            resp = self.session.request(
                method,
                url,
                proxies=_proxies_for(url),
                headers=sent,
                data=data,
                params=params,
                stream=True,
                timeout=self.options.timeouts,
                verify=self.options.tls_verify,
                allow_redirects=False,
            )
            location = resp.headers.get("Location")
            if resp.status_code not in REDIRECT_STATUSES or not location:
                if not req.stream:
                    _read_bounded(resp, self.registry, method, DEADLINE_FACTOR * self.options.timeout)
                return resp
            resp.close()
            url = urljoin(resp.url, location)
            if urlparse(url).scheme.lower() not in ("http", "https"):
                raise BuildError(f"registry {self.registry}: {method} was redirected to a non-http URL")
            params = None  # the Location is the whole new URL, query included
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method not in ("GET", "HEAD")):
                method, data = "GET", None
        raise BuildError(
            f"registry {self.registry}: more than {MAX_REDIRECTS} redirects for {method} {_short(url, 120)}"
        )


@dataclass(frozen=True)
class _Request:
    """One request as _send sends it, and sends it again on a retry."""

    method: str
    url: str
    headers: dict[str, str] | None = None
    data: Any = None
    params: Any = None
    stream: bool = False  # the caller reads the answer; else it is read here, bounded
    auth: bool = False  # with the registry's credentials (on the registry's own origin only)


def _read_bounded(resp: requests.Response, registry: str, method: str, deadline: float) -> None:
    """Read the answer into resp.content, refusing one longer than MAX_RESPONSE_BYTES (never held
    whole) or still arriving `deadline` seconds on (a registry that drips a byte per read timeout)."""
    limit = MAX_RESPONSE_BYTES
    what = f"registry {registry}: the answer to {method} {urlparse(resp.url).path}"
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        resp.close()
        raise ResponseTooLarge(f"{what} announces {declared} bytes, more than the 4 MiB allowed; refusing it")
    buf = bytearray()
    until = time.monotonic() + deadline
    try:
        for chunk in _chunks(resp):
            buf += chunk
            if len(buf) > limit:
                raise ResponseTooLarge(f"{what} is longer than 4 MiB; refusing it")
            if time.monotonic() > until:
                raise ResponseTooLarge(
                    f"{what} is still arriving after {deadline:g} s ({DEADLINE_FACTOR} x {ENV_TIMEOUT}); refusing it"
                )
    except BaseException:
        resp.close()  # a cut, a stall or too much: this connection is of no further use
        raise
    # requests' own cache of the body: .content, .text and .json() read it from here.
    resp._content = bytes(buf)  # noqa: SLF001
    resp._content_consumed = True  # noqa: SLF001


def _chunks(resp: requests.Response) -> Iterable[bytes]:
    """The body as it arrives: read1 returns what one read gives (iter_content would wait for a whole
    chunk, so a drip would never reach the deadline check). urllib3's errors are turned into the
    requests exceptions that the retry loop knows, as iter_content does."""
    raw = resp.raw
    if getattr(raw, "chunked", False) or not hasattr(raw, "read1"):
        yield from resp.iter_content(64 * 1024)
        return
    while True:
        try:
            chunk = raw.read1(64 * 1024, decode_content=True)
        except urllib3.exceptions.ReadTimeoutError as e:
            raise requests.ConnectionError(e) from e
        except urllib3.exceptions.ProtocolError as e:
            raise requests.exceptions.ChunkedEncodingError(e) from e
        except urllib3.exceptions.DecodeError as e:
            raise requests.exceptions.ContentDecodingError(e) from e
        except urllib3.exceptions.SSLError as e:
            raise requests.exceptions.SSLError(e) from e
        if not chunk:
            return
        yield chunk


def _basic(cred: Credential) -> str:
    return "Basic " + base64.b64encode(f"{cred.username}:{cred.password}".encode()).decode()


def _proxies_for(url: str) -> dict[str, str]:
    """HTTP(S)_PROXY / NO_PROXY from the environment, as skopeo honours them; never for loopback
    (Go's rule, which containers/image follows). Taken by hand because the session ignores the
    environment: requests would also pick up .netrc credentials and send them to the registry."""
    host = urlparse(url).hostname or ""
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return {}
    return requests.utils.get_environ_proxies(url)


def _retry_after(value: str | None, policy: RetryPolicy) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, policy.max_retry_after))
