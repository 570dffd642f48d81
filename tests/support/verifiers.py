"""Independent checks of nsbuild's output with the real tools (see ../shared/VERIFIERS.md).

Every check raises AssertionError holding the tool's command line and output when the tool rejects
the image, so a failing test shows what the tool said. Nothing here uses nsbuild's own code.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .users import UserKey, account, describe, die_with_parent, is_root, make_user_tmp, remove_tree, run_as

# The containers.conf that encodes this machine's quirks (VERIFIERS.md): crun refuses containers here,
# root cannot raise rlimits, /dev/net/tun is closed to unprivileged users. cgroupfs + file events
# keep podman from asking systemd/journald, which a CI container does not have.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

ROOT_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


OPTIONAL_TOOLS = {"dockerd": "docker.io", "docker": "docker.io"}


def require_tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        if name in OPTIONAL_TOOLS:
            pytest.skip(
                f"{name} is not installed (optional: apt-get install --no-install-recommends {OPTIONAL_TOOLS[name]})"
            )
        message = f"{name} is not installed (`make deps` installs the Debian packages the tests use)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            # In CI `make test` has installed every verifier: a missing one must not turn into a skip.
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_tool(
    argv: Sequence[str | os.PathLike[str]],
    user: UserKey = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: str | bytes | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """Run a verifier; a non-zero exit is an AssertionError with the tool's output."""
    require_tool(os.fspath(argv[0]))
    proc = run_as(argv, user, env=env, cwd=cwd, input=input, text=text)
    if proc.returncode != 0:
        raise AssertionError(describe(proc))
    return proc


_EMPTY_AUTH: Path | None = None


def empty_auth_file() -> Path:
    """A world-readable REGISTRY_AUTH_FILE holding `{}`: unprivileged skopeo/podman without
    XDG_RUNTIME_DIR otherwise fail on docker:// references."""
    global _EMPTY_AUTH
    if _EMPTY_AUTH is None or not _EMPTY_AUTH.exists():
        fd, name = tempfile.mkstemp(prefix="nsbuild-test-auth-", suffix=".json", dir="/var/tmp")
        with os.fdopen(fd, "w") as f:
            f.write("{}\n")
        os.chmod(name, 0o644)
        _EMPTY_AUTH = Path(name)
    return _EMPTY_AUTH


def cleanup_module_files() -> None:
    global _EMPTY_AUTH
    if _EMPTY_AUTH is not None:
        _EMPTY_AUTH.unlink(missing_ok=True)
        _EMPTY_AUTH = None


# --- skopeo -------------------------------------------------------------------------------------------


