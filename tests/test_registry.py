"""nsbuild.registry against a real registry (Debian's docker-registry, distribution v2) on 127.0.0.1.

Every pushed image is pulled back with skopeo and checked with umoci and oci-image-tool; every pull
is checked against digests computed here from the bytes we made. Fault injection uses a real TCP
proxy that drops the connection once, mid-upload.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import warnings
from pathlib import Path

import pytest
from support.core import layer_tar
from support.registry import Registry, RegistryFactory
from support.users import run_as
from support.verifiers import oci_validate, require_tool, skopeo_copy, skopeo_inspect, umoci_unpack

from nsbuild.errors import BuildError
from nsbuild.image.image import Image, canonical_json, oci_manifest, sha256_digest
from nsbuild.layer.layer import MEDIA_TAR_GZIP, Blob, Layer
from nsbuild.registry import (
    AuthOptions,
    BlobRecord,
    PushTuning,
    RegistryError,
    RegistryOptions,
    RetryPolicy,
    pull_image,
    push_image,
)
from nsbuild.registry.push import push_manifest

# No waiting between retries in tests: the behaviour under test is that they happen, not when.
FAST_RETRY = RetryPolicy(attempts=6, backoff=0.0, max_backoff=0.0)


# --- images made here, independent of nsbuild's tar writer ------------------------------------------


def make_image(
    d: Path, layers: list[dict[str, bytes]], *, name: str = "test", tag: str = "1", architecture: str = "amd64"
) -> Image:
    """An Image of gzip'd tar layers written to `d`, config and OCI manifest from nsbuild.image.image."""
    d.mkdir(parents=True, exist_ok=True)
    made = []
    for files in layers:
        tar = layer_tar(files)
        gz = gzip.compress(tar, mtime=0)
        digest = sha256_digest(gz)
        path = d / digest.split(":")[1]
        path.write_bytes(gz)
        made.append(
            Layer(
                diff_id=sha256_digest(tar),
                tar=Blob(sha256_digest(tar), len(tar), None),
                compressed=Blob(digest, len(gz), path),
                media_type=MEDIA_TAR_GZIP,
                comment="test layer",
            )
        )
    config = canonical_json(
        {
            "architecture": architecture,
            "os": "linux",
            "created": "1970-01-01T00:00:01Z",
            "config": {"Cmd": ["/hello"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in made]},
            "history": [{"created": "1970-01-01T00:00:01Z", "comment": "test layer"} for _ in made],
        }
    )
    return Image(name=name, tag=tag, layers=made, config=config, manifest=oci_manifest(config, made))


def small_image(d: Path, salt: str = "") -> Image:
    return make_image(
        d,
        [
            {"etc/hello.txt": f"hello {salt}\n".encode()},
            {"bin/tool": b"#!/bin/sh\necho tool\n" + salt.encode(), "usr/share/doc/x": b"doc"},
        ],
    )


def big_image(d: Path, size: int = 3 * 1024 * 1024) -> Image:
    """One incompressible layer of `size` bytes: large enough to be uploaded in chunks."""
    return make_image(d, [{"small": b"s"}, {"data/random.bin": os.urandom(size)}])


# --- fixtures and checks --------------------------------------------------------------------------------


@pytest.fixture
def registry(registry_factory: RegistryFactory) -> Registry:
    """The Registry object (conftest's `registry` gives only its host)."""
    return registry_factory()


def plain_options(**kw: object) -> RegistryOptions:
    auth = AuthOptions(env={"HOME": "/nonexistent"})  # never the machine's own credentials
    return RegistryOptions(auth=auth, tls_verify=False, retry=FAST_RETRY, **kw)  # type: ignore[arg-type]


def pull_back_and_verify(reg: Registry, repo_tag: str, work: Path, *skopeo_extra: str) -> dict:
    """skopeo copy docker://… oci:…, then umoci unpack --rootless and oci-image-tool validate.
    Returns the OCI index skopeo wrote."""
    oci = work / f"oci-{repo_tag.replace('/', '_').replace(':', '_')}"
    skopeo_copy(
        f"docker://{reg.host}/{repo_tag}",
        f"oci:{oci}:t",
        *reg.skopeo_args("src"),
        *skopeo_extra,
        authfile=reg.auth_file,
    )
    umoci_unpack(oci, "t", work / f"bundle-{oci.name}")
    oci_validate(oci)
    return json.loads((oci / "index.json").read_text())


