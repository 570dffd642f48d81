"""A minimal Docker registry token server (the bearer-token flow of the distribution spec).

The registry answers 401 with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`; the client asks
this server's realm for a token (HTTP basic credentials, `GET ?service=&scope=`; or the OAuth2
password grant, `POST` form), and retries with `Authorization: Bearer <token>`. Tokens are JWTs
signed RS256 with a throw-away key whose self-signed certificate is the registry's
`rootcertbundle`; the certificate travels in the `x5c` header, which distribution verifies.
Valid credentials get every action they ask for; wrong ones get 401; none get a token with no access.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_scopes(scopes: list[str]) -> list[dict]:
    """ "repository:name/sub:pull,push" -> {"type": "repository", "name": "name/sub", "actions": [...]}.
    Names may hold ':' only before the last field (a registry host with a port never appears here)."""
    out = []
    for scope in scopes:
        for one in scope.split(" "):
            if not one:
                continue
            typ, rest = one.split(":", 1)
            name, actions = rest.rsplit(":", 1)
            out.append({"type": typ, "name": name, "actions": [a for a in actions.split(",") if a]})
    return out


@dataclass
class TokenRequest:
    user: str | None
    scopes: list[dict]
    granted: bool


class TokenServer:
    def __init__(
        self,
        d: Path,
        users: dict[str, str],
        service: str = "nsbuild-test-registry",
        issuer: str = "nsbuild-test-token-issuer",
    ) -> None:
        self.dir = d
        self.users = users
        self.service = service
        self.issuer = issuer
        self.requests: list[TokenRequest] = []
        d.mkdir(parents=True, exist_ok=True)
        self.key = d / "token.key"
        self.cert = d / "token.crt"
        proc = subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
                "-days",
                "2",
                "-subj",
                "/CN=nsbuild test token issuer",
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise AssertionError(f"openssl could not make the token signing key:\n{proc.stderr}")
        self.cert.chmod(0o644)
        pem = self.cert.read_text()
        der_b64 = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
        self._header = _b64url(json.dumps({"typ": "JWT", "alg": "RS256", "x5c": [der_b64]}).encode())
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.realm = ""

    # --- tokens ---

    def make_token(self, user: str, access: list[dict], lifetime: int = 600) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + lifetime,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{self._header}.{_b64url(json.dumps(claims).encode())}"
        proc = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(), capture_output=True
        )
        if proc.returncode != 0:
            raise AssertionError(f"openssl could not sign a token: {proc.stderr.decode()}")
        return f"{signing_input}.{_b64url(proc.stdout)}"

    def token_for(self, user: str | None, password: str | None, scopes: list[str]) -> tuple[int, dict]:
        access = parse_scopes(scopes)
        if user is None:
            self.requests.append(TokenRequest(None, access, False))
            return 200, self._response(self.make_token("", []))
        if self.users.get(user) != password:
            self.requests.append(TokenRequest(user, access, False))
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "invalid username or password"}]}
        self.requests.append(TokenRequest(user, access, True))
        return 200, self._response(self.make_token(user, access))

    @staticmethod
    def _response(token: str) -> dict:
        return {
            "token": token,
            "access_token": token,
            "expires_in": 600,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # --- the HTTP side ---

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="nsbuild-test-token"')
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                user = password = None
                header = self.headers.get("Authorization", "")
                if header.lower().startswith("basic "):
                    try:
                        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    except ValueError:
                        self._send(400, {"errors": [{"code": "BAD_REQUEST", "message": "bad basic auth"}]})
                        return
                self._send(*server.token_for(user, password, query.get("scope", [])))

            def do_POST(self) -> None:  # noqa: N802 - OAuth2 password grant
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if form.get("grant_type", [""])[0] != "password":
                    self._send(400, {"error": "unsupported_grant_type"})
                    return
                status, body = server.token_for(
                    form.get("username", [None])[0], form.get("password", [None])[0], form.get("scope", [])
                )
                self._send(status, body)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="token-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
