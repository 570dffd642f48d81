"""nsbuild against a registry that lies, stalls and redirects (tests/support/hostile_registry.py), run
as the unprivileged test account: credentials stay with the registry's origin, every manifest,
index, config and blob is verified before use, hostile JSON and endless or stalled answers end in
one line and exit 1, transient failures are retried a bounded number of times, and no secret ever
reaches the output, the errors, --json or the cache.

Timeouts and retries are shortened through NSBUILD_REGISTRY_* so a stalled server fails in seconds.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.core import layer_tar, write_spec
from support.hostile_registry import OCI_INDEX, OCI_MANIFEST, HostileRegistry, SilentPort, digest_of
from support.users import account, run_nsbuild

from nsbuild.spec.spec import host_architecture

ARCH = host_architecture()
RETRIES = 3
FAST = {
    "NSBUILD_REGISTRY_TIMEOUT": "1",
    "NSBUILD_REGISTRY_CONNECT_TIMEOUT": "2",
    "NSBUILD_REGISTRY_RETRIES": str(RETRIES),
    "NSBUILD_REGISTRY_BACKOFF": "0",
}
USER, PASSWORD = "ci-robot", "S3cret-Pa55-7f1e"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
WRONG = "sha256:" + "0" * 64
# Hang guard for one nsbuild run against a server that may stall (a run takes ~1-5 s).
RUN_TIMEOUT = 120


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileRegistry]:
    reg = HostileRegistry()
    yield reg
    reg.stop()


@pytest.fixture
def work(user_with_subids: str | None, user_tmp) -> tuple[str | None, Path]:  # noqa: ANN001
    user = user_with_subids
    return user, user_tmp(user)


def nsbuild(args: list[str], user: str | None, **env: str) -> tuple[int, str, str]:
    proc = run_nsbuild(args, user, env={**FAST, **env}, timeout=RUN_TIMEOUT)
    return proc.returncode, proc.stdout, proc.stderr


def pull(
    reg: HostileRegistry, work: tuple[str | None, Path], ref: str, *extra: str, **env: str
) -> tuple[int, str, str, Path]:
    """`nsbuild layered` of a spec whose fromImage is `ref`, into an OCI layout, with a layer cache."""
    user, d = work
    spec = write_spec(d, {"name": "child", "tag": "1", "fromImage": ref, "config": {"Env": ["CHILD=1"]}})
    out = d / "out"
    tls = [f"--cert-dir={reg.cert_dir}"] if reg.cert_dir else ["--tls-verify=false"]
    code, stdout, stderr = nsbuild(
        ["layered", str(spec), "-o", f"oci:{out}:1", "-q", *tls, "--cache-dir", str(d / "cache"), *extra], user, **env
    )
    return code, stdout, stderr, out


def assert_one_line_failure(code: int, stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert code == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("nsbuild: error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, (needle, stderr)


def assert_nothing_bad_written(d: Path, out: Path) -> None:
    """No output image, and every blob the cache holds is exactly its digest (no temporary files)."""
    assert not out.exists()
    store = d / "cache" / "blobs" / "sha256"
    for p in store.iterdir() if store.exists() else []:
        assert not p.name.startswith("."), p
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, p


def base_image(reg: HostileRegistry, **kw: object) -> dict:
    return reg.add_image("base", "1", {"etc/base.txt": b"base\n"}, architecture=ARCH, **kw)


def check_pulled(out: Path, image: dict) -> None:
    index = json.loads((out / "index.json").read_text())
    manifest = json.loads((out / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    assert manifest["layers"][0]["digest"] == image["layer"]
    assert manifest["annotations"]["org.opencontainers.image.base.digest"] == image["manifest"]


# --- credentials stay with the registry they belong to ------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["http", "tls"])
def test_redirected_blob_get_carries_no_credentials(hostile: HostileRegistry, work, tmp_path: Path, tls: bool) -> None:
    reg = HostileRegistry(credentials=(USER, PASSWORD), tls_dir=work[1] / "tls" if tls else None)
    try:
        image = base_image(reg)
        if tls:
            reg.faults.redirect_scheme_port = True  # https -> plain http, same host, another port
        else:
            reg.faults.redirect_blobs = True  # -> 127.0.0.2
        code, _, stderr, out = pull(reg, work, reg.ref("base", "1"), f"--creds={USER}:{PASSWORD}")
        assert code == 0, stderr
        check_pulled(out, image)
        fetched = {r.path.split("?")[0].rsplit("/", 1)[-1] for r in reg.elsewhere_requests}
        assert fetched == {image["config"], image["layer"]}, reg.elsewhere_requests
        assert all("Authorization" not in r.headers for r in reg.elsewhere_requests), reg.elsewhere_requests
        # The registry itself did get them (else this test could not fail).
        assert any(r.headers.get("Authorization") == f"Basic {BASIC}" for r in reg.requests)
    finally:
        reg.stop()


def test_a_challenge_from_the_redirect_target_gets_no_credentials(work) -> None:
    """Object storage (or an attacker) behind a redirect answers 401 with a Bearer challenge of its
    own: answering it would send the registry's credentials to its realm."""
    reg = HostileRegistry(credentials=(USER, PASSWORD))
    try:
        image = base_image(reg)
        reg.faults.redirect_blobs = True
        reg.faults.elsewhere_challenge = True
        code, _, stderr, out = pull(reg, work, reg.ref("base", "1"), f"--creds={USER}:{PASSWORD}")
        assert all("Authorization" not in r.headers for r in reg.elsewhere_requests), reg.elsewhere_requests
        assert [r.path.split("?")[0] for r in reg.elsewhere_requests] == [f"/storage/{image['config']}"]
        assert_one_line_failure(code, stderr, reg.elsewhere, "401")
        assert_nothing_bad_written(work[1], out)
    finally:
        reg.stop()