def image_blobs(image: Image) -> set[str]:
    return {image.config_digest, *(layer.digest for layer in image.layers)}


def write_oci_layout(image: Image, d: Path) -> Path:
    """An OCI layout of `image` (the input of the skopeo push in the pull tests)."""
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for digest, data in ((image.config_digest, image.config), (image.manifest_digest, image.manifest)):
        (blobs / digest.split(":")[1]).write_bytes(data)
    for layer in image.layers:
        (blobs / layer.digest.split(":")[1]).write_bytes(layer.compressed.path.read_bytes())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "annotations": {"org.opencontainers.image.ref.name": image.tag},
            }
        ],
    }
    (d / "index.json").write_text(json.dumps(index))
    return d


class DroppingProxy:
    """A TCP proxy to `target` that cuts one connection, once:

    - `drop_after=N` (upward): after N bytes from the client, forward half the block and reset both
      sides (a request body cut mid-way: the registry holds part of it);
    - `drop_after=N, upward=False`: after N bytes back to the client, forward half the block and
      close (a response body cut mid-way);
    - `cut_request=(b"PATCH ", n)`: reset the connection instead of forwarding the n-th request that
      starts with the marker (a stale keep-alive connection: nothing of it reaches the registry).
    - `cut_response=(b"PUT ", n)`: forward the n-th such request whole, then close the connection
      instead of forwarding the registry's answer (the registry did the work; the client cannot know);
    - `answer=(b"HEAD ", n, b"HTTP/1.1 429 ...")`: answer the n-th (and later: n..n+times-1) such
      request with these bytes instead of forwarding it, and close (a rate limiter or a load balancer
      in front of the registry).
    """

    def __init__(
        self,
        target: str,
        drop_after: int | None = None,
        upward: bool = True,
        cut_request: tuple[bytes, int] | None = None,
        cut_response: tuple[bytes, int] | None = None,
        answer: tuple[bytes, int, bytes] | None = None,
        times: int = 1,
    ) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.drop_after = drop_after
        self.upward = upward
        self.cut_request = cut_request
        self.cut_response = cut_response
        self.answer = answer
        self.times = times
        self.seen = {True: 0, False: 0}  # bytes per direction (True: upward)
        self.marker_count = 0
        self.dropped = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            conn = {"pair": (client, upstream), "armed": False}
            threading.Thread(target=self._pump, args=(client, upstream, True, conn), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, conn), daemon=True).start()

    def _decide(self, data: bytes, upward: bool, conn: dict) -> str:
        """ "forward", "half" (forward half, then cut) or "cut" (forward nothing, cut)."""
        with self.lock:
            self.seen[upward] += len(data)
            if self.answer is not None:
                marker, nth, _ = self.answer
                if upward and data.startswith(marker):
                    self.marker_count += 1
                    if nth <= self.marker_count < nth + self.times:
                        self.dropped += 1
                        return "answer"
                return "forward"
            if self.cut_response is not None:
                marker, nth = self.cut_response
                if upward and data.startswith(marker):
                    self.marker_count += 1
                    # Armed before the request goes on, so its answer cannot slip through.
                    conn["armed"] = self.marker_count == nth
                if not upward and conn["armed"] and not self.dropped:
                    self.dropped += 1
                    return "cut"
                return "forward"
            if self.cut_request is not None:
                marker, nth = self.cut_request
                if upward and data.startswith(marker):
                    self.marker_count += 1
                    if self.marker_count == nth:
                        self.dropped += 1
                        return "cut"
                return "forward"
            if self.dropped:
                return "forward"
            if upward == self.upward and self.drop_after is not None and self.seen[upward] > self.drop_after:
                self.dropped += 1
                return "half"
            return "forward"

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool, conn: dict) -> None:
        pair = conn["pair"]
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                action = self._decide(data, upward, conn)
                if action == "answer":
                    assert self.answer is not None
                    src.sendall(self.answer[2])
                if action != "forward":
                    if action == "half":
                        dst.sendall(data[: len(data) // 2])
                    for s in pair:
                        with contextlib.suppress(OSError):
                            if upward:  # linger 0: the close is a reset, as a crashed peer's would be
                                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            # shutdown first: the pump blocked in recv() on the other socket would
                            # otherwise keep it open.
                            s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closing = True
        self.server.close()


# --- push ---------------------------------------------------------------------------------------------


def test_push_plain_http_pulls_back_valid_and_second_push_uploads_nothing(registry, tmp_path):
    require_tool("skopeo")
    image = small_image(tmp_path / "img")
    events = []
    result = push_image(image, f"docker://{registry.host}/app/one:1.0", options=plain_options(), progress=events.append)

    assert result.digest == image.manifest_digest
    assert set(result.uploaded_blobs) == image_blobs(image)
    assert result.skipped_blobs == [] and result.mounted_blobs == []
    assert image_blobs(image) <= registry.blobs_on_disk()
    assert events[-1].action == "manifest"
    assert registry.tags("app/one") == ["1.0"]

    index = pull_back_and_verify(registry, "app/one:1.0", tmp_path)
    assert index["manifests"][0]["digest"] == image.manifest_digest

    again = push_image(image, f"docker://{registry.host}/app/one:1.0", options=plain_options())
    assert again.uploaded_blobs == [] and again.uploaded_bytes == 0
    assert set(again.skipped_blobs) == image_blobs(image)
    assert again.digest == result.digest


def test_push_docker_manifest_format(registry, tmp_path):
    image = small_image(tmp_path / "img")
    result = push_image(image, f"{registry.host}/app/docker:2", manifest_format="docker", options=plain_options())
    raw = skopeo_inspect(
        f"docker://{registry.host}/app/docker:2", "--tls-verify=false", raw=True, authfile=registry.auth_file
    )
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert [layer["mediaType"] for layer in raw["layers"]] == ["application/vnd.docker.image.rootfs.diff.tar.gzip"] * 2
    assert result.digest == sha256_digest(canonical_json(raw))
    pull_back_and_verify(registry, "app/docker:2", tmp_path)


def test_push_mounts_blobs_known_in_another_repository(registry, tmp_path):
    image = small_image(tmp_path / "img")
    record = BlobRecord(tmp_path / "blobs.json")
    first = push_image(image, f"{registry.host}/team/base:1", options=plain_options(), blob_record=record)
    assert set(first.uploaded_blobs) == image_blobs(image)

    # A fresh record read back from disk, as the next build would.
    second = push_image(
        image, f"{registry.host}/team/other:1", options=plain_options(), blob_record=BlobRecord(tmp_path / "blobs.json")
    )
    assert set(second.mounted_blobs) == image_blobs(image)
    assert second.uploaded_blobs == [] and second.skipped_blobs == []
    pull_back_and_verify(registry, "team/other:1", tmp_path)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "monolithic"])