def compression_of(path: str | os.PathLike[str]) -> str | None:
    """ "gz", "zstd" or None, from the file's magic bytes."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gz"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return None


def plain_archive(path: str | os.PathLike[str], dest_dir: str | os.PathLike[str]) -> Path:
    """The archive itself when uncompressed, else a copy decompressed with gzip/zstd in dest_dir.

    skopeo 1.9 and podman 4.3 (Debian 12) cannot read a compressed docker-archive from a file
    ("loading tar component manifest.json: archive/tar: invalid tar header"), although dockerTools
    and `docker load` use them: the real gzip/zstd tools decompress first."""
    path = Path(path)
    kind = compression_of(path)
    if kind is None:
        return path
    out = Path(dest_dir) / (path.name.rsplit(".", 1)[0] + ".plain.tar")
    tool = ["gzip", "-dc"] if kind == "gz" else ["zstd", "-dcq"]
    with open(out, "wb") as f:
        proc = subprocess.run([*tool, str(path)], stdout=f, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(tool)} {path} failed: {proc.stderr.decode(errors='replace')}")
    out.chmod(0o644)
    return out


def skopeo_copy(
    src_ref: str,
    dst_ref: str,
    *extra: str,
    user: UserKey = None,
    authfile: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess:
    """`skopeo copy SRC DST`: checks layer bytes against the config's diff_ids, missing or truncated
    layers. Extra arguments go before the references (e.g. "--dest-tls-verify=false"). A compressed
    `docker-archive:` source is decompressed first (see plain_archive)."""
    env = {"REGISTRY_AUTH_FILE": os.fspath(authfile or empty_auth_file())}
    with tempfile.TemporaryDirectory(prefix="nsbuild-skopeo-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        if src_ref.startswith("docker-archive:"):
            path, sep, rest = src_ref[len("docker-archive:") :].partition(":")
            if os.path.isfile(path) and compression_of(path):
                src_ref = f"docker-archive:{plain_archive(path, tmp)}{sep}{rest}"
        return run_tool(["skopeo", "copy", "--insecure-policy", *extra, src_ref, dst_ref], user, env=env)


def skopeo_inspect(
    ref: str, *extra: str, user: UserKey = None, raw: bool = False, authfile: str | os.PathLike[str] | None = None
) -> dict:
    env = {"REGISTRY_AUTH_FILE": os.fspath(authfile or empty_auth_file())}
    args = ["skopeo", "inspect", *extra, *(["--raw"] if raw else []), ref]
    return json.loads(run_tool(args, user, env=env).stdout)


def to_gzip_oci(src_ref: str, oci_dir: str | os.PathLike[str], tag: str = "latest", user: UserKey = None) -> Path:
    """Copy any image into an OCI layout with gzip layers (umoci and oci-image-tool know no zstd)."""
    skopeo_copy(
        src_ref, f"oci:{os.fspath(oci_dir)}:{tag}", "--dest-compress-format", "gzip", "--dest-compress", user=user
    )
    return Path(oci_dir)


# --- umoci ----------------------------------------------------------------------------------------------

ROOTLESS_XATTR = "user.rootlesscontainers"
_NOOP_ID = 0xFFFFFFFF


@dataclass
class MtreeEntry:
    """One entry of the .mtree umoci writes for an unpacked bundle.

    path is relative to the rootfs ("." is the root itself). uid/gid are the image's owners: umoci
    --rootless keeps them in the user.rootlesscontainers xattr (absent = 0). For symlinks the kernel
    refuses user.* xattrs, so their owners are unknown here: uid and gid are None.
    """

    path: str
    type: str
    mode: int
    uid: int | None
    gid: int | None
    size: int | None = None
    link: str | None = None
    nlink: int | None = None
    sha256: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _unvis(s: str) -> str:
    """Undo mtree's strvis encoding (octal escapes of bytes; backslash escapes)."""
    out = bytearray()
    i = 0
    raw = s.encode("utf-8", "surrogateescape")
    while i < len(raw):
        c = raw[i]
        if c == 0x5C and i + 1 < len(raw):  # backslash
            octal = raw[i + 1 : i + 4]
            if len(octal) == 3 and all(0x30 <= b <= 0x37 for b in octal):
                out.append(int(octal, 8))
                i += 4
                continue
            nxt = chr(raw[i + 1])
            out += {"n": b"\n", "t": b"\t", "r": b"\r", "s": b" ", "\\": b"\\"}.get(nxt, nxt.encode())
            i += 2
            continue
        out.append(c)
        i += 1
    return out.decode("utf-8", "surrogateescape")


