"""Reference parsing and credential lookup (no registry needed): the files skopeo and docker read, in
their order, and the credential helpers they run (real helper programs written by the test)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from nsbuild.errors import BuildError, UsageError
from nsbuild.registry.auth import AuthOptions, find_credential
from nsbuild.registry.client import parse_challenge
from nsbuild.registry.options import options_from_cli
from nsbuild.registry.reference import Reference, parse_reference


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", Reference("docker.io", "library/alpine", "latest")),
        ("docker://alpine:3.19", Reference("docker.io", "library/alpine", "3.19")),
        ("user/app", Reference("docker.io", "user/app", "latest")),
        ("index.docker.io/library/busybox:1", Reference("docker.io", "library/busybox", "1")),
        ("localhost/app", Reference("localhost", "app", "latest")),
        ("localhost:5000/a/b/c:v1.2_3", Reference("localhost:5000", "a/b/c", "v1.2_3")),
        ("127.0.0.1:5000/app", Reference("127.0.0.1:5000", "app", "latest")),
        ("ghcr.io/org/app@sha256:" + "a" * 64, Reference("ghcr.io", "org/app", None, "sha256:" + "a" * 64)),
        ("ghcr.io/org/app:t@sha256:" + "b" * 64, Reference("ghcr.io", "org/app", "t", "sha256:" + "b" * 64)),
        ("[::1]:5000/x", Reference("[::1]:5000", "x", "latest")),
    ],
)
def test_parse_reference(text, expected):
    assert parse_reference(text) == expected


def test_reference_properties():
    ref = parse_reference("alpine")
    assert ref.api_host == "registry-1.docker.io"
    assert str(ref) == "docker.io/library/alpine:latest"
    pinned = parse_reference("127.0.0.1:5000/app@sha256:" + "c" * 64)
    assert pinned.reference == "sha256:" + "c" * 64 and pinned.api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "docker://",
        "Upper/Case",
        "host:5000/app:bad:tag",
        "app@sha256:short",
        "app:" + "t" * 129,
        "host:5000/",
        "a//b",
        " app",
    ],
)
def test_parse_reference_rejects(text):
    with pytest.raises(UsageError) as err:
        parse_reference(text)
    assert "invalid image reference" in str(err.value)


def test_parse_challenge():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push repository:c:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push repository:c:pull",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


# --- credential files ------------------------------------------------------------------------------------


def _auth(user: str, password: str) -> dict:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def home(tmp_path) -> dict[str, str]:
    """An environment with its own HOME and XDG_RUNTIME_DIR (never the machine's credentials)."""
    (tmp_path / "home").mkdir()
    (tmp_path / "run").mkdir()
    return {
        "HOME": str(tmp_path / "home"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


def test_lookup_order_runtime_then_config_then_docker(tmp_path, home):
    reg = "reg.example:5000"
    docker = _write(tmp_path / "home/.docker/config.json", {"auths": {reg: _auth("d", "pd")}})
    lookup = find_credential(reg, "app", AuthOptions(env=home))
    assert (lookup.credential.username, lookup.credential.password) == ("d", "pd")
    assert lookup.credential.source == str(docker)

    _write(tmp_path / "home/.config/containers/auth.json", {"auths": {reg: _auth("c", "pc")}})
    assert find_credential(reg, "app", AuthOptions(env=home)).credential.username == "c"

    runtime = _write(tmp_path / "run/containers/auth.json", {"auths": {reg: _auth("r", "pr")}})
    lookup = find_credential(reg, "app", AuthOptions(env=home))
    assert lookup.credential.username == "r" and lookup.tried == [str(runtime)]

    # Another registry: every file is tried, none has it.
    lookup = find_credential("other.example", "app", AuthOptions(env=home))
    assert lookup.credential is None
    assert lookup.tried == [str(runtime), str(tmp_path / "home/.config/containers/auth.json"), str(docker)]


def test_authfile_and_registry_auth_file_are_exclusive(tmp_path, home):
    reg = "reg.example"
    _write(tmp_path / "run/containers/auth.json", {"auths": {reg: _auth("r", "pr")}})
    env_file = _write(tmp_path / "env.json", {"auths": {reg: _auth("e", "pe")}})
    flag_file = _write(tmp_path / "flag.json", {"auths": {}})
    env = {**home, "REGISTRY_AUTH_FILE": str(env_file)}

    lookup = find_credential(reg, "app", AuthOptions(env=env))
    assert lookup.credential.username == "e" and lookup.credential.source == f"REGISTRY_AUTH_FILE={env_file}"
    # --authfile wins over the variable, and is the only file read.
    lookup = find_credential(reg, "app", AuthOptions(env=env, authfile=flag_file))
    assert lookup.credential is None and lookup.tried == [f"--authfile {flag_file}"]


def test_docker_hub_legacy_key_and_namespaced_keys(tmp_path, home):
    _write(
        tmp_path / "home/.docker/config.json",
        {
            "auths": {
                "https://index.docker.io/v1/": _auth("hub", "ph"),
                "reg.example": _auth("all", "pa"),
                "reg.example/team": _auth("team", "pt"),
                "reg.example/team/app": _auth("app", "pp"),
                "http://plain.example:5000/": {"username": "u", "password": "p"},
            }
        },
    )
    opts = AuthOptions(env=home)
    assert find_credential("docker.io", "library/alpine", opts).credential.username == "hub"
    assert find_credential("reg.example", "team/app", opts).credential.username == "app"
    assert find_credential("reg.example", "team/other", opts).credential.username == "team"
    assert find_credential("reg.example", "teammate/x", opts).credential.username == "all"
    assert find_credential("plain.example:5000", "x", opts).credential.password == "p"


def _helper(bindir: Path, name: str, script: str) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_cred_helpers_and_creds_store(tmp_path, home):
    bindir = tmp_path / "bin"
    # A helper that answers for one server and says "not found" for the rest, as real helpers do.
    _helper(
        bindir,
        "nsbtest",
        """
test "$1" = get || exit 2
read server
echo "$server" >> "$(dirname "$0")/asked"
case "$server" in
  reg.example) echo '{"ServerURL":"reg.example","Username":"helped","Secret":"h-secret"}';;
  https://index.docker.io/v1/) echo '{"ServerURL":"hub","Username":"<token>","Secret":"refresh-tok"}';;
  *) echo "credentials not found in native keychain" >&2; exit 1;;
esac
""",
    )
    env = {**home, "PATH": f"{bindir}:{home['PATH']}"}
    config = _write(
        tmp_path / "home/.docker/config.json",
        {
            "auths": {"reg.example": _auth("ignored", "x"), "other.example": _auth("o", "po")},
            "credHelpers": {"reg.example": "nsbtest"},
        },
    )
    cred = find_credential("reg.example", "app", AuthOptions(env=env)).credential
    assert (cred.username, cred.password) == ("helped", "h-secret")
    assert cred.source == f"{config} (credential helper docker-credential-nsbtest)"
    assert "h-secret" not in repr(cred)
    assert find_credential("other.example", "app", AuthOptions(env=env)).credential.username == "o"

    _write(tmp_path / "home/.docker/config.json", {"credsStore": "nsbtest"})
    cred = find_credential("docker.io", "library/alpine", AuthOptions(env=env)).credential
    assert cred.identity_token and cred.password == "refresh-tok"
    assert find_credential("nowhere.example", "x", AuthOptions(env=env)).credential is None
    assert (bindir / "asked").read_text().splitlines() == [
        "reg.example",
        "https://index.docker.io/v1/",
        "nowhere.example",
    ]


def test_missing_or_failing_helper_is_a_clear_error(tmp_path, home):
    _write(tmp_path / "home/.docker/config.json", {"credHelpers": {"reg.example": "absent"}})
    with pytest.raises(BuildError, match=r"credential helper docker-credential-absent named in .* is not on PATH"):
        find_credential("reg.example", "app", AuthOptions(env=home))

    bindir = tmp_path / "bin"
    _helper(bindir, "broken", 'echo "keychain locked" >&2; exit 3\n')
    _write(tmp_path / "home/.docker/config.json", {"credsStore": "broken"})
    with pytest.raises(BuildError, match=r"docker-credential-broken failed for reg.example: keychain locked"):
        find_credential("reg.example", "app", AuthOptions(env={**home, "PATH": f"{bindir}:{home['PATH']}"}))


def test_bad_auth_files(tmp_path, home):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BuildError, match="cannot read auth file"):
        find_credential("r.example", "a", AuthOptions(env=home, authfile=bad))
    _write(bad, {"auths": {"r.example": {"auth": base64.b64encode(b"no-colon").decode()}}})
    with pytest.raises(BuildError, match="not base64 of user:password") as err:
        find_credential("r.example", "a", AuthOptions(env=home, authfile=bad))
    assert "no-colon" not in str(err.value)


def test_secrets_stay_out_of_reprs(tmp_path, home):
    opts = AuthOptions(username="u", password="very-secret", env={**home, "TOKEN": "env-secret"})
    cred = find_credential("r.example", "a", opts).credential
    for text in (repr(opts), repr(cred), str(cred)):
        assert "very-secret" not in text and "env-secret" not in text


def test_options_from_cli(tmp_path):
    opts = options_from_cli(creds="me:pa:ss", tls_verify=False, cert_dir=tmp_path)
    assert (opts.auth.username, opts.auth.password, opts.tls_verify, opts.cert_dir) == ("me", "pa:ss", False, tmp_path)
    assert "pa:ss" not in repr(opts)
    with pytest.raises(UsageError, match="--creds must be USER:PASSWORD"):
        options_from_cli(creds="nopassword")
    with pytest.raises(UsageError, match="does not exist"):
        options_from_cli(authfile=tmp_path / "missing.json")
