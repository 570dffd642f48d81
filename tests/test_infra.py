"""The test infrastructure itself, checked with the real tools: the accounts are what the rootless
tests assume, the verifiers accept good images and reject broken ones, the registry works with
skopeo (plain, basic auth + TLS, bearer tokens)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    ACCOUNTS,
    UserTmpFactory,
    account,
    bsdtar_extract,
    bsdtar_list,
    check_all_layers,
    docker_daemon,
    gnutar_extract,
    image_layers,
    is_root,
    make_user_tmp,
    nsbuild_cmd,
    oci_manifest,
    oci_validate,
    podman_load_and_run,
    popen_as,
    processes_of,
    remove_tree,
    run_as,
    run_nsbuild,
    run_tool,
    skopeo_copy,
    skopeo_inspect,
    subid_count,
    umoci_unpack,
)
from support.registry import RegistryFactory

BUSYBOX = Path("/bin/busybox")
ODD_NAME = "üñ\ttab name"


def subid_range(acc_name: str, uid: int, path: str) -> tuple[int, int]:
    """The first (start, count) range of at least 65536 ids of an account in /etc/subuid or /etc/subgid."""
    for line in Path(path).read_text().splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (acc_name, str(uid)) and int(fields[2]) >= 65536:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"no range for {acc_name} in {path}")


# --- accounts ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not is_root(), reason="the test accounts are created and switched to by root only")
def test_accounts_exist_with_and_without_subids() -> None:
    test, nosub = account("test"), account("nosub")
    for acc in (test, nosub):
        assert acc.uid != 0 and acc.gid != 0, acc
        assert acc.home.is_dir() and acc.home.stat().st_uid == acc.uid, acc
    assert subid_count(test.name, test.uid, "/etc/subuid") >= 65536
    assert subid_count(test.name, test.uid, "/etc/subgid") >= 65536
    assert subid_count(nosub.name, nosub.uid, "/etc/subuid") == 0
    assert subid_count(nosub.name, nosub.uid, "/etc/subgid") == 0
    assert set(ACCOUNTS.values()) == {test.name, nosub.name}


def test_runs_unprivileged_with_clean_environment(unprivileged_user: str | None) -> None:
    acc = account(unprivileged_user)
    os.environ["NSBUILD_TEST_LEAK"] = "1"
    try:
        proc = run_as(
            ["sh", "-c", "id -u; id -g; umask; env"],
            unprivileged_user,
            umask=0o077,
            tz="Pacific/Kiritimati",
            check=True,
        )
    finally:
        del os.environ["NSBUILD_TEST_LEAK"]
    uid, gid, umask, *env_lines = proc.stdout.splitlines()
    assert (int(uid), int(gid)) == (acc.uid, acc.gid)
    assert acc.uid != 0
    assert umask == "0077"
    env = dict(line.split("=", 1) for line in env_lines if "=" in line)
    assert env["HOME"] == str(acc.home)
    assert env["LANG"] == "C.UTF-8"
    assert env["TZ"] == "Pacific/Kiritimati"
    assert "NSBUILD_TEST_LEAK" not in env
    assert not any(k.startswith("PYTEST") for k in env)


def test_unprivileged_chown_is_refused(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    acc = account(unprivileged_user)
    work = user_tmp(unprivileged_user)
    assert work.stat().st_uid == acc.uid
    proc = run_as(["sh", "-c", "touch f && chown 12345:12345 f"], unprivileged_user, cwd=work)
    assert proc.returncode != 0, proc
    assert "Operation not permitted" in proc.stderr
    st = (work / "f").stat()
    assert (st.st_uid, st.st_gid) == (acc.uid, acc.gid)


def test_user_namespace_maps_caller_to_root(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    acc = account(unprivileged_user)
    work = user_tmp(unprivileged_user)
    proc = run_as(
        ["unshare", "--user", "--map-root-user", "sh", "-c", "id -u; touch f; stat -c %u f"],
        unprivileged_user,
        cwd=work,
        check=True,
    )
    assert proc.stdout.split() == ["0", "0"]
    assert (work / "f").stat().st_uid == acc.uid  # namespace-root is the caller on disk


def _map_subids(user: str | None, work: Path) -> tuple[int, object]:
    """Map 65536 subordinate ids with newuidmap/newgidmap (unshare --map-users calls them) and chown
    to one of them. Without a range of its own the caller asks for 100000.. (and must be refused)."""
    acc = account(user)
    starts = []
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            starts.append(subid_range(acc.name, acc.uid, path)[0])
        except AssertionError:
            starts.append(100000)
    proc = run_as(
        [
            "unshare",
            "--user",
            "--map-root-user",
            f"--map-users={starts[0]},1,65536",
            f"--map-groups={starts[1]},1,65536",
            "sh",
            "-c",
            "touch f && chown 1000:1000 f && stat -c %u:%g f",
        ],
        user,
        cwd=work,
    )
    return starts[0], proc


def test_newuidmap_usable_with_subids(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    work = user_tmp(user_with_subids)
    start, proc = _map_subids(user_with_subids, work)
    assert proc.returncode == 0, proc
    assert proc.stdout.strip() == "1000:1000"
    assert (work / "f").stat().st_uid == start + 999  # a subordinate id on disk
    # ...and user_tmp removes it although the caller cannot (checked by the fixture's cleanup).


def test_newuidmap_refused_without_subids(user_without_subids: str | None, user_tmp: UserTmpFactory) -> None:
    work = user_tmp(user_without_subids)
    _, proc = _map_subids(user_without_subids, work)
    assert proc.returncode != 0
    assert "newuidmap" in proc.stderr and "not allowed" in proc.stderr, proc.stderr


def test_user_tmp_removes_subordinate_owned_and_readonly_trees(user_with_subids: str | None) -> None:
    factory = UserTmpFactory()
    work = factory(user_with_subids)
    run_as(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--map-auto",
            "sh",
            "-c",
            "mkdir -p a/b && touch a/b/f && chown -R 1234:1234 a && chmod 0555 a/b a",
        ],
        user_with_subids,
        cwd=work,
        check=True,
    )
    assert (work / "a").stat().st_uid not in (0, account(user_with_subids).uid)
    factory.cleanup()
    assert not work.exists()


def test_venv_and_project_reachable_by_unprivileged_users(unprivileged_user: str | None) -> None:
    proc = run_as(
        [f"{os.path.dirname(nsbuild_cmd()[0])}/python", "-c", "import nsbuild, sys; print(sys.prefix)"],
        unprivileged_user,
    )
    assert proc.returncode == 0, (
        f"the venv or the project is not readable by {account(unprivileged_user).name}:\n{proc.stderr}"
    )


def test_nsbuild_cli_runs_unprivileged(unprivileged_user: str | None) -> None:
    proc = run_nsbuild(["--help"], unprivileged_user)
    assert proc.returncode == 0, proc.stderr
    assert "layered" in proc.stdout


# --- images for the verifier tests ------------------------------------------------------------------


def _tar_entry(
    t: tarfile.TarFile,
    name: str,
    typ: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    uid: int = 0,
    gid: int = 0,
    mode: int = 0o644,
    link: str = "",
    pax: dict[str, str] | None = None,
) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.uid, ti.gid, ti.mode, ti.size, ti.linkname, ti.mtime = typ, uid, gid, mode, len(data), link, 1
    if pax:
        ti.pax_headers = pax
    t.addfile(ti, io.BytesIO(data) if typ == tarfile.REGTYPE else None)


def write_layer(path: Path, unsafe: str | None = None) -> Path:
    """A layer with a runnable busybox and owners/modes/xattrs the verifiers must report."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        _tar_entry(t, "bin", tarfile.DIRTYPE, mode=0o755)
        _tar_entry(t, "bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755)
        _tar_entry(t, "bin/sh", tarfile.SYMTYPE, link="busybox")
        _tar_entry(t, "home", tarfile.DIRTYPE, mode=0o755)
        _tar_entry(t, "home/alice", tarfile.DIRTYPE, uid=1000, gid=1000, mode=0o700)
        _tar_entry(t, "home/alice/suid", data=b"x", uid=1000, gid=100, mode=0o4755)
        _tar_entry(t, "home/alice/lnk", tarfile.SYMTYPE, link="suid", uid=12345, gid=12345)
        _tar_entry(t, "home/alice/xattr", data=b"x", gid=5, mode=0o600, pax={"SCHILY.xattr.user.foo": "bar"})
        _tar_entry(t, f"home/alice/{ODD_NAME}", uid=65534, gid=65534)
        if unsafe:
            _tar_entry(t, unsafe, data=b"evil")
    return path


def make_oci(d: Path, tag: str = "t", unsafe: str | None = None) -> Path:
    """An OCI layout built with umoci (not nsbuild) holding write_layer()."""
    layout = d / "oci"
    run_tool(["umoci", "init", "--layout", layout])
    run_tool(["umoci", "new", "--image", f"{layout}:{tag}"])
    run_tool(["umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", write_layer(d / "layer.tar", unsafe)])
    run_tool(
        [
            "umoci",
            "config",
            "--image",
            f"{layout}:{tag}",
            "--config.cmd",
            "/bin/busybox",
            "--config.cmd",
            "echo",
            "--config.cmd",
            "hello from the tiny image",
        ]
    )
    run_tool(["chmod", "-R", "a+rX", d])
    return layout


@pytest.fixture(scope="module")
def tiny_oci() -> Iterator[Path]:
    d = make_user_tmp(None, prefix="nsbuild-tiny-")
    try:
        yield make_oci(d)
    finally:
        remove_tree(d)


@pytest.fixture(scope="module")
def tiny_archive(tiny_oci: Path) -> Path:
    archive = tiny_oci.parent / "tiny.tar"
    skopeo_copy(f"oci:{tiny_oci}:t", f"docker-archive:{archive}:localhost/tiny:t")
    archive.chmod(0o644)
    return archive


# --- verifiers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["root", "unprivileged"])
def test_umoci_unpack_reports_image_owners(
    tiny_oci: Path, user_tmp: UserTmpFactory, who: str, user_with_subids: str | None
) -> None:
    user = None if who == "root" else user_with_subids
    if who == "root" and not is_root():
        pytest.skip("the root variant needs root")
    bundle = user_tmp(user) / "bundle"
    entries = umoci_unpack(tiny_oci, "t", bundle, user=user)
    alice = entries["home/alice"]
    assert (alice.type, alice.mode, alice.uid, alice.gid) == ("dir", 0o700, 1000, 1000)
    suid = entries["home/alice/suid"]
    assert (suid.type, suid.mode, suid.uid, suid.gid, suid.size) == ("file", 0o4755, 1000, 100, 1)
    x = entries["home/alice/xattr"]
    assert (x.uid, x.gid, x.mode, x.xattrs) == (0, 5, 0o600, {"user.foo": b"bar"})
    odd = entries[f"home/alice/{ODD_NAME}"]
    assert (odd.uid, odd.gid) == (65534, 65534)
    lnk = entries["home/alice/lnk"]
    assert (lnk.type, lnk.link, lnk.uid) == ("link", "suid", None)
    assert entries["bin/busybox"].mode == 0o755 and entries["bin/busybox"].uid == 0


def test_oci_validate_and_skopeo_accept_good_image(tiny_oci: Path, tiny_archive: Path, tmp_path: Path) -> None:
    oci_validate(tiny_oci)
    skopeo_copy(f"docker-archive:{tiny_archive}", f"oci:{tmp_path}/copy:t")
    oci_validate(tmp_path / "copy")
    # an OCI archive is extracted first
    skopeo_copy(f"oci:{tiny_oci}:t", f"oci-archive:{tmp_path}/img.oci.tar:t")
    oci_validate(tmp_path / "img.oci.tar")


def test_verifiers_reject_corrupted_blob(tiny_oci: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_oci, broken)
    layer = image_layers(broken, tmp_path / "w")[0]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.chmod(0o644)
    layer.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="umoci unpack"):
        umoci_unpack(broken, "t", tmp_path / "bundle")
    with pytest.raises(AssertionError, match="oci-image-tool"):
        oci_validate(broken)
    with pytest.raises(AssertionError, match="skopeo copy"):
        skopeo_copy(f"oci:{broken}:t", f"docker-archive:{tmp_path}/x.tar")