def write_docker_archive(path: Path, files: dict[str, bytes]) -> None:
    tar = layer_tar(files)
    config = json.dumps(
        {"architecture": ARCH, "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [digest_of(tar)]}}
    ).encode()
    members = {
        "layer.tar": tar,
        "config.json": config,
        "manifest.json": json.dumps(
            [{"Config": "config.json", "RepoTags": ["app:1"], "Layers": ["layer.tar"]}]
        ).encode(),
    }
    with tarfile.open(path, "w") as out:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            out.addfile(info, io.BytesIO(data))
    path.chmod(0o644)


def push(reg: HostileRegistry, work: tuple[str | None, Path], *extra: str, **env: str) -> tuple[int, str, str]:
    user, d = work
    archive = d / "app.tar"
    if not archive.exists():
        write_docker_archive(archive, {"bin/app": b"app\n"})
    return nsbuild(
        [
            "push",
            str(archive),
            f"docker://{reg.host}/app:1",
            "--tls-verify=false",
            "-q",
            "--cache-dir",
            str(d / "cache"),
            *extra,
        ],
        user,
        **env,
    )


def test_upload_location_on_another_host_carries_no_credentials(work) -> None:
    reg = HostileRegistry(credentials=(USER, PASSWORD))
    try:
        reg.faults.upload_elsewhere = True
        code, stdout, stderr = push(reg, work, f"--creds={USER}:{PASSWORD}")
        assert code == 0, stderr
        puts = [r for r in reg.elsewhere_requests if r.method == "PUT"]
        assert len(puts) == 2, reg.elsewhere_requests  # config and layer, uploaded over there
        assert all("Authorization" not in r.headers for r in reg.elsewhere_requests)
        assert any(r.headers.get("Authorization") == f"Basic {BASIC}" for r in reg.requests)
        pushed = reg.manifests["app"]["1"][0]
        assert stdout.strip() == f"{reg.host}/app:1@{digest_of(pushed)}"
    finally:
        reg.stop()


def test_plain_http_token_realm_under_verified_tls_is_refused(work) -> None:
    reg = HostileRegistry(credentials=(USER, PASSWORD), tls_dir=work[1] / "tls")
    try:
        image = base_image(reg)
        reg.faults.bearer_realm = f"http://{reg.elsewhere}/token"
        code, _, stderr, out = pull(reg, work, reg.ref("base", "1"), f"--creds={USER}:{PASSWORD}")
        assert_one_line_failure(code, stderr, "plain http", reg.elsewhere, "--tls-verify=false")
        assert reg.elsewhere_requests == []  # the credentials went nowhere
        assert_nothing_bad_written(work[1], out)

        # --tls-verify=false covers the registry: then the user accepted plain http for it.
        spec = write_spec(work[1], {"name": "child", "tag": "1", "fromImage": reg.ref("base", "1")})
        code, _, stderr = nsbuild(
            [
                "layered",
                str(spec),
                "-o",
                f"oci:{out}:1",
                "-q",
                "--tls-verify=false",
                "--no-cache",
                f"--creds={USER}:{PASSWORD}",
            ],
            work[0],
        )
        assert code == 0, stderr
        check_pulled(out, image)
        assert [r.path.split("?")[0] for r in reg.elsewhere_requests] == ["/token"]
    finally:
        reg.stop()


# --- every byte is verified before it is used -----------------------------------------------------------


def _lie(reg: HostileRegistry, kind: str) -> tuple[str, str]:
    """Set up one lie; returns (the reference to pull, the digest the error must name)."""
    image = base_image(reg)
    if kind == "manifest-by-tag":
        reg.faults.announce_digest["1"] = WRONG
        return reg.ref("base", "1"), WRONG
    if kind == "manifest-by-digest":
        reg.faults.serve_instead[image["manifest"]] = image["manifest_bytes"] + b" "
        return reg.ref("base", image["manifest"]), image["manifest"]
    if kind == "index-by-tag":
        reg.add_index("base", "multi", [_entry(image)])
        reg.faults.announce_digest["multi"] = WRONG
        return reg.ref("base", "multi"), WRONG
    if kind == "manifest-from-index":
        reg.add_index("base", "multi", [_entry(image)])
        reg.faults.serve_instead[image["manifest"]] = image["manifest_bytes"].replace(b'"layers"', b'"layers" ')
        return reg.ref("base", "multi"), image["manifest"]
    digest = image[kind]  # "config" or "layer": same length, other bytes
    data = bytearray(reg.blobs[digest])
    data[-1] ^= 1
    reg.faults.serve_instead[digest] = bytes(data)
    return reg.ref("base", "1"), digest


def _entry(image: dict) -> dict:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": image["manifest"],
        "size": len(image["manifest_bytes"]),
        "platform": {"os": "linux", "architecture": ARCH},
    }