def test_push_survives_a_connection_reset_mid_upload(registry, tmp_path, chunked):
    image = big_image(tmp_path / "img")
    proxy = DroppingProxy(registry.host, drop_after=2 * 1024 * 1024)
    try:
        chunk = 256 * 1024 if chunked else 16 * 1024 * 1024
        result = push_image(
            image, f"{proxy.host}/big/img:1", options=plain_options(), tuning=PushTuning(chunk_size=chunk)
        )
    finally:
        proxy.close()
    assert proxy.dropped == 1, "the proxy never cut the upload: the test did not test anything"
    if chunked:
        assert result.resumed_uploads + result.restarted_uploads >= 1
    else:
        assert result.restarted_uploads >= 1
    assert set(result.uploaded_blobs) == image_blobs(image)
    index = pull_back_and_verify(registry, "big/img:1", tmp_path)
    assert index["manifests"][0]["digest"] == image.manifest_digest
    # What the registry holds is the exact blob, not a truncated or doubled one.
    big = image.layers[1]
    data = registry.storage / "docker/registry/v2/blobs/sha256" / big.digest[7:9] / big.digest[7:] / "data"
    assert hashlib.sha256(data.read_bytes()).hexdigest() == big.digest[7:]


def test_chunked_upload_resumes_from_the_registry_range(registry, tmp_path):
    """The connection breaks as a PATCH is sent: ask the registry how much it holds (GET on the upload,
    its Range) and go on from there, sending no chunk twice."""
    image = big_image(tmp_path / "img", size=2 * 1024 * 1024)
    big = image.layers[1]
    chunk = 128 * 1024
    proxy = DroppingProxy(registry.host, cut_request=(b"PATCH ", 4))
    try:
        result = push_image(
            image, f"{proxy.host}/big/resume:1", options=plain_options(), tuning=PushTuning(chunk_size=chunk)
        )
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert (result.resumed_uploads, result.restarted_uploads) == (1, 0)
    assert big.digest in result.uploaded_blobs
    chunks = -(-big.size // chunk)
    assert proxy.marker_count == chunks + 1  # every chunk reached the registry once
    pull_back_and_verify(registry, "big/resume:1", tmp_path)


def test_lost_answer_to_a_committed_upload_is_not_uploaded_again(registry, tmp_path):
    """The registry stored the blob but its answer to the final PUT never arrived: a HEAD shows the
    blob is there, so nothing is sent twice."""
    image = small_image(tmp_path / "img")
    proxy = DroppingProxy(registry.host, cut_response=(b"PUT /v2/lost/app/blobs/uploads/", 2))
    try:
        result = push_image(image, f"{proxy.host}/lost/app:1", options=plain_options())
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert proxy.marker_count == len(image_blobs(image))  # one PUT per blob, none repeated
    assert (result.resumed_uploads, result.restarted_uploads) == (0, 0)
    assert set(result.uploaded_blobs) == image_blobs(image)
    pull_back_and_verify(registry, "lost/app:1", tmp_path)


def test_chunked_upload_restarts_when_the_registry_dropped_the_upload(registry, tmp_path):
    """A request body cut mid-chunk leaves distribution's upload at an offset that no longer matches
    its upload state, and distribution cancels it: the client starts the blob again."""
    image = big_image(tmp_path / "img", size=2 * 1024 * 1024)
    proxy = DroppingProxy(registry.host, drop_after=1024 * 1024 + 300 * 1024)
    try:
        result = push_image(
            image, f"{proxy.host}/big/restart:1", options=plain_options(), tuning=PushTuning(chunk_size=128 * 1024)
        )
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert result.resumed_uploads + result.restarted_uploads >= 1
    pull_back_and_verify(registry, "big/restart:1", tmp_path)


@pytest.mark.parametrize(
    ("marker", "response"),
    [
        (
            b"HEAD ",
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        (
            b"PUT /v2/retry/app/manifests/",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ),
        (b"POST ", b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    ],
    ids=["429-on-HEAD", "503-on-manifest", "502-on-upload-start"],
)
def test_push_retries_429_and_5xx(registry, tmp_path, marker, response):
    image = small_image(tmp_path / "img")
    proxy = DroppingProxy(registry.host, answer=(marker, 1, response), times=2)
    try:
        result = push_image(image, f"{proxy.host}/retry/app:1", options=plain_options())
    finally:
        proxy.close()
    assert proxy.dropped == 2 and result.retries >= 2
    assert result.digest == image.manifest_digest
    pull_back_and_verify(registry, "retry/app:1", tmp_path)


def test_push_gives_up_on_a_registry_that_keeps_failing(registry, tmp_path):
    image = small_image(tmp_path / "img")
    response = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    proxy = DroppingProxy(registry.host, answer=(b"PUT /v2/down/app/manifests/", 1, response), times=100)
    try:
        with pytest.raises(BuildError) as err:
            push_image(image, f"{proxy.host}/down/app:1", options=plain_options())
    finally:
        proxy.close()
    assert proxy.dropped == FAST_RETRY.attempts
    assert str(err.value).startswith(f"registry {proxy.host}: pushing the manifest to down/app:1")
    assert "HTTP 503" in str(err.value)


def test_push_over_tls_with_cert_dir(registry_factory, tmp_path):
    reg = registry_factory(tls=True)
    image = small_image(tmp_path / "img")
    auth = AuthOptions(env={"HOME": "/nonexistent"})
    with pytest.raises(BuildError) as err:
        push_image(image, f"{reg.host}/tls/app:1", options=RegistryOptions(auth=auth, retry=FAST_RETRY))
    message = str(err.value)
    assert f"registry {reg.host}: TLS failed" in message and "certificate verification failed" in message
    assert "--cert-dir" in message and "\n" not in message

    result = push_image(
        image, f"{reg.host}/tls/app:1", options=RegistryOptions(auth=auth, cert_dir=reg.cert_dir, retry=FAST_RETRY)
    )
    assert result.digest == image.manifest_digest
    pull_back_and_verify(reg, "tls/app:1", tmp_path)
    # --tls-verify=false against an https registry: https without verification, not plain http.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = push_image(image, f"{reg.host}/tls/app:1", options=RegistryOptions(auth=auth, tls_verify=False))
    assert again.uploaded_blobs == [] and again.digest == image.manifest_digest
    pulled = pull_image(
        f"{reg.host}/tls/app:1",
        dest_dir=tmp_path / "cache",
        architecture="amd64",
        options=RegistryOptions(auth=auth, cert_dir=reg.cert_dir),
    )
    assert pulled.digest == image.manifest_digest


def test_push_with_htpasswd_basic_auth_from_authfile(registry_factory, tmp_path, capsys):
    reg = registry_factory(auth=("builder", "s3cret-pw-123"))
    image = small_image(tmp_path / "img")
    result = push_image(
        image,
        f"{reg.host}/private/app:1",
        options=RegistryOptions(auth=AuthOptions(authfile=reg.auth_file), tls_verify=False, retry=FAST_RETRY),
    )
    assert result.digest == image.manifest_digest
    pull_back_and_verify(reg, "private/app:1", tmp_path, "--src-creds", "builder:s3cret-pw-123")
    pulled = pull_image(
        f"{reg.host}/private/app:1",
        dest_dir=tmp_path / "cache",
        architecture="amd64",
        options=RegistryOptions(auth=AuthOptions(authfile=reg.auth_file), tls_verify=False),
    )
    assert pulled.digest == image.manifest_digest

    # No credentials at all: the message says where we looked.
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    with pytest.raises(BuildError) as err:
        push_image(
            image,
            f"{reg.host}/private/app:2",
            options=RegistryOptions(auth=AuthOptions(env=env), tls_verify=False, retry=FAST_RETRY),
        )
    message = str(err.value)
    assert message.startswith(f"registry {reg.host}: authentication required (HTTP 401)")
    assert str(tmp_path / "run" / "containers" / "auth.json") in message
    assert str(tmp_path / "home" / ".docker" / "config.json") in message


def test_wrong_password_is_a_clear_error_without_the_secret(registry_factory, tmp_path, capsys):
    reg = registry_factory(auth=("builder", "right-password-1"))
    wrong = "Wr0ng-Secret-Value-42"
    authfile = tmp_path / "auth.json"
    authfile.write_text(
        json.dumps({"auths": {reg.host: {"auth": base64.b64encode(f"builder:{wrong}".encode()).decode()}}})
    )
    image = small_image(tmp_path / "img")
    options = RegistryOptions(auth=AuthOptions(authfile=authfile), tls_verify=False, retry=FAST_RETRY)
    with pytest.raises(BuildError) as err:
        push_image(image, f"{reg.host}/private/app:1", options=options)
    message = str(err.value)
    assert message == (
        f"registry {reg.host}: authentication failed (HTTP 401) for user 'builder' with "
        f"credentials from --authfile {authfile}"
    )
    for text in (message, repr(err.value), repr(options), capsys.readouterr().out):
        assert wrong not in text
        assert base64.b64encode(f"builder:{wrong}".encode()).decode() not in text
    assert reg.blobs_on_disk() == set()

    # Explicit --creds: same, and the secret never shows either.
    options = RegistryOptions(auth=AuthOptions(username="builder", password=wrong), tls_verify=False)
    with pytest.raises(BuildError) as err:
        push_image(image, f"{reg.host}/private/app:1", options=options)
    assert "credentials from --creds" in str(err.value)
    assert wrong not in str(err.value) and wrong not in repr(options)


def test_push_and_mount_with_bearer_token_auth(registry_factory, tmp_path):
    reg = registry_factory(auth=("ci", "token-pw-9"), token=True)
    image = small_image(tmp_path / "img")
    record = BlobRecord()
    options = RegistryOptions(auth=AuthOptions(authfile=reg.auth_file), tls_verify=False, retry=FAST_RETRY)
    first = push_image(image, f"{reg.host}/org/base:1", options=options, blob_record=record)
    assert set(first.uploaded_blobs) == image_blobs(image)
    second = push_image(image, f"{reg.host}/org/app:1", options=options, blob_record=record)
    assert set(second.mounted_blobs) == image_blobs(image)
    # One token covered the push to org/app and the pull from org/base that the mount needs.
    scopes = [{(s["name"], tuple(s["actions"])) for s in r.scopes} for r in reg.token_server.requests if r.granted]
    assert {("org/app", ("pull", "push")), ("org/base", ("pull",))} in scopes
    pull_back_and_verify(reg, "org/app:1", tmp_path, "--src-creds", "ci:token-pw-9")
    pulled = pull_image(f"{reg.host}/org/app:1", dest_dir=tmp_path / "cache", architecture="amd64", options=options)
    assert pulled.digest == image.manifest_digest and set(pulled.downloaded_blobs) == image_blobs(image)

    # Wrong password through the token server: the same clear error.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auths": {reg.host: {"username": "ci", "password": "nope-nope"}}}))
    with pytest.raises(BuildError) as err:
        push_image(
            image,
            f"{reg.host}/org/app:2",
            options=RegistryOptions(auth=AuthOptions(authfile=bad), tls_verify=False, retry=FAST_RETRY),
        )
    expected = f"registry {reg.host}: authentication failed (HTTP 401 from the token server) for user 'ci'"
    assert str(err.value).startswith(expected)
    assert "nope-nope" not in str(err.value)


def test_unreachable_registry(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image = small_image(tmp_path / "img")
    with pytest.raises(BuildError) as err:
        push_image(image, f"127.0.0.1:{port}/x/y:1", options=plain_options())
    assert str(err.value) == f"registry 127.0.0.1:{port} is unreachable: connection refused"


def test_manifest_rejected_names_the_registry_error(registry, tmp_path):
    image = small_image(tmp_path / "img")
    # A manifest naming blobs the registry does not have: distribution refuses it.
    with pytest.raises(BuildError) as err:
        push_manifest(
            f"{registry.host}/bad/app:1",
            image.manifest,
            "application/vnd.oci.image.manifest.v1+json",
            options=plain_options(),
        )
    message = str(err.value)
    assert message.startswith(
        f"registry {registry.host} rejected the manifest for bad/app:1: "
        "MANIFEST_BLOB_UNKNOWN: blob unknown to registry (sha256:"
    )
    assert message.endswith(" (and 2 more)") and "\n" not in message


# --- pull ---------------------------------------------------------------------------------------------


def test_pull_what_skopeo_pushed_and_second_pull_downloads_nothing(registry, tmp_path):
    image = small_image(tmp_path / "img", salt="pull")
    layout = write_oci_layout(image, tmp_path / "layout")
    skopeo_copy(
        f"oci:{layout}:{image.tag}",
        f"docker://{registry.host}/lib/base:3",
        "--dest-tls-verify=false",
        authfile=registry.auth_file,
    )
    remote = skopeo_inspect(f"docker://{registry.host}/lib/base:3", "--tls-verify=false", authfile=registry.auth_file)

    cache = tmp_path / "cache"
    pulled = pull_image(
        f"docker://{registry.host}/lib/base:3", dest_dir=cache, architecture="amd64", options=plain_options()
    )
    assert pulled.digest == remote["Digest"] == image.manifest_digest
    assert pulled.index_digest is None and pulled.resolved_digest == pulled.digest
    assert pulled.config == image.config and pulled.config_digest == image.config_digest
    assert [b.digest for b in pulled.layers] == [layer.digest for layer in image.layers]
    for blob in pulled.layers:
        assert "sha256:" + hashlib.sha256(blob.path.read_bytes()).hexdigest() == blob.digest
        assert blob.path == cache / "blobs/sha256" / blob.digest[7:]
    assert pulled.manifest == image.manifest
    assert set(pulled.downloaded_blobs) == image_blobs(image) and pulled.cached_blobs == []

    again = pull_image(
        f"{registry.host}/lib/base@{pulled.digest}", dest_dir=cache, architecture="amd64", options=plain_options()
    )
    assert again.downloaded_blobs == [] and again.downloaded_bytes == 0
    assert set(again.cached_blobs) == image_blobs(image)
    assert again.digest == pulled.digest


def _push_index(registry: Registry, tmp_path: Path) -> tuple[str, dict[str, Image]]:
    images = {}
    manifests = []
    for arch, variant in (("amd64", None), ("arm64", "v8"), ("arm", "v7")):
        img = make_image(tmp_path / arch, [{"arch": arch.encode()}], architecture=arch)
        push_image(img, f"{registry.host}/multi/app:{arch}", options=plain_options())
        platform = {"os": "linux", "architecture": arch, **({"variant": variant} if variant else {})}
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": img.manifest_digest,
                "size": len(img.manifest),
                "platform": platform,
            }
        )
        images[arch] = img
    index = canonical_json(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    )
    digest = push_manifest(
        f"{registry.host}/multi/app:latest", index, "application/vnd.oci.image.index.v1+json", options=plain_options()
    ).digest
    return digest, images


def test_pull_picks_architecture_from_an_index(registry, tmp_path):
    index_digest, images = _push_index(registry, tmp_path)
    pulled = pull_image(
        f"{registry.host}/multi/app", dest_dir=tmp_path / "c", architecture="arm64", options=plain_options()
    )
    assert pulled.index_digest == index_digest
    assert pulled.digest == images["arm64"].manifest_digest
    assert json.loads(pulled.config)["architecture"] == "arm64"

    pulled = pull_image(
        f"{registry.host}/multi/app:latest",
        dest_dir=tmp_path / "c",
        architecture="arm",
        variant="v7",
        options=plain_options(),
    )
    assert pulled.digest == images["arm"].manifest_digest

    with pytest.raises(BuildError) as err:
        pull_image(
            f"{registry.host}/multi/app:latest", dest_dir=tmp_path / "c", architecture="s390x", options=plain_options()
        )
    assert str(err.value) == (
        f"image {registry.host}/multi/app:latest has no linux/s390x manifest "
        "(available: linux/amd64, linux/arm/v7, linux/arm64/v8); "
        "set architecture (and variant) in the spec"
    )
    with pytest.raises(BuildError, match="has no linux/arm/v6 manifest"):
        pull_image(
            f"{registry.host}/multi/app:latest",
            dest_dir=tmp_path / "c",
            architecture="arm",
            variant="v6",
            options=plain_options(),
        )


def test_pull_single_manifest_of_another_architecture_is_refused(registry, tmp_path):
    img = make_image(tmp_path / "i", [{"a": b"a"}], architecture="arm64")
    push_image(img, f"{registry.host}/one/arch:1", options=plain_options())
    with pytest.raises(BuildError, match=r"is for arm64, not amd64"):
        pull_image(
            f"{registry.host}/one/arch:1", dest_dir=tmp_path / "c", architecture="amd64", options=plain_options()
        )


def test_pull_unknown_repository_and_tag(registry, tmp_path):
    with pytest.raises(BuildError) as err:
        pull_image(f"{registry.host}/no/such:1", dest_dir=tmp_path / "c", options=plain_options())
    assert str(err.value) == f"registry {registry.host}: repository no/such not found"
    img = small_image(tmp_path / "i")
    push_image(img, f"{registry.host}/has/tags:1", options=plain_options())
    with pytest.raises(BuildError) as err:
        pull_image(f"{registry.host}/has/tags:2", dest_dir=tmp_path / "c", options=plain_options())
    assert str(err.value) == f"registry {registry.host}: has/tags:2 not found (no such tag or digest)"


def test_pull_resumes_a_download_cut_by_a_reset(registry, tmp_path):
    image = big_image(tmp_path / "img", size=2 * 1024 * 1024)
    push_image(image, f"{registry.host}/dl/big:1", options=plain_options())
    # Cut the registry's answer once, a megabyte into the big layer: the puller asks for the rest.
    proxy = DroppingProxy(registry.host, drop_after=1024 * 1024, upward=False)
    try:
        pulled = pull_image(
            f"{proxy.host}/dl/big:1", dest_dir=tmp_path / "c", architecture="amd64", options=plain_options()
        )
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert pulled.resumed_downloads == 1
    assert pulled.digest == image.manifest_digest
    big = pulled.layers[1]
    assert "sha256:" + hashlib.sha256(big.path.read_bytes()).hexdigest() == image.layers[1].digest


def test_artifact_round_trip_for_a_layer_cache_record(registry, tmp_path):
    """What --cache-to/--cache-from need: push an OCI artifact (empty config, one JSON blob) with
    push_manifest, fetch it with pull_image; a missing one is a RegistryError with status 404."""
    record = canonical_json({"fingerprint-a": ["sha256:" + "1" * 64]})
    empty = b"{}"
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.nsbuild.cache.v1+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256_digest(empty), "size": 2},
            "layers": [
                {
                    "mediaType": "application/vnd.nsbuild.cache.v1+json",
                    "digest": sha256_digest(record),
                    "size": len(record),
                }
            ],
        }
    )
    ref = f"{registry.host}/cache/app:buildcache"
    with pytest.raises(RegistryError) as err:
        pull_image(ref, dest_dir=tmp_path / "c", options=plain_options())
    assert err.value.status == 404
    pushed = push_manifest(
        ref,
        manifest,
        "application/vnd.oci.image.manifest.v1+json",
        blobs={sha256_digest(empty): empty, sha256_digest(record): record},
        options=plain_options(),
    )
    fetched = pull_image(ref, dest_dir=tmp_path / "c", options=plain_options())
    assert fetched.digest == pushed.digest == sha256_digest(manifest)
    assert fetched.layers[0].path.read_bytes() == record