def _varints(data: bytes) -> dict[int, int]:
    """Decode the varint fields of the rootlesscontainers protobuf (uid = 1, gid = 2)."""
    fields: dict[int, int] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        if key & 7 != 0:
            raise AssertionError(f"unexpected wire type in {ROOTLESS_XATTR}: {data!r}")
        value, i = _varint(data, i)
        fields[key >> 3] = value
    return fields


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def parse_mtree(text: str) -> dict[str, MtreeEntry]:
    """Parse go-mtree's hierarchical spec as umoci writes it into {path: MtreeEntry}."""
    entries: dict[str, MtreeEntry] = {}
    defaults: dict[str, str] = {}
    stack: list[str] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "/set":
            defaults.update(w.split("=", 1) for w in words[1:])
            continue
        if words[0] == "/unset":
            for w in words[1:]:
                defaults.pop(w, None)
            continue
        if words[0] == "..":
            if stack:
                stack.pop()
            continue
        name = _unvis(words[0])
        kw = dict(defaults)
        kw.update(w.split("=", 1) for w in words[1:])
        # Directory entries without a '/' open a level that `..` closes; names are relative to it.
        relative = "/" not in name and stack
        path = os.path.normpath(os.path.join(stack[-1], name) if relative else name)
        typ = kw.get("type", "file")
        if typ == "dir" and "/" not in name:
            stack.append(path)
        xattrs = {k[len("xattr.") :]: base64.b64decode(v) for k, v in kw.items() if k.startswith("xattr.")}
        owner = xattrs.pop(ROOTLESS_XATTR, None)
        uid: int | None
        gid: int | None
        if owner is not None:
            ids = _varints(owner)
            uid = ids.get(1, 0)
            gid = ids.get(2, 0)
            uid = 0 if uid == _NOOP_ID else uid
            gid = 0 if gid == _NOOP_ID else gid
        elif typ == "link":
            uid = gid = None
        else:
            uid = gid = 0
        entries[path] = MtreeEntry(
            path=path,
            type=typ,
            mode=int(kw.get("mode", "0"), 8),
            uid=uid,
            gid=gid,
            size=int(kw["size"]) if "size" in kw else None,
            link=_unvis(kw["link"]) if "link" in kw else None,
            nlink=int(kw["nlink"]) if "nlink" in kw else None,
            sha256=kw.get("sha256digest"),
            xattrs=xattrs,
        )
    return entries


def umoci_unpack(
    oci_dir: str | os.PathLike[str], tag: str, bundle: str | os.PathLike[str], user: UserKey = None
) -> dict[str, MtreeEntry]:
    """`umoci unpack --rootless --image DIR:TAG BUNDLE`: verifies digests and sizes from the index
    down to every layer, diff_ids, media types and the tars themselves. Returns the .mtree entries
    with the image's owners (see MtreeEntry). zstd layers: convert first with to_gzip_oci()."""
    bundle = Path(bundle)
    run_tool(["umoci", "unpack", "--rootless", "--image", f"{os.fspath(oci_dir)}:{tag}", bundle], user)
    mtrees = sorted(bundle.glob("*.mtree"))
    if len(mtrees) != 1:
        raise AssertionError(f"umoci left {len(mtrees)} .mtree files in {bundle}")
    return parse_mtree(mtrees[0].read_text(encoding="utf-8", errors="surrogateescape"))


def oci_validate(oci: str | os.PathLike[str], user: UserKey = None) -> subprocess.CompletedProcess:
    """`oci-image-tool validate --type image`: schemas, digests, sizes, oci-layout. An OCI archive is
    extracted (with GNU tar) into a temporary directory first: the tool needs a directory."""
    oci = Path(oci)
    if oci.is_dir():
        return _oci_validate_layout(oci, user)
    with tempfile.TemporaryDirectory(prefix="nsbuild-oci-", dir="/var/tmp") as tmp:
        os.chmod(tmp, 0o755)
        if user is not None and not account(user).is_current:
            os.chown(tmp, account(user).uid, account(user).gid)
        run_tool(["tar", "-xf", oci, "-C", tmp], user)
        return _oci_validate_layout(Path(tmp), user)


def _oci_validate_layout(layout: Path, user: UserKey) -> subprocess.CompletedProcess:
    """The tool predates OCI 1.1: it validates every manifest index.json lists and refuses the empty
    config of an SBOM artifact (the image's referrers), and its --ref search is not unique when one
    image has several tags. With referrers there, it validates the layout's images through a view of
    the layout whose index.json lists only them (the referrers are checked by tests/test_sbom_cli.py)."""
    index = json.loads((layout / "index.json").read_bytes())
    images = [m for m in index.get("manifests") or [] if "artifactType" not in m]
    if len(images) == len(index.get("manifests") or []):
        return run_tool(["oci-image-tool", "validate", "--type", "image", layout], user)
    with tempfile.TemporaryDirectory(prefix="nsbuild-oci-view-", dir="/var/tmp") as tmp:
        view = Path(tmp)
        os.chmod(view, 0o755)
        (view / "index.json").write_text(json.dumps({**index, "manifests": images}))
        (view / "index.json").chmod(0o644)
        shutil.copy2(layout / "oci-layout", view / "oci-layout")
        (view / "blobs").mkdir(mode=0o755)
        (view / "blobs" / "sha256").mkdir(mode=0o755)
        for blob in (layout / "blobs" / "sha256").iterdir():  # the tool refuses a symlinked blobs/
            try:
                os.link(blob, view / "blobs" / "sha256" / blob.name)
            except OSError:
                shutil.copy2(blob, view / "blobs" / "sha256" / blob.name)
        return run_tool(["oci-image-tool", "validate", "--type", "image", view], user)


