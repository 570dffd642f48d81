"""A registry that misbehaves on request: Python's http.server on 127.0.0.1, and a second server on
127.0.0.2 ("elsewhere": the object storage a blob is redirected to, an upload host, a token realm)
that records every request it receives, headers included.

It speaks enough of the distribution API for nsbuild to pull and push (manifests, blobs, monolithic
and chunked uploads), and `Faults` says how to lie: wrong digests, hostile JSON, endless answers,
stalls, 5xx answers and dropped connections a given number of times, redirects and upload Locations
on the other host, a Bearer realm of our choosing. Tests set a fault, run nsbuild, and read what
each server received (`requests`, `elsewhere_requests`).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import socket
import ssl
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .core import layer_tar

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# Hang guard for a stalled handler: it waits for the test to end, never longer than this.
STALL_LIMIT = 120.0
DRIP_PAUSE = 0.3


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Received:
    server: str  # "registry" or "elsewhere"
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Faults:
    """What to do wrong. Counters (`fail`, `drop`) are decremented as they fire."""

    redirect_blobs: bool = False  # blob GETs answer 307 to the other host
    redirect_scheme_port: bool = False  # ... or to plain http on this host's other port (TLS registry)
    upload_elsewhere: bool = False  # upload sessions' Location is on the other host
    announce_digest: dict[str, str] = field(default_factory=dict)  # manifest ref -> Docker-Content-Digest sent
    serve_instead: dict[str, bytes] = field(default_factory=dict)  # manifest ref or blob digest -> bytes sent
    endless: set[str] = field(default_factory=set)  # path substrings answered with a body that never ends
    stall: set[str] = field(default_factory=set)  # path substrings answered never (or after half a blob)
    drip: set[str] = field(default_factory=set)  # path substrings answered one byte every DRIP_PAUSE seconds
    fail: dict[str, int] = field(default_factory=dict)  # "METHOD path-substring" -> 503s to send first
    drop: dict[str, int] = field(default_factory=dict)  # "METHOD path-substring" -> connections to cut first
    bearer_realm: str | None = None  # /v2/ challenges with this Bearer realm
    manifest_put_digest: str | None = None  # Docker-Content-Digest answered to a manifest PUT ("" = none)
    manifest_head_missing: bool = False  # HEAD of a manifest by digest answers 404
    echo_authorization: bool = False  # error bodies quote the Authorization header received
    elsewhere_challenge: bool = False  # the other host answers storage GETs with a Bearer 401 of its own


class SilentPort:
    """A port on 127.0.0.1 that never completes a TCP handshake: a listening socket whose accept queue
    (backlog 0) is kept full, so Linux drops further SYNs and a client's connect times out."""

    def __init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._fill = []
        for _ in range(3):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(self._listener.getsockname())
            self._fill.append(c)

    def close(self) -> None:
        for c in self._fill:
            c.close()
        self._listener.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HostileRegistry:
    """registry.host is "127.0.0.1:PORT"; elsewhere is "127.0.0.2:PORT". `credentials` turns on
    basic auth (every /v2/ request must carry them); `tls_dir` serves https with a CA made there."""

    def __init__(self, *, credentials: tuple[str, str] | None = None, tls_dir: Path | None = None) -> None:
        self.faults = Faults()
        self.credentials = credentials
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, dict[str, tuple[bytes, str]]] = {}  # repo -> ref -> (body, media type)
        self.uploads: dict[str, bytearray] = {}
        self.requests: list[Received] = []
        self.elsewhere_requests: list[Received] = []
        self.token = "hostile-token-" + uuid.uuid4().hex
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ca_cert: Path | None = None
        self.cert_dir: Path | None = None
        self._main = _Server(("127.0.0.1", 0), self._handler("registry"))
        self._other = _Server(("127.0.0.2", 0), self._handler("elsewhere"))
        self._plain = _Server(("127.0.0.1", 0), self._handler("elsewhere"))  # same host, plain http
        if tls_dir is not None:
            self._serve_tls(tls_dir)
        self.host = f"127.0.0.1:{self._main.server_address[1]}"
        self.elsewhere = f"127.0.0.2:{self._other.server_address[1]}"
        self.plain_port = self._plain.server_address[1]
        self.scheme = "https" if tls_dir is not None else "http"
        self._threads = [
            threading.Thread(target=s.serve_forever, name=f"hostile-{i}", daemon=True)
            for i, s in enumerate((self._main, self._other, self._plain))
        ]
        for t in self._threads:
            t.start()

    def _serve_tls(self, tls_dir: Path) -> None:
        from .registry import make_ca_and_cert

        self.ca_cert, cert, key = make_ca_and_cert(tls_dir, hosts=("127.0.0.1",))
        self.cert_dir = tls_dir / "certs.d"
        self.cert_dir.mkdir(exist_ok=True)
        (self.cert_dir / "ca.crt").write_bytes(self.ca_cert.read_bytes())
        for p in (tls_dir, self.cert_dir):
            p.chmod(0o755)
        (self.cert_dir / "ca.crt").chmod(0o644)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self._main.socket = ctx.wrap_socket(self._main.socket, server_side=True)

    # -- content --------------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, tag: str | None, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        digest = digest_of(body)
        refs = self.manifests.setdefault(repo, {})
        refs[digest] = (body, media_type)
        if tag is not None:
            refs[tag] = (body, media_type)
        return digest

    def add_image(
        self,
        repo: str,
        tag: str | None,
        files: dict[str, bytes],
        *,
        architecture: str = "amd64",
        config: bytes | None = None,
    ) -> dict[str, Any]:
        """A one-layer image; `config` replaces the config JSON (hostile configs keep true digests)."""
        tar = layer_tar(files)
        gz = gzip.compress(tar, mtime=0)
        layer = self.add_blob(gz)
        if config is None:
            config = json.dumps(
                {
                    "architecture": architecture,
                    "os": "linux",
                    "config": {"Env": ["BASE=1"]},
                    "rootfs": {"type": "layers", "diff_ids": [digest_of(tar)]},
                    "history": [{"created_by": "hostile test"}],
                }
            ).encode()
        config_digest = self.add_blob(config)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": OCI_GZIP, "digest": layer, "size": len(gz)}],
            }
        ).encode()
        digest = self.add_manifest(repo, tag, manifest)
        return {
            "manifest": digest,
            "manifest_bytes": manifest,
            "config": config_digest,
            "layer": layer,
            "diff_id": digest_of(tar),
        }

    def add_index(self, repo: str, tag: str, entries: list[dict[str, Any]]) -> str:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
        return self.add_manifest(repo, tag, body, OCI_INDEX)

    def ref(self, repo: str, tag: str = "latest") -> str:
        sep = "@" if tag.startswith("sha256:") else ":"
        return f"docker://{self.host}/{repo}{sep}{tag}"

    # -- what was received ----------------------------------------------------------------------

    def all_headers(self) -> list[str]:
        """Every header value either server received (to look for a secret in)."""
        return [v for r in self.requests + self.elsewhere_requests for v in r.headers.values()]

    def stop(self) -> None:
        self._stop.set()
        for s in (self._main, self._other, self._plain):
            s.shutdown()
            s.server_close()

    # -- the handler ------------------------------------------------------------------------------

    def _take(self, table: dict[str, int], method: str, path: str) -> bool:
        """Whether a counted fault fires for this request (and count it down)."""
        with self._lock:
            for key, left in table.items():
                m, _, sub = key.partition(" ")
                if left > 0 and m == method and sub in path:
                    table[key] = left - 1
                    return True
        return False

    def _handler(self, server_name: str) -> type[BaseHTTPRequestHandler]:
        reg = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
                pass

            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Received(server_name, self.command, self.path, dict(self.headers.items()))
                with reg._lock:
                    (reg.requests if server_name == "registry" else reg.elsewhere_requests).append(rec)
                try:
                    if server_name == "registry":
                        _Registry(reg, self, body).handle()
                    else:
                        _Elsewhere(reg, self, body).handle()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch  # noqa: N815

        return Handler