# --- as an unprivileged account -------------------------------------------------------------------------

_USER_SCRIPT = """
import json, sys
from pathlib import Path
from nsbuild.image.image import Image
from nsbuild.layer.layer import Blob, Layer
from nsbuild.registry import RegistryOptions, pull_image, push_image
spec = json.loads(sys.argv[1])
layers = [Layer(l["diff_id"], Blob(l["diff_id"], 0, None), Blob(l["digest"], l["size"], Path(l["path"])),
                l["media_type"], "test") for l in spec["layers"]]
image = Image("x", "1", layers, bytes.fromhex(spec["config"]), bytes.fromhex(spec["manifest"]))
options = RegistryOptions(tls_verify=False)
pushed = push_image(image, spec["ref"], options=options)
pulled = pull_image(spec["ref"], dest_dir=Path(spec["cache"]), architecture="amd64", options=options)
print(json.dumps({"pushed": pushed.digest, "uploaded": pushed.uploaded_blobs, "pulled": pulled.digest,
                  "cached": pulled.cached_blobs, "downloaded": pulled.downloaded_blobs}))
"""


def test_push_and_pull_as_an_unprivileged_user_with_docker_config(
    registry_factory, user_tmp, unprivileged_user, tmp_path
):
    """What a CI job does: an ordinary account, credentials in ~/.docker/config.json, no
    XDG_RUNTIME_DIR, no REGISTRY_AUTH_FILE."""
    reg = registry_factory(auth=("runner", "ci-pw-77"))
    work = user_tmp(unprivileged_user)
    image = small_image(work / "img")
    for path in (work / "img", *(layer.compressed.path for layer in image.layers)):
        path.chmod(0o755 if path.is_dir() else 0o644)
    home = user_tmp(unprivileged_user)
    run_as(["mkdir", "-p", str(home / ".docker")], unprivileged_user, check=True)
    run_as(
        ["sh", "-c", f"cat > {home}/.docker/config.json"],
        unprivileged_user,
        check=True,
        input=json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"runner:ci-pw-77").decode()}}}),
    )
    spec = {
        "layers": [
            {
                "diff_id": layer.diff_id,
                "digest": layer.digest,
                "size": layer.size,
                "path": str(layer.compressed.path),
                "media_type": layer.media_type,
            }
            for layer in image.layers
        ],
        "config": image.config.hex(),
        "manifest": image.manifest.hex(),
        "ref": f"docker://{reg.host}/ci/app:1",
        "cache": str(work / "cache"),
    }
    proc = run_as(
        [sys.executable, "-c", _USER_SCRIPT, json.dumps(spec)], unprivileged_user, env={"HOME": str(home)}, check=True
    )
    out = json.loads(proc.stdout)
    assert out["pushed"] == out["pulled"] == image.manifest_digest
    assert set(out["uploaded"]) == image_blobs(image)
    assert set(out["downloaded"]) == image_blobs(image) and out["cached"] == []
    pull_back_and_verify(reg, "ci/app:1", tmp_path, "--src-creds", "runner:ci-pw-77")