@pytest.mark.parametrize(
    "kind", ["manifest-by-tag", "manifest-by-digest", "index-by-tag", "manifest-from-index", "config", "layer"]
)
def test_bytes_that_do_not_match_their_digest_are_refused(hostile: HostileRegistry, work, kind: str) -> None:
    ref, digest = _lie(hostile, kind)
    code, _, stderr, out = pull(hostile, work, ref)
    assert_one_line_failure(code, stderr, digest)
    assert_nothing_bad_written(work[1], out)


DEEP = b"[" * 100_000 + b"]" * 100_000


def _hostile_manifest(reg: HostileRegistry, kind: str) -> str:
    """Install a hostile manifest/index/config (with true digests); returns what the error must say."""
    good = base_image(reg)
    cfg = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": good["config"],
        "size": len(reg.blobs[good["config"]]),
    }
    docs: dict[str, bytes] = {
        "manifest-list": b"[1, 2]",
        "manifest-deep": DEEP,
        "manifest-deep-inside": b'{"schemaVersion": 2, "config": ' + DEEP + b"}",
        "layers-object": json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": {"a": 1}}
        ).encode(),
        "size-string": json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {**cfg, "size": "12"}, "layers": []}
        ).encode(),
        "config-too-big": json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {**cfg, "size": 10**10}, "layers": []}
        ).encode(),
        "index-manifests-object": json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {"x": 1}}
        ).encode(),
        "index-entry-path-digest": json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": "../../../etc/passwd",
                        "size": 1,
                        "platform": {"os": "linux", "architecture": ARCH},
                    }
                ],
            }
        ).encode(),
    }
    says = {
        "manifest-list": "array, not an object",
        "manifest-deep": "nested too deeply",
        "manifest-deep-inside": "nested too deeply",
        "layers-object": "'layers' is not a list",
        "size-string": "no valid size",
        "config-too-big": "more than 4 MiB",
        "index-manifests-object": "'manifests' is not a list",
        "index-entry-path-digest": "no valid sha256 digest",
    }
    if kind in docs:
        media = OCI_INDEX if kind.startswith("index") else OCI_MANIFEST
        reg.add_manifest("base", "bad", docs[kind], media)
        return says[kind]
    if kind == "nested-index":
        inner = reg.add_index("base", None, [_entry(good)])
        body = reg.manifests["base"][inner][0]
        reg.add_index(
            "base",
            "bad",
            [
                {
                    "mediaType": OCI_INDEX,
                    "digest": inner,
                    "size": len(body),
                    "platform": {"os": "linux", "architecture": ARCH},
                }
            ],
        )
        return "nested indexes are not supported"
    if kind == "index-served-for-its-entry":
        # An index "pointing at itself": the entry's digest answered with the index's own bytes.
        index = reg.add_index("base", "bad", [_entry(good)])
        reg.faults.serve_instead[good["manifest"]] = reg.manifests["base"][index][0]
        return good["manifest"]
    configs = {
        "config-list": (b"[]", "array, not an object"),
        "config-deep": (b'{"a": ' + DEEP + b"}", "too deeply"),
        "config-diff-ids-string": (
            json.dumps({"architecture": ARCH, "os": "linux", "rootfs": {"diff_ids": "x"}}).encode(),
            "rootfs.diff_ids",
        ),
        "config-config-list": (
            json.dumps(
                {"architecture": ARCH, "os": "linux", "config": [], "rootfs": {"diff_ids": [good["diff_id"]]}}
            ).encode(),
            "'config' is not a JSON object",
        ),
    }
    config, message = configs[kind]
    reg.add_image("base", "bad", {"etc/base.txt": b"base\n"}, architecture=ARCH, config=config)
    return message


