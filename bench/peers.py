"""The rootless peers a user would otherwise run (buildah, umoci), and nsbuild run the same way.

All three run as one unprivileged account: nsbuild-test when the bench runs as root (dropped to with
setpriv, as the test suite does), else the account running the bench. They read a copy of the tree
owned by that account (the default tree, under /root, is closed to it) and keep every file they write
(buildah's storage, its runtime dir, the outputs) in one throw-away directory under /var/tmp.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from timing import Tree, median_run, run, spec

TEST_ACCOUNT = "nsbuild-test"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NSBUILD = str(Path(sys.executable).parent / "nsbuild")
TARGET = "/opt/tree"

# What this machine needs for rootless buildah (as tests/support/verifiers.py): runc, no systemd.
CONTAINERS_CONF = """\
[containers]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

# buildah 1.28 commit: uncompressed layers by default, gzip with --disable-compression=false, and no
# zstd (--compression-format came later). umoci 0.4.7 insert: always gzip, no option.
BUILDAH_COMMIT_FLAGS = {"none": ["--disable-compression=true"], "gz": ["--disable-compression=false"]}
UMOCI_COMPRESSORS = ("gz",)
NOT_AVAILABLE = (
    "n/a: buildah 1.28 commits uncompressed or gzip layers only (no --compression-format), "
    "umoci 0.4.7 insert gzip only (no compression option)"
)


@dataclass(frozen=True)
class Peer:
    """The account the rootless rows run as, and its throw-away directory."""

    name: str
    uid: int
    gid: int
    dir: Path
    prefix: tuple[str, ...]

    @property
    def env(self) -> Mapping[str, str]:
        return {
            "HOME": str(self.dir),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": SAFE_PATH,
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.dir / "xdg"),
            "CONTAINERS_CONF": str(self.dir / "containers.conf"),
        }

    def argv(self, cmd: list[str]) -> list[str]:
        return [*self.prefix, *cmd]

    def give(self, path: Path) -> None:
        """Make a file or tree the bench wrote (as root) the account's."""
        if os.geteuid() == 0 and self.uid != 0:
            subprocess.run(["chown", "-R", "-h", f"{self.uid}:{self.gid}", str(path)], check=True)

    def buildah(self, *args: str) -> list[str]:
        store = self.dir / "storage"
        return ["buildah", "--root", f"{store}/root", "--runroot", f"{store}/run", "--storage-driver", "vfs", *args]


def open_peer() -> Peer | str:
    """The peer account and its directory, or why the rootless rows cannot run."""
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(TEST_ACCOUNT)
        except KeyError:
            return f"account {TEST_ACCOUNT} does not exist (`make test-users` as root creates it)"
        prefix: tuple[str, ...] = ("setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--")
    else:
        pw = pwd.getpwuid(os.geteuid())
        prefix = ()
    d = Path(tempfile.mkdtemp(prefix="nsbuild-bench-peers-", dir="/var/tmp"))
    d.chmod(0o755)
    (d / "xdg").mkdir(mode=0o700)
    (d / "containers.conf").write_text(CONTAINERS_CONF)
    peer = Peer(pw.pw_name, pw.pw_uid, pw.pw_gid, d, prefix)
    peer.give(d)
    return peer


def close_peer(peer: Peer) -> None:
    # buildah's storage holds files owned by subordinate ids: only its user namespace may remove them
    # when the bench is not root.
    subprocess.run(
        peer.argv(peer.buildah("unshare", "rm", "-rf", str(peer.dir / "storage"))),
        env=peer.env,
        capture_output=True,
        check=False,
    )
    subprocess.run(["chmod", "-R", "u+rwX", str(peer.dir)], capture_output=True, check=False)
    shutil.rmtree(peer.dir, ignore_errors=True)


def share(peer: Peer, tree: Tree, name: str) -> Tree:
    """A copy of the tree the account owns (the same entries and bytes, so the rows stay comparable)."""
    if peer.uid == os.geteuid():
        return tree
    copy = peer.dir / "trees" / name
    if copy.exists():
        return Tree(copy, tree.files, tree.size)
    copy.parent.mkdir(exist_ok=True)
    subprocess.run(["cp", "-a", str(tree.path), str(copy)], check=True)
    peer.give(copy.parent)
    # The copy's write-back would otherwise compete with the first rows timed on it.
    os.sync()
    return Tree(copy, tree.files, tree.size)


def time_nsbuild(peer: Peer, tree: Tree, comp: str, runs: int) -> tuple[float, float]:
    """`nsbuild layered --no-cache` to an OCI archive, the whole command timed."""
    s = spec(peer.dir / f"nsbuild-{comp}.json", [{"path": str(tree.path), "target": TARGET}], comp, 2)
    s.chmod(0o644)
    out = peer.dir / "nsbuild.tar"
    cmd = peer.argv([NSBUILD, "layered", "-q", "--no-cache", str(s), "-o", f"oci-archive:{out}"])
    return median_run(cmd, runs, before=lambda: out.unlink(missing_ok=True), env=peer.env)


def time_buildah(peer: Peer, tree: Tree, comp: str, runs: int) -> tuple[float, float] | None:
    """`buildah copy` of the tree into a `from scratch` container and `buildah commit` of it to an OCI
    archive, timed together; creating and removing the container is not timed. None: no such option."""
    if comp not in BUILDAH_COMMIT_FLAGS:
        return None
    out = peer.dir / "buildah.tar"
    script = " && ".join(
        [
            shlex.join(peer.buildah("copy", "-q", "bench", str(tree.path), TARGET)),
            shlex.join(peer.buildah("commit", "-q", *BUILDAH_COMMIT_FLAGS[comp], "bench", f"oci-archive:{out}")),
        ]
    )

    def fresh_container() -> None:
        subprocess.run(peer.argv(peer.buildah("rm", "-a")), env=peer.env, capture_output=True, check=False)
        out.unlink(missing_ok=True)
        run(peer.argv(peer.buildah("from", "-q", "--name", "bench", "scratch")), peer.env)

    try:
        return median_run(peer.argv(["bash", "-c", script]), runs, before=fresh_container, env=peer.env)
    finally:
        subprocess.run(peer.argv(peer.buildah("rm", "-a")), env=peer.env, capture_output=True, check=False)


def time_umoci(peer: Peer, tree: Tree, comp: str, runs: int) -> tuple[float, float] | None:
    """`umoci insert --rootless` of the tree into an empty image (`umoci init` + `umoci new`, not
    timed) of an OCI layout directory. None: umoci cannot write that compressor."""
    if comp not in UMOCI_COMPRESSORS:
        return None
    layout = peer.dir / "umoci"

    def fresh_layout() -> None:
        shutil.rmtree(layout, ignore_errors=True)
        run(peer.argv(["umoci", "init", "--layout", str(layout)]), peer.env)
        run(peer.argv(["umoci", "new", "--image", f"{layout}:t"]), peer.env)

    cmd = peer.argv(["umoci", "insert", "--rootless", "--image", f"{layout}:t", str(tree.path), TARGET])
    return median_run(cmd, runs, before=fresh_layout, env=peer.env)


def versions() -> list[str]:
    out = []
    for cmd in (["buildah", "--version"], ["umoci", "--version"]):
        try:
            out.append(subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip())
        except FileNotFoundError:
            out.append(f"{cmd[0]}: not installed")
    return out