# --- tar readers --------------------------------------------------------------------------------------


def check_names(names: Sequence[str], what: str) -> None:
    """No absolute names, no `..` components (tar readers clamp or strip these silently)."""
    bad = [n for n in names if n.startswith("/") or ".." in n.rstrip("/").split("/")]
    if bad:
        raise AssertionError(f"{what}: unsafe member names: {bad[:20]}")


def bsdtar_list(layer_tar: str | os.PathLike[str], user: UserKey = None) -> list[str]:
    """Member names as bsdtar lists them (any compression libarchive detects); fails on a broken
    archive, on absolute names and on `..` components."""
    proc = run_tool(["bsdtar", "-tf", layer_tar], user)
    names = proc.stdout.splitlines()
    check_names(names, f"bsdtar -tf {layer_tar}")
    return names


def bsdtar_extract(layer_tar: str | os.PathLike[str], dest: str | os.PathLike[str], user: UserKey = None) -> Path:
    """Extract with bsdtar (refuses `..` and writing through symlinks); as root owners are restored."""
    bsdtar_list(layer_tar, user)
    Path(dest).mkdir(parents=True, exist_ok=True)
    run_tool(["bsdtar", "-xf", layer_tar, "-C", dest], user)
    return Path(dest)


_GNU_TAR_WARNINGS = re.compile(
    r"Removing leading|Member name contains|contains '\.\.'|Skipping to next header|"
    r"Cannot (open|create|mkdir|hard link)|Unexpected EOF"
)


def gnutar_extract(
    layer_tar: str | os.PathLike[str], dest: str | os.PathLike[str], user: UserKey = None, xattrs: bool = False
) -> Path:
    """Extract with GNU tar (compression detected from the data). GNU tar only warns about absolute
    and `..` names, so the listing is checked and any such warning is a failure too."""
    listing = run_tool(["tar", "-tf", layer_tar], user).stdout.splitlines()
    check_names(listing, f"tar -tf {layer_tar}")
    Path(dest).mkdir(parents=True, exist_ok=True)
    extra = ["--xattrs", "--xattrs-include=*"] if xattrs else []
    proc = run_tool(["tar", "-xf", layer_tar, "-C", dest, *extra], user)
    if _GNU_TAR_WARNINGS.search(proc.stderr):
        raise AssertionError(f"GNU tar warned while extracting {layer_tar}:\n{proc.stderr}")
    return Path(dest)


# --- image structure (enough to find the layer blobs; no nsbuild code) ----------------------------------


def image_layers(image: str | os.PathLike[str], work: str | os.PathLike[str], tag: str | None = None) -> list[Path]:
    """The layer blobs of a docker-archive (plain, gz or zstd), an OCI archive or an OCI layout,
    in manifest order. Archives are unpacked with GNU tar into `work`."""
    image, work = Path(image), Path(work)
    if image.is_dir():
        return _oci_layers(image, tag)
    work.mkdir(parents=True, exist_ok=True)
    outer = plain_archive(image, work)
    root = work / "image"
    root.mkdir(exist_ok=True)
    run_tool(["tar", "-xf", outer, "-C", root])
    if (root / "manifest.json").exists():
        manifest = json.loads((root / "manifest.json").read_text())
        if len(manifest) != 1 and tag is None:
            raise AssertionError(f"{image}: {len(manifest)} images in manifest.json; pass tag=")
        entry = (
            manifest[0]
            if tag is None
            else next(m for m in manifest if any(t.endswith(f":{tag}") for t in m.get("RepoTags") or []))
        )
        return [root / p for p in entry["Layers"]]
    if (root / "oci-layout").exists():
        return _oci_layers(root, tag)
    raise AssertionError(f"{image}: neither a docker-archive nor an OCI archive")