@pytest.mark.parametrize(
    "kind",
    [
        "manifest-list",
        "manifest-deep",
        "manifest-deep-inside",
        "layers-object",
        "size-string",
        "config-too-big",
        "index-manifests-object",
        "index-entry-path-digest",
        "nested-index",
        "index-served-for-its-entry",
        "config-list",
        "config-deep",
        "config-diff-ids-string",
        "config-config-list",
    ],
)
def test_hostile_documents_end_in_one_line(hostile: HostileRegistry, work, kind: str) -> None:
    message = _hostile_manifest(hostile, kind)
    code, _, stderr, out = pull(hostile, work, hostile.ref("base", "bad"))
    assert_one_line_failure(code, stderr, message)
    assert_nothing_bad_written(work[1], out)


def test_an_answer_that_never_ends_is_cut_at_4_mib(hostile: HostileRegistry, work) -> None:
    base_image(hostile)
    hostile.faults.endless.add("/manifests/")
    code, _, stderr, out = pull(hostile, work, hostile.ref("base", "1"))
    assert_one_line_failure(code, stderr, "longer than 4 MiB", "/v2/base/manifests/1")
    assert_nothing_bad_written(work[1], out)


def test_an_answer_that_drips_is_cut_at_its_deadline(hostile: HostileRegistry, work) -> None:
    """A byte every 0.3 s never trips the 1 s read timeout; the answer as a whole has 10 of them."""
    base_image(hostile)
    hostile.faults.drip.add("/manifests/")
    code, _, stderr, out = pull(hostile, work, hostile.ref("base", "1"))
    assert_one_line_failure(code, stderr, "still arriving after 10 s", "NSBUILD_REGISTRY_TIMEOUT")
    assert_nothing_bad_written(work[1], out)


@pytest.mark.parametrize("where", ["/manifests/", "/blobs/"])
def test_a_stalled_registry_times_out_naming_the_timeout(hostile: HostileRegistry, work, where: str) -> None:
    image = base_image(hostile)
    hostile.faults.stall.add(where)
    code, _, stderr, out = pull(hostile, work, hostile.ref("base", "1"))
    assert_one_line_failure(code, stderr, "read timed out", "1 s", "NSBUILD_REGISTRY_TIMEOUT")
    if where == "/blobs/":
        assert image["config"] in stderr  # the first blob, cut half-way, then silence
    assert_nothing_bad_written(work[1], out)
    asked = [r for r in hostile.requests if where in r.path]
    assert len(asked) == RETRIES, asked  # bounded: one request per allowed attempt