def test_tar_readers_accept_good_layers(tiny_oci: Path, tiny_archive: Path, tmp_path: Path) -> None:
    for image in (tiny_oci, tiny_archive):
        (names,) = check_all_layers(image, tmp_path / image.name)
        assert "bin/busybox" in names
    out = tmp_path / "bsd"
    layer = image_layers(tiny_oci, tmp_path / "w")[0]
    bsdtar_extract(layer, out)
    assert (out / "bin/busybox").read_bytes() == BUSYBOX.read_bytes()
    if is_root():
        assert (out / "home/alice/suid").stat().st_uid == 1000


@pytest.mark.parametrize("unsafe", ["../escape", "/abs/file", "a/../../b"])
def test_tar_readers_reject_unsafe_names(tmp_path: Path, unsafe: str) -> None:
    layer = write_layer(tmp_path / "layer.tar", unsafe)
    with pytest.raises(AssertionError, match="unsafe member names"):
        bsdtar_list(layer)
    with pytest.raises(AssertionError, match="unsafe member names"):
        gnutar_extract(layer, tmp_path / "gnu")
    assert not (tmp_path / "escape").exists()


def test_podman_runs_image_as_root_and_unprivileged(
    tiny_archive: Path, tiny_oci: Path, user_with_subids: str | None, require_podman: None
) -> None:
    out = podman_load_and_run(
        tiny_archive, ["/bin/busybox", "stat", "-c", "%u:%g %a", "/home/alice/suid"], user=user_with_subids
    )
    assert out.strip() == "1000:100 4755"
    if is_root():
        assert podman_load_and_run(f"{tiny_oci}:t").strip() == "hello from the tiny image"


