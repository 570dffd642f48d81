"""The image `config` is checked against the Docker Image Spec v1.3 / OCI image config before anything is
built (issue 10). A value docker or podman refuses (to load or to run) ends the build with exit 2 and one
line naming the field, and nothing is written; Go duration strings in Healthcheck become the integer
nanoseconds the spec requires, and the real clients load the result. A Healthcheck in an OCI output,
which has no such field, gets a warning naming the option that keeps it.

Every build runs as an unprivileged account.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support import UserTmpFactory, account, run_nsbuild, skopeo_inspect
from support.core import BUSYBOX, build, write_spec
from support.verifiers import docker_daemon, podman_store

# (case, config, field named in the message, a fragment of the message)
BAD_CONFIGS: list[tuple[str, dict[str, Any], str, str]] = [
    # Healthcheck durations: integer nanoseconds, or a Go duration string converted to them.
    (
        "hc-interval-words",
        {"Healthcheck": {"Interval": "30 seconds"}},
        "config.Healthcheck.Interval",
        'Go duration string such as "30s"',
    ),
    ("hc-interval-days", {"Healthcheck": {"Interval": "1d"}}, "config.Healthcheck.Interval", "Go duration"),
    ("hc-interval-float", {"Healthcheck": {"Interval": 3e10}}, "config.Healthcheck.Interval", "30000000000.0"),
    ("hc-interval-bool", {"Healthcheck": {"Interval": True}}, "config.Healthcheck.Interval", "got true"),
    ("hc-interval-list", {"Healthcheck": {"Interval": [30]}}, "config.Healthcheck.Interval", "nanoseconds"),
    ("hc-interval-negative", {"Healthcheck": {"Interval": -1000000000}}, "config.Healthcheck.Interval", "negative"),
    ("hc-interval-negative-text", {"Healthcheck": {"Interval": "-5s"}}, "config.Healthcheck.Interval", "negative"),
    (
        "hc-interval-seconds-as-int",
        {"Healthcheck": {"Interval": 30}},
        "config.Healthcheck.Interval",
        'did you mean "30s"?',
    ),
    ("hc-interval-under-1ms", {"Healthcheck": {"Interval": "2us"}}, "config.Healthcheck.Interval", "(= 2000 ns)"),
    ("hc-timeout-overflow", {"Healthcheck": {"Timeout": "3000000h"}}, "config.Healthcheck.Timeout", "at most"),
    ("hc-start-period", {"Healthcheck": {"StartPeriod": "5 m"}}, "config.Healthcheck.StartPeriod", "duration"),
    (
        "hc-start-interval-int64",
        {"Healthcheck": {"StartInterval": 2**63}},
        "config.Healthcheck.StartInterval",
        "at most 9223372036854775807",
    ),
    ("hc-retries-negative", {"Healthcheck": {"Retries": -1}}, "config.Healthcheck.Retries", "0 or more"),
    ("hc-retries-text", {"Healthcheck": {"Retries": "3"}}, "config.Healthcheck.Retries", "whole number"),
    ("hc-retries-float", {"Healthcheck": {"Retries": 1.5}}, "config.Healthcheck.Retries", "whole number"),
    # Healthcheck.Test: [], ["NONE"], ["CMD", argv...] or ["CMD-SHELL", command].
    (
        "hc-test-string",
        {"Healthcheck": {"Test": "curl -f http://localhost/"}},
        "config.Healthcheck.Test",
        "list of strings",
    ),
    (
        "hc-test-kind",
        {"Healthcheck": {"Test": ["curl", "-f", "http://localhost/"]}},
        "config.Healthcheck.Test[0]",
        '"NONE", "CMD" or "CMD-SHELL"',
    ),
    ("hc-test-cmd-alone", {"Healthcheck": {"Test": ["CMD"]}}, "config.Healthcheck.Test", "needs the command"),
    (
        "hc-test-shell-argv",
        {"Healthcheck": {"Test": ["CMD-SHELL", "curl", "-f"]}},
        "config.Healthcheck.Test",
        "exactly one",
    ),
    ("hc-test-none-args", {"Healthcheck": {"Test": ["NONE", "x"]}}, "config.Healthcheck.Test", "no arguments"),
    ("hc-unknown-key", {"Healthcheck": {"interval": "30s"}}, "config.Healthcheck.interval", "did you mean 'Interval'"),
    ("hc-type", {"Healthcheck": ["CMD", "true"]}, "config.Healthcheck", "object"),
    # StopSignal: a Linux signal name (SIG optional, any case) or 1..64, as docker and podman parse it.
    ("stop-signal-name", {"StopSignal": "SIGBOGUS"}, "config.StopSignal", "SIGTERM"),
    ("stop-signal-99", {"StopSignal": "99"}, "config.StopSignal", "1 to 64"),
    ("stop-signal-0", {"StopSignal": "0"}, "config.StopSignal", "1 to 64"),
    ("stop-signal-number", {"StopSignal": 15}, "config.StopSignal", "string"),
    # Paths.
    ("working-dir", {"WorkingDir": "app"}, "config.WorkingDir", "absolute"),
    ("volume-relative", {"Volumes": {"data": {}}}, "config.Volumes.data", "absolute"),
    ("volume-value", {"Volumes": {"/data": "rw"}}, 'config.Volumes["/data"]', "expected {}"),
    ("volumes-type", {"Volumes": ["/data"]}, "config.Volumes", "object"),
    # ExposedPorts: one port 1..65535 per key, /tcp, /udp or /sctp.
    ("port-range", {"ExposedPorts": {"8000-8010/tcp": {}}}, "config.ExposedPorts.8000-8010/tcp", "one port"),
    ("port-protocol", {"ExposedPorts": {"80/icmp": {}}}, "config.ExposedPorts.80/icmp", "/sctp"),
    ("port-upper-case", {"ExposedPorts": {"80/TCP": {}}}, 'config.ExposedPorts["80/TCP"]', "/tcp"),
    ("port-zero", {"ExposedPorts": {"0": {}}}, "config.ExposedPorts.0", "1 to 65535"),
    ("port-too-big", {"ExposedPorts": {"65536/udp": {}}}, "config.ExposedPorts.65536/udp", "1 to 65535"),
    ("port-value", {"ExposedPorts": {"80": {"HostPort": "8080"}}}, "config.ExposedPorts.80", "expected {}"),
    # Env, Labels, User, argv lists.
    ("env-nul", {"Env": ["A=x\0y"]}, "config.Env[0]", "NUL"),
    ("env-no-name", {"Env": ["=x"]}, "config.Env[0]", "NAME=value"),
    ("label-value", {"Labels": {"a": 1}}, "config.Labels", "string values"),
    ("label-nul", {"Labels": {"org.example.a": "x\0"}}, 'config.Labels["org.example.a"]', "NUL"),
    ("user-three-parts", {"User": "a:b:c"}, "config.User", '"uid:gid"'),
    ("user-space", {"User": "my user"}, "config.User", "no spaces"),
    ("user-empty-group", {"User": "1000:"}, "config.User", '"user:group"'),
    ("user-id-too-big", {"User": "4294967295"}, "config.User", "4294967294"),
    ("cmd-nul", {"Cmd": ["/bin/sh", "-c", "echo\0"]}, "config.Cmd[2]", "NUL"),
    ("entrypoint-type", {"Entrypoint": "/bin/sh"}, "config.Entrypoint", "list of strings"),
    ("shell-type", {"Shell": "/bin/sh -c"}, "config.Shell", "list of strings"),
    ("onbuild-type", {"OnBuild": [1]}, "config.OnBuild", "list of strings"),
    ("args-escaped-type", {"ArgsEscaped": "yes"}, "config.ArgsEscaped", "true or false"),
    ("unknown-key", {"Healthckeck": {}}, "config.Healthckeck", "did you mean 'Healthcheck'"),
    ("unknown-key-newline", {"a\nb": 1}, 'config["a\\nb"]', "unknown image config key"),
]

HEALTHCHECK_30S = {"Test": ["CMD-SHELL", "true"], "Interval": "30s"}


def project(user_tmp: UserTmpFactory, user: str | None) -> Path:
    """A tree with a static busybox as /bin/sh and /bin/true, owned by the account."""
    work = user_tmp(user)
    bin_dir = work / "rootfs" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "busybox").write_bytes(BUSYBOX.read_bytes())
    (bin_dir / "busybox").chmod(0o755)
    for name in ("sh", "true"):
        (bin_dir / name).symlink_to("busybox")
    (work / "out").mkdir()
    acc = account(user)
    if not acc.is_current:
        for path in [work / "out", *(p for p in (work / "rootfs").rglob("*")), work / "rootfs"]:
            os.lchown(path, acc.uid, acc.gid)
    return work


def spec_with(work: Path, config: dict[str, Any], **extra: Any) -> Path:
    return write_spec(
        work, {"name": "cfg", "tag": "t", "contents": ["rootfs"], "compressor": "none", "config": config, **extra}
    )


@pytest.mark.parametrize(("case", "config", "field", "fragment"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_field(
    user_with_subids: str | None, user_tmp: UserTmpFactory, case: str, config: dict[str, Any], field: str, fragment: str
) -> None:
    work = project(user_tmp, user_with_subids)
    proc = build(spec_with(work, config), work / "out" / "img.tar", user=user_with_subids, check=False)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nsbuild: error: {field}: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert not list((work / "out").iterdir()), "an output was written for a refused config"


# Edge cases the specs and the clients accept: each builds, and the config skopeo reads back holds the
# value as written (Go duration strings converted to nanoseconds).
VALID_CONFIGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "defaults",
        {"StopSignal": "TERM", "User": "nobody", "WorkingDir": "/", "Healthcheck": {"Test": []}},
        {"StopSignal": "TERM", "User": "nobody", "WorkingDir": "/", "Healthcheck": {"Test": []}},
    ),
    (
        "numbers",
        {
            "StopSignal": "9",
            "User": "0",
            "Healthcheck": {"Test": ["NONE"], "Interval": 1000000, "Timeout": 0, "Retries": 3},
        },
        {
            "StopSignal": "9",
            "User": "0",
            "Healthcheck": {"Test": ["NONE"], "Interval": 1000000, "Timeout": 0, "Retries": 3},
        },
    ),
    (
        "names",
        {
            "StopSignal": "sigkill",
            "User": "app:app",
            "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": "0s", "Timeout": "2h45m"},
        },
        {
            "StopSignal": "sigkill",
            "User": "app:app",
            "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 0, "Timeout": 9900 * 10**9},
        },
    ),
    (
        "everything",
        {
            "Cmd": ["/bin/sh", "-c", "echo ok"],
            "Entrypoint": [],
            "Env": ["A=", "B=x=y"],
            "User": "1000:1000",
            "WorkingDir": "/srv",
            "ExposedPorts": {"80": {}, "80/tcp": {}, "53/udp": {}, "132/sctp": {}, "65535/tcp": None},
            "Volumes": {"/data": {}, "/var/lib/x y": None},
            "Labels": {"org.example.a": "", "b": "x"},
            "StopSignal": "SIGRTMIN+3",
            "OnBuild": [],
            "Shell": ["/bin/sh", "-c"],
            "ArgsEscaped": False,
            "Healthcheck": {
                "Test": ["CMD", "/bin/true"],
                "Interval": "1m30s",
                "Timeout": "1.5h",
                "StartPeriod": "300ms",
                "StartInterval": "1500us",
                "Retries": 0,
            },
        },
        {
            "Cmd": ["/bin/sh", "-c", "echo ok"],
            "Entrypoint": [],
            "Env": ["A=", "B=x=y"],
            "User": "1000:1000",
            "WorkingDir": "/srv",
            "ExposedPorts": {"80": {}, "80/tcp": {}, "53/udp": {}, "132/sctp": {}, "65535/tcp": {}},
            "Volumes": {"/data": {}, "/var/lib/x y": {}},
            "Labels": {"org.example.a": "", "b": "x"},
            "StopSignal": "SIGRTMIN+3",
            "OnBuild": [],
            "Shell": ["/bin/sh", "-c"],
            "ArgsEscaped": False,
            "Healthcheck": {
                "Test": ["CMD", "/bin/true"],
                "Interval": 90 * 10**9,
                "Timeout": 5400 * 10**9,
                "StartPeriod": 300 * 10**6,
                "StartInterval": 1500 * 10**3,
                "Retries": 0,
            },
        },
    ),
]


@pytest.mark.parametrize(("case", "config", "expected"), VALID_CONFIGS, ids=[c[0] for c in VALID_CONFIGS])
def test_valid_edge_cases_build_and_load(
    user_with_subids: str | None, user_tmp: UserTmpFactory, case: str, config: dict[str, Any], expected: dict[str, Any]
) -> None:
    user = user_with_subids
    work = project(user_tmp, user)
    out = work / "out" / "img.tar"
    proc = build(spec_with(work, config), out, user=user)
    assert proc.stderr == "", proc.stderr
    inner = skopeo_inspect(f"docker-archive:{out}", "--config", raw=True, user=user)["config"]
    for key, value in expected.items():
        assert inner.get(key) == value, (key, inner.get(key))
    with podman_store(user) as store:
        image = store.load(out)
        store.podman("create", "--pull=never", image, "/bin/true")  # podman parses the StopSignal here


def podman_healthcheck(store: Any, image: str) -> Any:
    return json.loads(store.podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout)


def test_duration_string_becomes_nanoseconds_podman_loads(
    user_with_subids: str | None, user_tmp: UserTmpFactory
) -> None:
    """The image the issue reports: before, it built and `podman load` refused it ("cannot unmarshal
    string into Go struct field ... Interval of type time.Duration")."""
    user = user_with_subids
    work = project(user_tmp, user)
    out = work / "out" / "img.tar"
    build(spec_with(work, {"Cmd": ["/bin/sh"], "Healthcheck": HEALTHCHECK_30S}), out, user=user)
    config = skopeo_inspect(f"docker-archive:{out}", "--config", raw=True, user=user)["config"]
    assert config["Healthcheck"] == {"Test": ["CMD-SHELL", "true"], "Interval": 30000000000}
    with podman_store(user) as store:
        image = store.load(out)
        health = podman_healthcheck(store, image)
    assert health["Test"] == ["CMD-SHELL", "true"]
    assert health["Interval"] == 30000000000


def test_duration_string_becomes_nanoseconds_docker_loads(
    user_with_subids: str | None, user_tmp: UserTmpFactory
) -> None:
    """Built by the unprivileged account, loaded by a private dockerd (root only): it refused the old
    image ("json: cannot unmarshal string into Go struct field HealthConfig...")."""
    user = user_with_subids
    work = project(user_tmp, user)
    out = work / "out" / "img.tar"
    build(spec_with(work, {"Cmd": ["/bin/sh"], "Healthcheck": HEALTHCHECK_30S}), out, user=user)
    with docker_daemon() as docker:
        image = docker.load(out)
        inspected = docker.docker("image", "inspect", "--format", "{{json .Config.Healthcheck}}", image).stdout
        docker.docker("create", image)  # dockerd checks the healthcheck and the rest of the config here
    assert json.loads(inspected) == {"Test": ["CMD-SHELL", "true"], "Interval": 30000000000}


@pytest.mark.parametrize(
    ("output", "extra", "warns"),
    [
        ("oci-archive:{out}/img.oci.tar", (), "--format docker-archive"),
        ("oci:{out}/layout:t", (), "--format docker-archive"),
        ("{out}/img.tar", ("--format", "oci-archive"), "--format docker-archive"),
        ("{out}/img.tar", (), None),
        ("docker-archive:{out}/img.tar", (), None),
    ],
)
def test_healthcheck_in_oci_output_warns(
    user_with_subids: str | None, user_tmp: UserTmpFactory, output: str, extra: tuple[str, ...], warns: str | None
) -> None:
    user = user_with_subids
    work = project(user_tmp, user)
    proc = build(spec_with(work, {"Healthcheck": HEALTHCHECK_30S}), output.format(out=work / "out"), *extra, user=user)
    if warns is None:
        assert proc.stderr == "", proc.stderr
        return
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsbuild: warning: config.Healthcheck: "), proc.stderr
    assert warns in lines[0], lines[0]


def test_no_warning_without_healthcheck(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    work = project(user_tmp, user_with_subids)
    proc = build(spec_with(work, {"Cmd": ["/bin/sh"]}), f"oci-archive:{work}/out/img.oci.tar", user=user_with_subids)
    assert proc.stderr == "", proc.stderr


def test_podman_drops_healthcheck_of_oci_image(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """What the warning says, seen with the real client: the docker-archive keeps the check, the OCI
    archive of the same spec loses it."""
    user = user_with_subids
    work = project(user_tmp, user)
    spec = spec_with(work, {"Cmd": ["/bin/sh"], "Healthcheck": HEALTHCHECK_30S})
    build(spec, work / "out" / "img.tar", user=user)
    build(spec, f"oci-archive:{work}/out/img.oci.tar", user=user)
    with podman_store(user) as store:
        docker_image = store.load(work / "out" / "img.tar")
        assert podman_healthcheck(store, docker_image)["Interval"] == 30000000000
        oci_image = store.load(work / "out" / "img.oci.tar")
        assert podman_healthcheck(store, oci_image) is None


@pytest.mark.parametrize(("manifest_format", "warns"), [("oci", "--manifest-format docker"), ("docker", None)])
def test_healthcheck_pushed_as_oci_warns(
    user_with_subids: str | None, user_tmp: UserTmpFactory, registry: str, manifest_format: str, warns: str | None
) -> None:
    work = project(user_tmp, user_with_subids)
    proc = build(
        spec_with(work, {"Healthcheck": HEALTHCHECK_30S}, compressor="gz"),
        f"docker://{registry}/cfg:t",
        "--tls-verify=false",
        "--manifest-format",
        manifest_format,
        user=user_with_subids,
    )
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("nsbuild: warning:")]
    if warns is None:
        assert warnings == [], proc.stderr
    else:
        assert len(warnings) == 1 and warns in warnings[0], proc.stderr


def test_schema_describes_healthcheck() -> None:
    """`nsbuild schema` accepts what the build accepts (duration strings) and refuses unknown keys."""
    jsonschema = pytest.importorskip("jsonschema")
    proc = run_nsbuild(["schema"])
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    validator = jsonschema.validators.validator_for(doc)(doc)
    validator.validate({"name": "x", "config": {"Healthcheck": HEALTHCHECK_30S}})
    validator.validate({"name": "x", "config": {"Healthcheck": {"Interval": 30000000000, "Retries": 3}}})
    for bad in ({"interval": "30s"}, {"Interval": -1}, {"Retries": "3"}, {"Test": "true"}):
        assert list(validator.iter_errors({"name": "x", "config": {"Healthcheck": bad}})), bad


@pytest.mark.parametrize(("manifest_format", "warns"), [("oci", "--manifest-format docker"), ("docker", None)])
def test_nsbuild_push_of_healthcheck_image_as_oci_warns(
    user_with_subids: str | None, user_tmp: UserTmpFactory, registry: str, manifest_format: str, warns: str | None
) -> None:
    """`nsbuild push` of an existing docker-archive holding a Healthcheck: the same warning as a build."""
    user = user_with_subids
    work = project(user_tmp, user)
    archive = work / "out" / "img.tar"
    build(spec_with(work, {"Healthcheck": HEALTHCHECK_30S}), archive, user=user)
    args = ["push", str(archive), f"docker://{registry}/cfg:p", "--tls-verify=false", "-q"]
    proc = run_nsbuild([*args, "--manifest-format", manifest_format], user)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("nsbuild: warning:")]
    if warns is None:
        assert warnings == [], proc.stderr
    else:
        assert len(warnings) == 1 and warns in warnings[0], proc.stderr