def test_a_registry_that_never_answers_a_connect_times_out_naming_the_timeout(work) -> None:
    silent = SilentPort()
    try:
        spec = write_spec(work[1], {"name": "child", "tag": "1", "fromImage": f"docker://{silent.host}/base:1"})
        code, _, stderr = nsbuild(
            ["layered", str(spec), "-o", f"oci:{work[1] / 'out'}:1", "-q", "--no-cache", "--tls-verify=false"],
            work[0],
            NSBUILD_REGISTRY_CONNECT_TIMEOUT="1",
        )
        assert_one_line_failure(code, stderr, "connect timed out after 1 s", "NSBUILD_REGISTRY_CONNECT_TIMEOUT")
        assert not (work[1] / "out").exists()
    finally:
        silent.close()


def test_a_bad_timeout_setting_is_a_usage_error(hostile: HostileRegistry, work) -> None:
    base_image(hostile)
    code, _, stderr, _ = pull(hostile, work, hostile.ref("base", "1"), NSBUILD_REGISTRY_TIMEOUT="soon")
    assert code == 2 and "NSBUILD_REGISTRY_TIMEOUT" in stderr and "Traceback" not in stderr, stderr


# --- retries ---------------------------------------------------------------------------------------------


def test_pull_survives_5xx_answers_and_dropped_connections(hostile: HostileRegistry, work) -> None:
    image = base_image(hostile)
    f = hostile.faults
    f.fail.update({"GET /manifests/": 2, "GET /blobs/": 1})
    f.drop.update({"GET /v2/base/blobs/": 1})
    code, _, stderr, out = pull(hostile, work, hostile.ref("base", "1"))
    assert code == 0, stderr
    check_pulled(out, image)
    assert set(f.fail.values()) == {0} and set(f.drop.values()) == {0}  # every fault fired


def test_retries_are_bounded(hostile: HostileRegistry, work) -> None:
    base_image(hostile)
    hostile.faults.fail["GET /manifests/"] = 1000
    code, _, stderr, out = pull(hostile, work, hostile.ref("base", "1"))
    assert_one_line_failure(code, stderr, "HTTP 503")
    assert len([r for r in hostile.requests if "/manifests/" in r.path]) == RETRIES


def test_push_survives_5xx_answers_and_dropped_connections(hostile: HostileRegistry, work) -> None:
    f = hostile.faults
    f.fail.update({"HEAD /blobs/": 1, "PUT /manifests/": 1, "GET /v2/": 1})
    f.drop.update({"PUT /blobs/uploads/": 1, "HEAD /blobs/": 1})
    code, stdout, stderr = push(hostile, work)
    assert code == 0, stderr
    assert set(f.fail.values()) == {0} and set(f.drop.values()) == {0}
    assert stdout.strip() == f"{hostile.host}/app:1@{digest_of(hostile.manifests['app']['1'][0])}"


@pytest.mark.parametrize("answer", ["wrong-digest", "no-digest-not-served", "no-digest-served"])
def test_push_succeeds_only_when_the_registry_holds_our_manifest(hostile: HostileRegistry, work, answer: str) -> None:
    f = hostile.faults
    f.manifest_put_digest = WRONG if answer == "wrong-digest" else ""
    f.manifest_head_missing = answer == "no-digest-not-served"
    code, stdout, stderr = push(hostile, work)
    if answer == "no-digest-served":
        assert code == 0, stderr
        assert stdout.strip().endswith(digest_of(hostile.manifests["app"]["1"][0]))
        return
    assert_one_line_failure(code, stderr, WRONG if answer == "wrong-digest" else "does not serve")
    assert stdout == ""


# --- secrets ----------------------------------------------------------------------------------------------


def _secret_forms() -> list[str]:
    return [PASSWORD, BASIC]


def _assert_no_secret_under(top: Path, skip: Path) -> None:
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            p = Path(dirpath, name)
            if p == skip or p.is_symlink():
                continue
            data = p.read_bytes()
            for secret in _secret_forms():
                assert secret.encode() not in data, p