def test_podman_runs_oci_layout_whatever_its_path(
    tiny_oci: Path, tmp_path: Path, require_podman: None, user_with_subids: str | None, user_tmp: UserTmpFactory
) -> None:
    # podman names an image pulled from oci:DIR after DIR; "odd_" is not a valid reference component.
    odd = user_tmp(user_with_subids) / "Odd_" / "layout_"
    shutil.copytree(tiny_oci, odd)
    run_tool(["chmod", "-R", "a+rX", odd.parent])
    assert podman_load_and_run(f"{odd}:t", user=user_with_subids).strip() == "hello from the tiny image"
    assert podman_load_and_run(odd, user=user_with_subids).strip() == "hello from the tiny image"


def test_podman_run_failure_is_reported(tiny_archive: Path, require_podman: None) -> None:
    with pytest.raises(AssertionError, match="exit status"):
        podman_load_and_run(tiny_archive, ["/bin/busybox", "false"])


def test_docker_daemon_loads_image(tiny_archive: Path) -> None:
    with docker_daemon() as docker:
        image = docker.load(tiny_archive)
        assert docker.run(image).strip() == "hello from the tiny image"


# --- registry -------------------------------------------------------------------------------------------


def test_registry_answers_v2(registry: str) -> None:
    host, port = registry.split(":")
    assert host == "127.0.0.1" and int(port) > 0
    with urllib.request.urlopen(f"http://{registry}/v2/", timeout=30) as resp:
        assert resp.status == 200
        assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_skopeo_roundtrip_through_registry(
    registry: str, tiny_oci: Path, tmp_path: Path, user_with_subids: str | None, user_tmp: UserTmpFactory
) -> None:
    ref = f"docker://{registry}/nsbuild/tiny:t"
    skopeo_copy(f"oci:{tiny_oci}:t", ref, "--dest-tls-verify=false")
    back = tmp_path / "back"
    skopeo_copy(ref, f"oci:{back}:t", "--src-tls-verify=false")
    oci_validate(back)
    entries = umoci_unpack(back, "t", tmp_path / "bundle")
    assert entries["home/alice/suid"].uid == 1000
    remote = skopeo_inspect(ref, "--tls-verify=false", raw=True)
    local = oci_manifest(tiny_oci, "t")
    assert [layer["digest"] for layer in remote["layers"]] == [layer["digest"] for layer in local["layers"]]
    # an unprivileged account pulls too (REGISTRY_AUTH_FILE={} stands in for XDG_RUNTIME_DIR)
    mine = user_tmp(user_with_subids)
    skopeo_copy(ref, f"oci:{mine}/pulled:t", "--src-tls-verify=false", user=user_with_subids)
    assert (mine / "pulled" / "index.json").stat().st_uid == account(user_with_subids).uid