def _blob(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def oci_manifest(layout: str | os.PathLike[str], tag: str | None = None) -> dict:
    """The image manifest an OCI layout's index.json names (by ref.name when tag is given)."""
    layout = Path(layout)
    index = json.loads((layout / "index.json").read_text())
    manifests = index["manifests"]
    if tag is not None:
        manifests = [m for m in manifests if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if len(manifests) != 1:
        raise AssertionError(f"{layout}: {len(manifests)} manifests match tag {tag!r}")
    return json.loads(_blob(layout, manifests[0]["digest"]).read_text())


def _oci_layers(layout: Path, tag: str | None) -> list[Path]:
    return [_blob(layout, layer["digest"]) for layer in oci_manifest(layout, tag)["layers"]]


def check_all_layers(
    image: str | os.PathLike[str], work: str | os.PathLike[str], tag: str | None = None
) -> list[list[str]]:
    """Every layer listed and extracted by bsdtar and by GNU tar; returns bsdtar's names per layer."""
    work = Path(work)
    names = []
    for i, layer in enumerate(image_layers(image, work / "outer", tag)):
        names.append(bsdtar_list(layer))
        bsdtar_extract(layer, work / f"bsdtar-{i}")
        gnutar_extract(layer, work / f"gnutar-{i}")
    return names


# --- podman ----------------------------------------------------------------------------------------------


@dataclass
class PodmanStore:
    """A throw-away podman store (its own --root/--runroot/--tmpdir, vfs) used by one account."""

    dir: Path
    user: UserKey
    env: dict[str, str]

    @property
    def prefix(self) -> list[str]:
        d = self.dir
        return [
            "podman",
            "--root",
            f"{d}/root",
            "--runroot",
            f"{d}/run",
            "--tmpdir",
            f"{d}/tmp",
            "--storage-driver",
            "vfs",
        ]

    def podman(self, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = run_as([*self.prefix, *args], self.user, env=self.env, cwd=self.dir)
        if check and proc.returncode != 0:
            raise AssertionError(describe(proc))
        return proc

    def load(self, archive: str | os.PathLike[str]) -> str:
        """`podman load -i` (docker-archive or OCI archive; a compressed docker-archive is decompressed
        first, see plain_archive); returns the loaded image's name or id."""
        out = self.podman("load", "-i", plain_archive(archive, self.dir)).stdout
        found = re.findall(r"^Loaded image[^:]*: *(.+)$", out, re.M)
        if not found:
            raise AssertionError(f"podman load printed no image name:\n{out}")
        return found[-1].split(",")[0].strip()

    def pull(self, ref: str) -> str:
        """`podman pull REF` (e.g. oci:DIR:TAG); returns the image id."""
        return self.podman("pull", "-q", ref).stdout.strip().splitlines()[-1]

    def run(self, image: str, cmd: Sequence[str] = (), run_args: Sequence[str] = ()) -> str:
        """`podman run --rm` with the machine's quirks; returns stdout. A non-zero exit fails."""
        quirks = ["--pull=never", "--network=none", "--runtime", "runc"]
        if account(self.user).uid == 0:
            quirks += ROOT_ULIMITS
        return self.podman("run", "--rm", *quirks, *run_args, image, *cmd).stdout


@contextlib.contextmanager
def podman_store(user: UserKey = None) -> Iterator[PodmanStore]:
    """A fresh store per check (cached layers in a shared store would hide a broken blob); reset with
    `podman system reset -f` (rootless stores hold files owned by subordinate ids, and it also stops
    the rootless pause process) before the directory is removed."""
    require_tool("podman")
    d = make_user_tmp(user, prefix="nsbuild-podman-")
    (d / "containers.conf").write_text(CONTAINERS_CONF)
    (d / "auth.json").write_text("{}\n")
    acc = account(user)
    if not acc.is_current:
        for name in ("containers.conf", "auth.json"):
            os.chown(d / name, acc.uid, acc.gid)
    # A private XDG_RUNTIME_DIR: rootless podman otherwise shares /tmp/podman-run-UID between checks.
    (d / "xdg").mkdir(mode=0o700)
    if not acc.is_current:
        os.chown(d / "xdg", acc.uid, acc.gid)
    env = {
        "CONTAINERS_CONF": str(d / "containers.conf"),
        "REGISTRY_AUTH_FILE": str(d / "auth.json"),
        "XDG_RUNTIME_DIR": str(d / "xdg"),
    }
    store = PodmanStore(d, user, env)
    try:
        yield store
    finally:
        store.podman("system", "reset", "-f", check=False)
        remove_tree(d, user)


def podman_load_and_run(
    archive: str | os.PathLike[str],
    cmd: Sequence[str] = (),
    user: UserKey = None,
    run_args: Sequence[str] = (),
) -> str:
    """Load an archive (or pull an OCI layout directory, `DIR` or `DIR:TAG`) into a throw-away store
    and run it; returns the container's stdout. Rootless podman needs subordinate ids for images
    owned by more than one id: use the "test" account or root, not "nosub"."""
    with podman_store(user) as store:
        path = os.fspath(archive)
        if os.path.isdir(path) or (":" in path and os.path.isdir(path.rsplit(":", 1)[0])):
            layout, tag = (path, "") if os.path.isdir(path) else path.rsplit(":", 1)
            # podman names the image after the layout's path, which must then be a valid reference:
            # pull through a symlink with a plain name in the store's (hex-named) directory.
            link = store.dir / "oci-layout"
            link.symlink_to(os.path.abspath(layout))
            image = store.pull(f"oci:{link}" + (f":{tag}" if tag else ""))
        else:
            image = store.load(path)
        return store.run(image, cmd, run_args)


# --- a private Docker engine ---------------------------------------------------------------------------


@dataclass
class DockerDaemon:
    dir: Path
    sock: str

    def docker(self, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess:
        proc = run_as(["docker", "-H", f"unix://{self.sock}", *args], None)
        if check and proc.returncode != 0:
            raise AssertionError(describe(proc))
        return proc

    def load(self, archive: str | os.PathLike[str]) -> str:
        out = self.docker("load", "-i", archive).stdout
        found = re.findall(r"^Loaded image(?: ID)?: *(.+)$", out, re.M)
        if not found:
            raise AssertionError(f"docker load printed no image name:\n{out}")
        return found[-1].strip()

    def run(self, image: str, cmd: Sequence[str] = (), run_args: Sequence[str] = ()) -> str:
        return self.docker("run", "--rm", "--pull=never", "--network=none", *run_args, image, *cmd).stdout


@contextlib.contextmanager
def docker_daemon() -> Iterator[DockerDaemon]:
    """A private dockerd (root only) in its own data/exec root, stopped by its pid afterwards."""
    if not is_root():
        pytest.skip("a private dockerd needs root")
    dockerd = require_tool("dockerd")
    require_tool("docker")
    d = Path(tempfile.mkdtemp(prefix="nsbuild-dockerd-", dir="/var/tmp"))
    sock = f"{d}/sock"
    log = open(d / "log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            dockerd,
            "--data-root",
            f"{d}/data",
            "--exec-root",
            f"{d}/exec",
            "--pidfile",
            f"{d}/pid",
            "-H",
            f"unix://{sock}",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--ip-masq=false",
            "--storage-driver",
            "vfs",
            "--default-ulimit",
            "nofile=1024:1024",
            "--default-ulimit",
            "nproc=1024:1024",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
        env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"},
    )
    daemon = DockerDaemon(d, sock)
    deadline = time.monotonic() + 120  # hang guard only: dockerd is normally ready in ~0.2 s
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not answer within 120 s:\n{(d / 'log').read_text()}")
            if proc.poll() is not None:
                raise AssertionError(f"dockerd exited with {proc.returncode}:\n{(d / 'log').read_text()}")
            if os.path.exists(sock) and daemon.docker("version", check=False).returncode == 0:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        yield daemon
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        subprocess.run(["umount", "-R", "-l", f"{d}/exec"], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)