def test_secrets_never_reach_output_errors_json_or_cache(work) -> None:
    user, d = work
    reg = HostileRegistry(credentials=(USER, PASSWORD))
    try:
        image = base_image(reg)
        authfile = d / "auth.json"
        authfile.write_text(json.dumps({"auths": {reg.host: {"auth": BASIC}}}))
        acc = account(user)
        os.chown(authfile, acc.uid, acc.gid)
        authfile.chmod(0o600)
        env = {"REGISTRY_AUTH_FILE": str(authfile)}
        reg.faults.echo_authorization = True  # the registry quotes our header back in its errors
        outputs = []
        code, stdout, stderr, out = pull(reg, work, reg.ref("base", "1"), "--json", **env)
        assert code == 0, stderr
        assert json.loads(stdout)["base"]["digest"] == image["manifest"]
        outputs += [stdout, stderr]
        reg.faults.fail["GET /manifests/"] = 1000  # an error that quotes the header
        code, stdout, stderr, _ = pull(reg, work, reg.ref("base", "1"), "--json", "--no-cache", **env)
        assert_one_line_failure(code, stderr, "HTTP 503", "<hidden>")
        outputs += [stdout, stderr]
        reg.faults.fail.clear()
        reg.faults.manifest_put_digest = WRONG
        code, stdout, stderr = push(reg, work, "--json", **env)
        assert code == 1, stderr
        outputs += [stdout, stderr]
        reg.faults.manifest_put_digest = None
        code, stdout, stderr = push(reg, work, "--json", f"--creds={USER}:{PASSWORD}")
        assert code == 0, stderr
        outputs += [stdout, stderr]
        # The secret did travel (to the registry only), so looking for it below means something.
        assert f"Basic {BASIC}" in reg.all_headers()
        for text in outputs:
            for secret in _secret_forms():
                assert secret not in text, text
        _assert_no_secret_under(d, skip=authfile)
    finally:
        reg.stop()


def test_the_fake_registry_tells_the_truth_unless_told_to_lie(hostile: HostileRegistry) -> None:
    """The other tests' refusals mean something only if the honest fake is accepted (see the
    successful pulls above) and its digests are true."""
    image = base_image(hostile)
    with urllib.request.urlopen(f"http://{hostile.host}/v2/base/manifests/1", timeout=10) as resp:
        assert resp.headers["Docker-Content-Digest"] == image["manifest"]
        assert digest_of(resp.read()) == image["manifest"]


# --- a shared layer cache (--cache-from) from a hostile registry ---------------------------------------

CACHE_MEDIA = "application/vnd.nsbuild.cache.config.v1+json"


def _cache_record(reg: HostileRegistry, kind: str) -> str:
    """A --cache-from record at base:cache that is wrong in one way; returns what the error must say."""
    if kind == "manifest-list":
        reg.add_manifest("base", "cache", b"[]")
        return "array, not an object"
    record = json.dumps({"format": "nsbuild-cache-v1", "layers": ["x"]}).encode()
    media = "text/plain" if kind == "config-media" else CACHE_MEDIA
    config = reg.add_blob(record if kind != "record-deep" else DEEP)
    size = len(reg.blobs[config])
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": media, "digest": config, "size": size},
        "layers": [],
    }
    reg.add_manifest("base", "cache", json.dumps(manifest).encode())
    return {
        "config-media": "not an nsbuild cache",
        "record-layers-list": "'layers' is not an object",
        "record-deep": "nested too deeply",
    }[kind]


@pytest.mark.parametrize("kind", ["manifest-list", "config-media", "record-layers-list", "record-deep"])
def test_a_hostile_cache_record_ends_in_one_line(hostile: HostileRegistry, work, kind: str) -> None:
    user, d = work
    message = _cache_record(hostile, kind)
    tree = d / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/app.conf").write_text("x=1\n")
    acc = account(user)
    for p in (tree, tree / "etc", tree / "etc/app.conf"):
        os.lchown(p, acc.uid, acc.gid)
    spec = write_spec(d, {"name": "app", "tag": "1", "contents": [str(tree)]})
    out = d / "out"
    code, _, stderr = nsbuild(
        [
            "layered",
            str(spec),
            "-o",
            f"oci:{out}:1",
            "-q",
            "--tls-verify=false",
            "--cache-dir",
            str(d / "cache"),
            f"--cache-from=docker://{hostile.host}/base:cache",
        ],
        user,
    )
    assert_one_line_failure(code, stderr, message)
    assert_nothing_bad_written(d, out)
