"""A real registry for tests: Debian's `docker-registry` (distribution v2) on 127.0.0.1.

One empty registry per test (clients skip blobs a registry already has, which would hide a broken
upload). Optional htpasswd basic auth, TLS with a CA made in the test by `openssl`, and bearer-token
auth through a small token server running in the test process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import pytest

from .tokenserver import TokenServer
from .users import die_with_parent

# Hang guard for the start-up poll only (the registry answers in ~50 ms); not a performance bound.
START_DEADLINE = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt_hash(password: str) -> str:
    """htpasswd entry hash: distribution accepts bcrypt only. glibc's crypt (libxcrypt on Debian 12)
    does bcrypt; cost 4 keeps each authenticated request fast (cost 10+ adds ~250 ms per request)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # noqa: PLC0415 - deprecated module, only imported here

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def make_ca_and_cert(d: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for `hosts`, made with openssl. Returns (ca.crt,
    server.crt, server.key)."""
    d.mkdir(parents=True, exist_ok=True)
    key_opts = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")

    openssl(
        "req",
        "-x509",
        *key_opts,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=nsbuild test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl("req", *key_opts, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={hosts[0]}")
    sans = ",".join(("IP:" if h.replace(".", "").isdigit() else "DNS:") + h for h in hosts)
    (d / "server.ext").write_text(
        f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    )
    for name in ("ca.crt", "server.crt"):
        (d / name).chmod(0o644)
    return d / "ca.crt", d / "server.crt", d / "server.key"


@dataclass
class Registry:
    """A running registry. str(registry) is "127.0.0.1:PORT"."""

    host: str
    dir: Path
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_cert: Path | None = None
    # A directory holding only ca.crt: what skopeo's/podman's --cert-dir (and nsbuild's) expect.
    cert_dir: Path | None = None
    # A REGISTRY_AUTH_FILE for clients: the credentials when auth is on, else `{}`.
    auth_file: Path = field(default=Path("/dev/null"))
    token_server: TokenServer | None = None
    proc: subprocess.Popen | None = None

    def __str__(self) -> str:
        return self.host

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def storage(self) -> Path:
        return self.dir / "storage"

    @property
    def log(self) -> str:
        return (self.dir / "registry.log").read_text(errors="replace")

    def ref(self, repo: str, tag: str = "latest") -> str:
        """A docker:// reference into this registry."""
        return f"docker://{self.host}/{repo}:{tag}"

    def skopeo_args(self, side: str = "dest") -> list[str]:
        """skopeo TLS options for this registry; side is "src" or "dest" (copy) or "" (inspect)."""
        pre = f"--{side}-" if side else "--"
        if self.tls:
            return [f"{pre}cert-dir={self.cert_dir}"]
        return [f"{pre}tls-verify=false"]

    def request(
        self, path: str, method: str = "GET", auth: bool = True, headers: dict[str, str] | None = None
    ) -> tuple[int, Message, bytes]:
        """An HTTP request to the registry (CA trusted; basic credentials, or the bearer-token
        challenge flow, when auth is on); returns (status, headers, body) for any status. headers
        is case-insensitive (`headers["WWW-Authenticate"]`)."""
        hdrs = dict(headers or {})
        if auth and self.username is not None and self.token_server is None:
            cred = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            hdrs["Authorization"] = f"Basic {cred}"
        status, resp_headers, body = self._http(self.url + path, method, hdrs)
        challenge = resp_headers.get("WWW-Authenticate", "")
        if status == 401 and auth and self.username is not None and challenge.lower().startswith("bearer "):
            params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
            query = urllib.parse.urlencode({k: params[k] for k in ("service", "scope") if k in params})
            cred = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            t_status, _, t_body = self._http(f"{params['realm']}?{query}", "GET", {"Authorization": f"Basic {cred}"})
            if t_status != 200:
                return t_status, resp_headers, t_body
            hdrs["Authorization"] = f"Bearer {json.loads(t_body)['token']}"
            status, resp_headers, body = self._http(self.url + path, method, hdrs)
        return status, resp_headers, body

    def _http(self, url: str, method: str, headers: dict[str, str]) -> tuple[int, Message, bytes]:
        req = urllib.request.Request(url, method=method, headers=headers)
        ctx = ssl.create_default_context(cafile=str(self.ca_cert)) if url.startswith("https:") else None
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def tags(self, repo: str) -> list[str]:
        status, _, body = self.request(f"/v2/{repo}/tags/list")
        if status != 200:
            raise AssertionError(f"GET /v2/{repo}/tags/list: {status} {body!r}")
        return json.loads(body).get("tags") or []

    def catalog(self) -> list[str]:
        status, _, body = self.request("/v2/_catalog")
        if status != 200:
            raise AssertionError(f"GET /v2/_catalog: {status} {body!r}")
        return json.loads(body).get("repositories") or []

    def blobs_on_disk(self) -> set[str]:
        """Digests ("sha256:…") of every blob the registry stores, manifests included (to see what a
        push uploaded)."""
        root = self.storage / "docker/registry/v2/blobs"
        return {f"{p.parent.parent.parent.name}:{p.parent.name}" for p in root.glob("*/*/*/data")}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.token_server is not None:
            self.token_server.stop()


def _config(reg: Registry, port: int, server_cert: Path | None, server_key: Path | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {reg.storage}",
        "  delete:",
        "    enabled: true",
        "  cache:",
        "    blobdescriptor: inmemory",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        # A fixed secret: otherwise distribution logs a warning about generating one.
        "  secret: nsbuild-test-secret",
    ]
    if server_cert is not None:
        lines += ["  tls:", f"    certificate: {server_cert}", f"    key: {server_key}"]
    if reg.token_server is not None:
        ts = reg.token_server
        lines += [
            "auth:",
            "  token:",
            f"    realm: {ts.realm}",
            f"    service: {ts.service}",
            f"    issuer: {ts.issuer}",
            f"    rootcertbundle: {ts.cert}",
        ]
    elif reg.username is not None:
        lines += ["auth:", "  htpasswd:", "    realm: nsbuild-test", f"    path: {reg.dir / 'htpasswd'}"]
    return "\n".join(lines) + "\n"


def start_registry(
    parent: Path | None = None,
    *,
    auth: tuple[str, str] | None = None,
    tls: bool = False,
    token: bool = False,
) -> Registry:
    """Start `docker-registry serve CONFIG` on 127.0.0.1 and a random free port; return once /v2/
    answers. auth=(user, password) turns on htpasswd basic auth, or bearer tokens with token=True
    (the token server accepts those credentials). tls=True serves https with a fresh CA."""
    exe = shutil.which("docker-registry", path="/usr/bin:/usr/sbin:/bin")
    if exe is None:
        message = "docker-registry is not installed (Debian package docker-registry; `make deps`)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)  # CI installs it: never a silent skip there
        pytest.skip(message)
    if token and auth is None:
        raise ValueError("token=True needs auth=(user, password) for the token server")
    d = Path(tempfile.mkdtemp(prefix="nsbuild-registry-", dir=parent or "/var/tmp"))
    d.chmod(0o755)  # test accounts read the CA and the auth file from here
    reg = Registry(host="", dir=d, tls=tls)
    reg.storage.mkdir()
    server_cert = server_key = None
    if tls:
        reg.ca_cert, server_cert, server_key = make_ca_and_cert(d / "tls")
        reg.cert_dir = d / "certs.d"
        reg.cert_dir.mkdir()
        shutil.copy(reg.ca_cert, reg.cert_dir / "ca.crt")
        (reg.cert_dir / "ca.crt").chmod(0o644)
    if auth is not None:
        reg.username, reg.password = auth
        (d / "htpasswd").write_text(f"{auth[0]}:{bcrypt_hash(auth[1])}\n")
    if token:
        reg.token_server = TokenServer(d / "token", {auth[0]: auth[1]})
        reg.token_server.start()

    for _attempt in range(5):  # another process may grab the free port between probe and bind
        port = free_port()
        reg.host = f"127.0.0.1:{port}"
        (d / "config.yml").write_text(_config(reg, port, server_cert, server_key))
        log = open(d / "registry.log", "ab")  # noqa: SIM115 - the child keeps it; closed below
        # Never REGISTRY_* variables: distribution reads every one of them as its own configuration.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(d), "LANG": "C.UTF-8"}
        reg.proc = subprocess.Popen(
            [exe, "serve", str(d / "config.yml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=d,
            preexec_fn=die_with_parent,
        )
        log.close()
        if _wait_ready(reg):
            break
        reg.stop()
        if "address already in use" not in reg.log:
            raise AssertionError(f"docker-registry did not start:\n{reg.log}")
    else:
        raise AssertionError(f"docker-registry could not bind a free port:\n{reg.log}")

    if auth is not None:
        creds = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        auth_json = {"auths": {reg.host: {"auth": creds}}}
    else:
        auth_json = {}
    reg.auth_file = d / "auth.json"
    reg.auth_file.write_text(json.dumps(auth_json) + "\n")
    reg.auth_file.chmod(0o644)
    return reg


def _wait_ready(reg: Registry) -> bool:
    """Poll /v2/ until it answers (200, or 401 when auth is on); False if the process died."""
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if reg.proc is not None and reg.proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            status, _, _ = reg.request("/v2/", auth=False)
            if status in (200, 401):
                return True
        time.sleep(0.02)
    raise AssertionError(f"docker-registry did not answer /v2/ within {START_DEADLINE:.0f} s:\n{reg.log}")


def remove_registry(reg: Registry) -> None:
    reg.stop()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(reg.dir)


class RegistryFactory:
    """registry_factory(auth=("u", "p"), tls=True, token=False) -> a started Registry; all are
    stopped and removed at the end of the test."""

    def __init__(self) -> None:
        self._started: list[Registry] = []

    def __call__(self, *, auth: tuple[str, str] | None = None, tls: bool = False, token: bool = False) -> Registry:
        reg = start_registry(auth=auth, tls=tls, token=token)
        self._started.append(reg)
        return reg

    def cleanup(self) -> None:
        for reg in reversed(self._started):
            remove_registry(reg)
        self._started.clear()


def environ_without_registry_vars() -> dict[str, str]:
    """os.environ without REGISTRY_* (for anything that could start a registry)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