class _Answer:
    """Helpers shared by both servers' request handling."""

    def __init__(self, reg: HostileRegistry, h: BaseHTTPRequestHandler, body: bytes) -> None:
        self.reg, self.h, self.body = reg, h, body
        url = urllib.parse.urlsplit(h.path)
        self.path = url.path
        self.query = urllib.parse.parse_qs(url.query)
        self.method = h.command

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.h.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.h.send_header(k, v)
        self.h.end_headers()
        if self.method != "HEAD" and body:
            self.h.wfile.write(body)

    def error(self, status: int, code: str, message: str) -> None:
        if self.reg.faults.echo_authorization:
            message += f" (you sent {self.h.headers.get('Authorization')!r})"
        data = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        self.send(status, data, {"Content-Type": "application/json"})

    def endless(self) -> None:
        """Headers, then a body that never ends (until the client hangs up)."""
        self.h.send_response(200)
        self.h.send_header("Content-Type", OCI_MANIFEST)
        self.h.send_header("Connection", "close")
        self.h.end_headers()
        self.h.close_connection = True
        chunk = b"[" * 65536
        while not self.reg._stop.is_set():
            self.h.wfile.write(chunk)

    def drip(self) -> None:
        """A 1 MiB answer, one byte at a time, each well within any read timeout."""
        self.h.send_response(200)
        self.h.send_header("Content-Type", OCI_MANIFEST)
        self.h.send_header("Content-Length", str(1024 * 1024))
        self.h.end_headers()
        self.h.close_connection = True
        while not self.reg._stop.wait(DRIP_PAUSE):
            self.h.wfile.write(b" ")
            self.h.wfile.flush()

    def stall(self, partial: bytes = b"", total: int = 0) -> None:
        """Say nothing (or send the headers and part of a body) and wait until the test ends."""
        if partial:
            self.h.send_response(200)
            self.h.send_header("Content-Length", str(total))
            self.h.end_headers()
            self.h.wfile.write(partial)
            self.h.wfile.flush()
        self.reg._stop.wait(STALL_LIMIT)
        self.h.close_connection = True

    def faulted(self) -> bool:
        """Apply the counted and stall faults; True when the request was answered by one."""
        f = self.reg.faults
        if self.reg._take(f.drop, self.method, self.path):
            self.h.close_connection = True
            return True
        if self.reg._take(f.fail, self.method, self.path):
            self.error(503, "UNAVAILABLE", "try again")
            return True
        return False