def test_registry_basic_auth_and_tls(registry_factory: RegistryFactory, tiny_oci: Path) -> None:
    reg = registry_factory(auth=("alice", "s3cret-pw"), tls=True)
    assert reg.url.startswith("https://")
    assert reg.request("/v2/", auth=False)[0] == 401
    assert reg.request("/v2/")[0] == 200
    src = f"oci:{tiny_oci}:t"
    with pytest.raises(AssertionError, match="certificate signed by unknown authority"):
        skopeo_copy(src, reg.ref("tiny", "t"), authfile=reg.auth_file)
    with pytest.raises(AssertionError, match="(?i)unauthorized|authentication required"):
        skopeo_copy(src, reg.ref("tiny", "t"), *reg.skopeo_args("dest"))
    skopeo_copy(src, reg.ref("tiny", "t"), *reg.skopeo_args("dest"), authfile=reg.auth_file)
    assert reg.tags("tiny") == ["t"]
    manifest = oci_manifest(tiny_oci, "t")
    wanted = {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}
    assert wanted <= reg.blobs_on_disk()


def test_registry_token_auth(registry_factory: RegistryFactory, tiny_oci: Path, tmp_path: Path) -> None:
    reg = registry_factory(auth=("bob", "t0ken-pw"), token=True)
    status, headers, _ = reg.request("/v2/", auth=False)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer realm=")
    src = f"oci:{tiny_oci}:t"
    skopeo_copy(src, reg.ref("team/tiny", "t"), *reg.skopeo_args("dest"), authfile=reg.auth_file)
    granted = [r for r in reg.token_server.requests if r.granted]
    assert any(s["name"] == "team/tiny" and "push" in s["actions"] for r in granted for s in r.scopes)
    assert reg.tags("team/tiny") == ["t"]
    bad = tmp_path / "bad-auth.json"
    bad.write_text(json.dumps({"auths": {reg.host: {"auth": "Ym9iOndyb25n"}}}))  # bob:wrong
    with pytest.raises(AssertionError):
        skopeo_copy(src, reg.ref("team/other", "t"), *reg.skopeo_args("dest"), authfile=bad)
    assert "team/other" not in reg.catalog()


def test_popen_as_and_processes_of(unprivileged_user: str | None) -> None:
    proc = popen_as(["sleep", "1000"], unprivileged_user)
    try:
        # setpriv execs sleep in the same pid; wait until the exec has happened (hang guard: 60 s).
        deadline = time.monotonic() + 60
        while (proc.pid, "sleep 1000") not in (mine := processes_of(unprivileged_user)):
            assert time.monotonic() < deadline, mine
            time.sleep(0.01)
        if is_root():
            assert all(pid != proc.pid for pid, _ in processes_of(None))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait()
    assert proc.returncode == -signal.SIGINT
    assert all(pid != proc.pid for pid, _ in processes_of(unprivileged_user))