class _Registry(_Answer):
    def handle(self) -> None:
        if self.faulted():
            return
        f = self.reg.faults
        if any(s in self.path for s in f.stall) and "/blobs/" not in self.path:
            self.stall()
            return
        if any(s in self.path for s in f.endless):
            self.endless()
            return
        if any(s in self.path for s in f.drip):
            self.drip()
            return
        if not self.authorized():
            return
        parts = self.path.split("/")
        if self.path in ("/v2", "/v2/"):
            self.send(200, b"{}", {"Content-Type": "application/json"})
        elif "/manifests/" in self.path:
            repo, _, ref = self.path[len("/v2/") :].partition("/manifests/")
            self.manifest(repo, ref)
        elif "/blobs/uploads" in self.path:
            repo = self.path[len("/v2/") :].partition("/blobs/uploads")[0]
            self.upload(repo, parts[-1] if not self.path.endswith("/") else "")
        elif "/blobs/" in self.path:
            self.blob(parts[-1])
        elif self.path.endswith("/tags/list"):
            repo = self.path[len("/v2/") : -len("/tags/list")]
            tags = [r for r in self.reg.manifests.get(repo, {}) if not r.startswith("sha256:")]
            self.send(200, json.dumps({"name": repo, "tags": tags}).encode(), {"Content-Type": "application/json"})
        else:
            self.error(404, "NOT_FOUND", self.path)

    def authorized(self) -> bool:
        f, got = self.reg.faults, self.h.headers.get("Authorization", "")
        if f.bearer_realm is not None:
            if got == f"Bearer {self.reg.token}":
                return True
            challenge = f'Bearer realm="{f.bearer_realm}",service="hostile",scope="repository:base:pull"'
            self.send(401, b"{}", {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
            return False
        if self.reg.credentials is None:
            return True
        user, password = self.reg.credentials
        if got == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode():
            return True
        self.h.send_response(401)
        self.h.send_header("WWW-Authenticate", 'Basic realm="hostile"')
        self.h.send_header("Content-Length", "0")
        self.h.end_headers()
        return False

    def manifest(self, repo: str, ref: str) -> None:
        f = self.reg.faults
        if self.method == "PUT":
            self.reg.add_manifest(
                repo,
                None if ref.startswith("sha256:") else ref,
                self.body,
                self.h.headers.get("Content-Type", OCI_MANIFEST),
            )
            sent = digest_of(self.body) if f.manifest_put_digest is None else f.manifest_put_digest
            self.send(201, b"", {"Docker-Content-Digest": sent} if sent else {})
            return
        found = self.reg.manifests.get(repo, {}).get(ref)
        if found is None or (self.method == "HEAD" and f.manifest_head_missing):
            self.error(404, "MANIFEST_UNKNOWN", f"{repo}:{ref}")
            return
        body, media = found
        announced = f.announce_digest.get(ref, digest_of(body))
        body = f.serve_instead.get(ref, body)
        self.send(200, body, {"Content-Type": media, "Docker-Content-Digest": announced})

    def blob(self, digest: str) -> None:
        f = self.reg.faults
        data = self.reg.blobs.get(digest)
        if data is None:
            self.error(404, "BLOB_UNKNOWN", digest)
            return
        if self.method == "GET" and f.redirect_blobs:
            self.send(307, b"", {"Location": f"http://{self.reg.elsewhere}/storage/{digest}?sig=1"})
            return
        if self.method == "GET" and f.redirect_scheme_port:
            self.send(307, b"", {"Location": f"http://127.0.0.1:{self.reg.plain_port}/storage/{digest}"})
            return
        data = f.serve_instead.get(digest, data)
        if self.method == "GET" and any(s in self.path for s in f.stall):
            self.stall(data[: len(data) // 2], len(data))
            return
        self.send(200, data, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest})

    def upload(self, repo: str, session: str) -> None:
        if self.method == "POST":
            sid = uuid.uuid4().hex
            self.reg.uploads[sid] = bytearray()
            where = f"http://{self.reg.elsewhere}" if self.reg.faults.upload_elsewhere else ""
            self.send(202, b"", {"Location": f"{where}/v2/{repo}/blobs/uploads/{sid}", "Range": "0-0"})
            return
        buf = self.reg.uploads.get(session)
        if buf is None:
            self.error(404, "BLOB_UPLOAD_UNKNOWN", session)
            return
        finish_upload(self, buf, session, repo)


def finish_upload(ans: _Answer, buf: bytearray, session: str, repo: str) -> None:
    """PATCH appends; PUT ?digest= appends the body, checks the digest and stores the blob."""
    buf += ans.body
    if ans.method == "PATCH":
        ans.send(202, b"", {"Location": f"/v2/{repo}/blobs/uploads/{session}", "Range": f"0-{max(len(buf) - 1, 0)}"})
        return
    want = (ans.query.get("digest") or [""])[0]
    if digest_of(bytes(buf)) != want:
        ans.error(400, "DIGEST_INVALID", want)
        return
    ans.reg.blobs[want] = bytes(buf)
    ans.send(201, b"", {"Docker-Content-Digest": want, "Location": f"/v2/{repo}/blobs/{want}"})


class _Elsewhere(_Answer):
    """Object storage, an upload host or a token realm: it never asks for credentials."""

    def handle(self) -> None:
        if self.faulted():
            return
        if self.path.startswith("/storage/") and self.reg.faults.elsewhere_challenge:
            realm = f"http://{self.reg.elsewhere}/token"
            self.send(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}",service="storage"'})
        elif self.path.startswith("/storage/"):
            data = self.reg.blobs.get(self.path.rsplit("/", 1)[-1])
            if data is None:
                self.error(404, "BLOB_UNKNOWN", self.path)
            else:
                self.send(200, data, {"Content-Type": "application/octet-stream"})
        elif self.path.startswith("/token"):
            body = json.dumps({"token": self.reg.token}).encode()
            self.send(200, body, {"Content-Type": "application/json"})
        elif "/blobs/uploads/" in self.path:
            session = self.path.rsplit("/", 1)[-1]
            repo = self.path[len("/v2/") :].partition("/blobs/uploads")[0]
            buf = self.reg.uploads.get(session)
            if buf is None:
                self.error(404, "BLOB_UPLOAD_UNKNOWN", session)
            else:
                finish_upload(self, buf, session, repo)
        else:
            self.error(404, "NOT_FOUND", self.path)
