"""The customisation step as it runs inside the sandbox: `python -m nsbuild.sandbox.inner JOB.json`.

Runs as namespace root (backend userns / userns-fakeroot) or under fakeroot (userns-fakeroot, fakeroot).
Steps: assemble the earlier layers (lower), prepare the customisation layer's tree (upper), show the
script the merged image (overlayfs, or a copy that is diffed afterwards), run the script, kill whatever
it left running, write the layer in this same process (so lstat shows the ids and modes the script
set, real or faked), remove the trees. JOB is a nsbuild.sandbox.job.SandboxJob on the wire; the
SandboxOutcome goes to its `result` file as JSON.
A chroot also gets the host view of nsbuild.sandbox.hostview (the store, the host's shell and tools).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import prctl

from nsbuild.core.compress import HashingWriter
from nsbuild.sandbox import boundary, fakeshims, hostview, mounts, tree
from nsbuild.sandbox.job import LayerStats, SandboxJob, SandboxOutcome
from nsbuild.sandbox.proc import kill_descendants, status_code
from nsbuild.tar.owners import OwnerPolicy
from nsbuild.tar.perms import compiled
from nsbuild.tar.tarwriter import Source, write_tar

FAKEROOT_VARS = ("FAKEROOT", "FAKED_", "LD_PRELOAD", "LD_LIBRARY_PATH")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A user namespace cannot create device nodes: this `mknod` (first in PATH) records char/block devices
# as empty placeholder files plus a line in the registry; the layer writer turns them into devices.
MKNOD_SHIM = r"""#!/bin/sh
mode=
while [ $# -gt 0 ]; do
  case "$1" in
    -m) mode=$2; shift 2 ;;
    --mode=*) mode=${1#--mode=}; shift ;;
    -m*) mode=${1#-m}; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
case "$2" in
  c|u|b) ;;
  *) PATH=${PATH#*:} exec mknod ${mode:+-m "$mode"} "$@" ;;
esac
if [ $# -ne 4 ]; then echo "mknod: usage: mknod [-m MODE] NAME TYPE MAJOR MINOR" >&2; exit 1; fi
if [ -e "$1" ] || [ -L "$1" ]; then echo "mknod: $1: File exists" >&2; exit 1; fi
: > "$1" || exit 1
if [ -n "$mode" ]; then chmod "$mode" "$1" || exit 1; fi
case "$1" in */*) dir=${1%/*}; base=${1##*/} ;; *) dir=.; base=$1 ;; esac
[ -n "$dir" ] || dir=/
dir=$(cd "$dir" && pwd -P) || exit 1
kind=char; [ "$2" = b ] && kind=block
printf '%s/%s\t%s\t%s\t%s\n' "${dir%/}" "$base" "$kind" "$3" "$4" >> "@REGISTRY@"
"""

# Mount points the chroot needs; they are never part of the layer.
SYSTEM_DIRS = ("dev", "proc", "sys")


def _log(msg: str) -> None:
    sys.stderr.write(f"nsbuild: {msg}\n")
    sys.stderr.flush()


def _assemble(job: SandboxJob, root: Path, link: bool, devices: dict[str, list]) -> None:
    # A base image is input from elsewhere: every layer is validated against the tree so far before a
    # byte of it is written (HostileLayer: one clear line, nothing written outside root).
    model = tree.ImageModel(refuse_devices=job.strict)
    for i, tar in enumerate(job.base_layers):
        tree.unpack_layer(tar, root, devices, model=model, label=f"fromImage layer {i}")
    for host, target in job.lower:
        tree.place(Path(host), target, root, link=link)


def _mount_overlay(work: Path, lower: Path, upper: Path, ovlwork: Path, merged: Path) -> bool:
    os.chdir(work)  # relative option paths: no escaping of ',' or ':' in the caller's directory names
    rel = {
        k: os.path.relpath(v, work)
        for k, v in (("lower", lower), ("upper", upper), ("work", ovlwork), ("merged", merged))
    }
    try:
        mounts.mount(
            "overlay",
            rel["merged"],
            "overlay",
            0,
            f"lowerdir={rel['lower']},upperdir={rel['upper']},workdir={rel['work']},userxattr",
        )
    except OSError as exc:
        _log(f"overlayfs unavailable here ({exc.strerror}); using copy-and-diff")
        return False
    finally:
        os.chdir("/")
    return True


def _setup_chroot(merged: Path, network: str) -> list[Path]:
    """/dev and /sys inside the merged root (/proc comes with the script's pid namespace); returns the
    mount points to undo (deepest first)."""
    done: list[Path] = []
    for name in SYSTEM_DIRS:
        p = merged / name
        if p.is_symlink() or not p.is_dir():
            raise RuntimeError(f"/{name} in the image is not a directory: cannot enable the chroot")
    dev = merged / "dev"
    # exec allowed: the mknod shim lives here
    mounts.mount("tmpfs", dev, "tmpfs", mounts.MS_NOSUID, "mode=0755,size=1m")
    done.append(dev)
    for node in DEV_NODES:
        target = dev / node
        target.touch()
        try:
            mounts.mount(f"/dev/{node}", target, None, mounts.MS_BIND)
            done.append(target)
        except OSError:
            target.unlink()  # e.g. no /dev/tty without a terminal
    for name, to in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(to, dev / name)
    (dev / "shm").mkdir()
    (dev / "pts").mkdir()
    if "FAKEROOTKEY" not in os.environ:
        shim = dev / ".nsbuild"
        shim.mkdir()
        _write_shim(shim, "/dev/.nsbuild/devices")
    lib = _fakeroot_libdir()
    if lib is not None:
        # fakeroot's preload library must be reachable from inside the chroot; /dev is never in the layer.
        inside = dev / ".fakeroot"
        inside.mkdir()
        mounts.mount(lib, inside, None, mounts.MS_BIND)
        done.append(inside)
        boundary.set_readonly(inside, True, recursive=False)
    # /tmp: the image's own (runAsRoot's as in dockerTools' VM; what a script leaves there is in the layer).
    # /proc: the script's own, mounted by nsbuild.sandbox.boundary in the script's pid namespace.
    sysfs = merged / "sys"
    try:
        if network == "host":
            raise OSError  # a new sysfs needs our own network namespace
        mounts.mount("sysfs", sysfs, "sysfs", mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC | mounts.MS_RDONLY)
    except OSError:
        mounts.mount("/sys", sysfs, None, mounts.MS_BIND | mounts.MS_REC)
        boundary.set_readonly(sysfs, True, recursive=True)
    done.append(sysfs)
    return done


def _write_shim(d: Path, registry: str) -> None:
    p = d / "mknod"
    p.write_text(MKNOD_SHIM.replace("@REGISTRY@", registry))
    p.chmod(0o755)


def _devices(registry: str, root_prefix: str, upper: Path) -> dict[str, list]:
    """Placeholders the shim recorded that are still empty regular files in the layer."""
    out: dict[str, list] = {}
    for line in registry.splitlines():
        parts = line.split("\t")
        if len(parts) != 4 or not parts[0].startswith(root_prefix):
            continue
        rel = parts[0][len(root_prefix) :].strip("/")
        p = upper / rel
        if p.is_file() and not p.is_symlink() and p.stat().st_size == 0:
            out[rel] = [parts[1], int(parts[2]), int(parts[3])]
    return out


def _fakeroot_libdir() -> str | None:
    if "FAKEROOTKEY" not in os.environ:
        return None
    name = os.environ.get("LD_PRELOAD", "").split()[0] if os.environ.get("LD_PRELOAD") else ""
    for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        if d and name and os.path.exists(os.path.join(d, name)):
            return d
    return None


def _undo_mounts(points: list[Path]) -> None:
    for p in reversed(points):
        with contextlib.suppress(OSError):
            mounts.umount(p)


def _resolve_in(root: Path, rel: str) -> Path | None:
    """root/rel with symlinks resolved inside root (as the chroot will see them)."""
    parts = [p for p in rel.split("/") if p]
    cur: list[str] = []
    for _ in range(64):
        if not parts:
            return root.joinpath(*cur)
        part = parts.pop(0)
        if part == "..":
            cur = cur[:-1]
            continue
        if part == ".":
            continue
        p = root.joinpath(*cur, part)
        if p.is_symlink():
            target = os.readlink(p)
            if target.startswith("/"):
                cur = []
            parts = [x for x in target.split("/") if x] + parts
            continue
        cur.append(part)
    return None


def _is_static_elf(path: Path) -> bool:
    """An ELF executable without a PT_INTERP program header: LD_PRELOAD (fakeroot) cannot reach it."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return False
            is64, little = head[4] == 2, head[5] == 1
            order: Literal["little", "big"] = "little" if little else "big"
            if is64:
                phoff, phentsize, phnum = (
                    int.from_bytes(head[32:40], order),
                    int.from_bytes(head[54:56], order),
                    int.from_bytes(head[56:58], order),
                )
            else:
                phoff, phentsize, phnum = (
                    int.from_bytes(head[28:32], order),
                    int.from_bytes(head[42:44], order),
                    int.from_bytes(head[44:46], order),
                )
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(int.from_bytes(table[i * phentsize : i * phentsize + 4], order) != pt_interp for i in range(phnum))


def _shell(merged: Path, chroot: bool, view: hostview.View | None = None, what: str = "fakeRootCommands") -> list[str]:
    """The script's interpreter. The image's own bash or sh comes first (the script runs in the image's
    world); an image without one gets the host's bash from the host view (dockerTools always uses
    the builder's bash)."""
    if not chroot:
        return ["bash", "-e", "-c"]
    for sh in ("bin/bash", "usr/bin/bash", "bin/sh", "usr/bin/sh"):
        p = merged / sh
        if os.path.lexists(p):
            real = _resolve_in(merged, sh)
            if "FAKEROOTKEY" in os.environ and real is not None and _is_static_elf(real):
                _log(
                    f"warning: the image's /{sh} is statically linked: fakeroot cannot record what it "
                    "(or other static tools) do, e.g. chown to other ids fails; a user namespace with "
                    "subordinate ids (--isolation userns) or dynamically linked tools avoid this"
                )
            return ["/" + sh, "-e", "-c"]
    host = hostview.shell_argv(view, ["/dev/.fakeroot"] if "FAKEROOTKEY" in os.environ else []) if view else None
    # The loader (or a static bash) and the shell, as the chroot will see them.
    if host is None or not all(os.path.exists(merged / p.lstrip("/")) for p in (host[0], host[host.index("-e") - 1])):
        raise RuntimeError(f"{what}: the image has no /bin/bash or /bin/sh, and no host bash was found to run it")
    return host


def _wait_for_network() -> None:
    """Block until the sandbox's init has brought lo up (it does so while we prepare the trees)."""
    fd = os.environ.pop("NSBUILD_NET_READY_FD", None)
    if fd is None:
        return
    try:
        got = os.read(int(fd), 1)
    finally:
        os.close(int(fd))
    if got != b"1":
        raise RuntimeError("the sandbox's network (lo) could not be set up")


def _run_script(job: SandboxJob, merged: Path, tail: list[str] | None = None, view: hostview.View | None = None) -> int:
    chroot = job.chroot
    env = dict(job.env) if job.env is not None else dict(os.environ)
    # fakeroot's session (preload library, daemon key) must reach the script whatever env it was given.
    env.update({k: v for k, v in os.environ.items() if k.startswith(FAKEROOT_VARS)})
    shell = _shell(merged, chroot, view, job.what)
    argv = [*shell, job.script]
    if chroot:
        # Host paths mean nothing inside the image: keep locale/terminal and fakeroot's session only.
        env = {
            k: v
            for k, v in env.items()
            if k.startswith((*FAKEROOT_VARS, "TERM", "LANG", "LC_", "TZ", "SOURCE_DATE_EPOCH"))
        }
        env.update(PATH=CHROOT_PATH, HOME="/root", PWD="/", USER="root", LOGNAME="root")
        if "FAKEROOTKEY" in env:
            env["LD_LIBRARY_PATH"] = "/dev/.fakeroot"
        if view is not None:
            _host_env(env, view, shell[0].startswith(f"/{hostview.HOST_DIR}/"))

    memory = job.memory_mib

    def enter() -> None:
        if memory:
            # buildVMMemorySize: a hard limit on each of the script's processes.
            limit = int(memory) << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if "FAKEROOTKEY" not in os.environ:
        shim_dir = "/dev/.nsbuild" if chroot else str(job.work / "shim")
        env["PATH"] = shim_dir + ":" + env.get("PATH", CHROOT_PATH)
    elif not chroot:
        env["PATH"] = fakeshims.install(job.work / "fakeroot-shim") + ":" + env.get("PATH", CHROOT_PATH)
    # The fakeroot shims keep their notes (which inodes a chown went through) beside them.
    shims = job.work / "fakeroot-shim"
    writable = [merged, job.work / "reg", *_script_dirs(env), *([shims] if shims.is_dir() else [])]
    return _spawn(argv, env, _behind_boundary(job, merged if chroot else None, writable, merged, enter, env), tail)


def _script_dirs(env: dict[str, str]) -> list[Path]:
    """The script's $HOME and $TMPDIR (host directories in the build's scratch tree), kept writable."""
    out = []
    for var in ("HOME", "TMPDIR"):
        p = Path(env.get(var, ""))
        if p.is_absolute() and p.is_dir() and not p.is_symlink() and p != Path("/"):
            out.append(p)
    return out


def _behind_boundary(
    job: SandboxJob, root: Path | None, writable: list[Path], cwd: Path, enter: Any, env: dict[str, str]
) -> Any:
    """preexec_fn for a script: behind nsbuild.sandbox.boundary where there are namespaces (the
    caller's home hidden, the spec's directory readable); the fakeroot backend has none (its scripts
    run as the caller, with the caller's view)."""
    if job.in_ns:
        hidden = [Path(h) for h in job.hide if Path(h).is_dir() and Path(h) != Path("/")]
        # Still readable below a hidden home: the spec's directory and PATH (a ~/.nix-profile/bin).
        names = [env.get("NSBUILD_SPEC_DIR") or "", *env.get("PATH", "").split(":")]
        readable = [Path(n) for n in names if n.startswith("/") and os.path.realpath(n) != "/"]
        return boundary.launcher(root, writable, cwd, enter, hidden, readable)

    def plain() -> None:
        enter()
        os.chdir(cwd)

    return plain


def _host_env(env: dict[str, str], view: hostview.View, host_shell: bool) -> None:
    """The host's tools after the image's own on PATH. Where the host's shell runs the script and the
    image has no loader of its own at the host's loader path, also the host's libraries and locales
    (an image with a shell of its own keeps its search path: a musl image's programs must never
    load the host's glibc libraries)."""
    env["PATH"] = CHROOT_PATH + ":" + hostview.HOST_PATH
    if view.bind_loader and host_shell:
        libs = [*([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []), *hostview.library_path(view)]
        env["LD_LIBRARY_PATH"] = ":".join(libs)
        if os.path.isdir("/usr/lib/locale"):
            env["LOCPATH"] = hostview.inside_path("/usr/lib/locale")  # the host C library's locales


def _spawn(argv: list[str], env: dict[str, str], enter: Any, tail: list[str] | None) -> int:
    """Run argv; its output goes to stderr as it comes. With `tail`, the output also passes through
    a pipe and its last lines are kept there (for the error message)."""
    if tail is None:
        proc = subprocess.Popen(argv, env=env, preexec_fn=enter, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno())
        reader = None
    else:
        r, w = os.pipe()
        proc = subprocess.Popen(argv, env=env, preexec_fn=enter, stdin=subprocess.DEVNULL, stdout=w, stderr=w)
        os.close(w)
        reader = threading.Thread(target=_tee, args=(r, tail), daemon=True)
        reader.start()
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = status_code(status)
    # Whatever the script left running (`daemon &`) must not touch the tree while it is written.
    kill_descendants()
    if reader is not None:
        reader.join(10)  # every writer is dead now: EOF comes at once
    return proc.returncode


def _tee(fd: int, tail: list[str]) -> None:
    buf = b""
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(65536):
            os.write(sys.stderr.fileno(), chunk)
            buf = (buf + chunk)[-65536:]
    tail[:] = buf.decode("utf-8", "replace").splitlines()[-40:]


class _AfterFailed(Exception):
    def __init__(self, code: int, tail: list[str]) -> None:
        super().__init__(code)
        self.code, self.tail = code, tail


def _full(path: Path | None) -> bool:
    """Whether the file system at path (a size-limited tmpfs) is (nearly) full."""
    if path is None:
        return False
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20) or st.f_favail == 0


def _run_after(job: SandboxJob, upper: Path, tail: list[str]) -> int:
    env = dict(job.after_env or os.environ)
    env.update({k: v for k, v in os.environ.items() if k.startswith(FAKEROOT_VARS)})

    def enter() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    preexec = _behind_boundary(job, None, [upper, *_script_dirs(env)], upper, enter, env)
    return _spawn(["bash", "--noprofile", "--norc", "-e", "-c", job.after_script], env, preexec, tail)


def _write_layer(job: SandboxJob, upper: Path, names_root: Path, devices: dict[str, list]) -> LayerStats:
    """The layer writer, run in this process: we are already inside the namespace / fakeroot session,
    so lstat shows the ids and modes the script set (and one interpreter start is saved). Ids other
    than root's are named from the image's own /etc/passwd and /etc/group."""
    owner = OwnerPolicy.mapped(
        job.root_owner,
        _image_file(names_root, "etc/passwd"),
        _image_file(names_root, "etc/group"),
        compiled(job.perms),
    )
    nodes = {
        name.encode("utf-8", "surrogateescape"): (kind, int(major), int(minor))
        for name, (kind, major, minor) in devices.items()
    }
    with open(job.out, "wb", buffering=0) as f:
        hashed = HashingWriter(f)
        stats = write_tar(
            [Source(upper, "/")], hashed, mtime=job.mtime, owner=owner, overlay_whiteouts=True, devices=nodes
        )
    return LayerStats(hashed.digest, hashed.size, stats.entries)


def _image_file(root: Path, rel: str) -> Path | None:
    p = root / rel
    return p if p.is_file() and not p.is_symlink() else None


@dataclass
class _Trees:
    """The scratch trees of one run. upper, ovlwork and merged move onto the diskSize tmpfs (scratch)
    when there is one."""

    work: Path
    lower: Path
    upper: Path
    ovlwork: Path
    merged: Path
    scratch: Path | None = None


@dataclass
class _State:
    """What the clean-up must undo, and the timings, as the steps fill them in."""

    chroot_mounts: list[Path] = field(default_factory=list)
    overlay: bool = False
    view: hostview.View | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Prepared:
    """The trees before the script: the copy-and-diff reference state (snap, with the top-level names
    never part of the layer in skip) and the base-layer devices the namespace could not create."""

    snap: dict[str, tree.Seen] | None
    skip: set[str]
    lower_devices: dict[str, list]


def main() -> None:
    job = SandboxJob.from_wire(json.loads(Path(sys.argv[1]).read_text()))
    prctl.set_child_subreaper(True)
    os.umask(0o022)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    work = job.work
    trees = _Trees(work, work / "lower", work / "upper", work / "ovlwork", work / "merged")
    state = _State()
    outcome = SandboxOutcome("error")
    try:
        outcome = _customise(job, trees, state)
    except _AfterFailed as exc:
        outcome = SandboxOutcome("after", code=exc.code, tail=tuple(exc.tail))
    except fakeshims.Unrecordable as exc:
        outcome = SandboxOutcome("error", message=str(exc))
    except tree.HostileLayer as exc:
        outcome = SandboxOutcome("hostile", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        outcome = SandboxOutcome("error", message=str(exc) or type(exc).__name__, full=full)
    finally:
        _clean_up(trees, state)
        job.result.write_text(json.dumps(replace(outcome, timings=state.timings).to_wire()))
    sys.exit(0)


def _customise(job: SandboxJob, trees: _Trees, state: _State) -> SandboxOutcome:
    """Prepare the trees, run the script, write the layer (the outcome of a script that fails)."""
    t0 = time.monotonic()
    prepared = _prepare(job, trees, state)
    state.timings["prepare"] = time.monotonic() - t0
    work, merged = trees.work, trees.merged
    # The shim's registry: in a directory of its own, writable for the script (the rest of the
    # scratch tree is read-only to it).
    (work / "reg").mkdir()
    registry = work / "reg" / "devices.tsv"
    if "FAKEROOTKEY" not in os.environ:
        (work / "shim").mkdir()
        _write_shim(work / "shim", str(registry))
    if job.chroot:
        state.chroot_mounts = _setup_chroot(merged, job.network)
        if state.view is not None:
            (work / "empty").mkdir()
            state.chroot_mounts += hostview.mount(merged, state.view, work / "empty")
    _wait_for_network()
    t1 = time.monotonic()
    tail: list[str] | None = [] if job.tail else None
    code = _run_script(job, merged, tail, state.view)
    # Before the mounts go: did the script fill its diskSize-limited space?
    full = code != 0 and _full(trees.scratch)
    state.timings["script"] = time.monotonic() - t1
    # Read the shim's registry now: in a chroot it lives in the /dev tmpfs, unmounted next.
    reg_file, reg_prefix = (merged / "dev/.nsbuild/devices", "/") if job.chroot else (registry, str(merged) + "/")
    try:
        reg_lines = reg_file.read_text()
    except FileNotFoundError:
        reg_lines = ""
    _undo_mounts(state.chroot_mounts)
    state.chroot_mounts = []
    if code != 0:
        return SandboxOutcome("script", code=code, tail=tuple(tail or []), full=full)
    return _finish(job, trees, state, prepared, (reg_lines, reg_prefix))


def _prepare(job: SandboxJob, trees: _Trees, state: _State) -> _Prepared:
    """The merged image the script sees: overlayfs over the assembled lower tree, or (engine copy, or
    no overlayfs here) one tree assembled in place whose reference state is taken for the diff."""
    if job.scratch_mib and job.in_ns:
        # diskSize: everything the script can write lives on a tmpfs of that size.
        trees.scratch = scratch = trees.work / "scratch"
        scratch.mkdir()
        mounts.mount(
            "tmpfs", scratch, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, f"size={int(job.scratch_mib)}m,mode=0755"
        )
        trees.upper, trees.ovlwork, trees.merged = scratch / "upper", scratch / "ovlwork", scratch / "merged"
    for d in (trees.upper, trees.merged):
        d.mkdir()
    lower_devices: dict[str, list] = {}  # base-layer devices the namespace could not create
    if job.engine == "overlay":
        state.overlay = _prepare_overlay(job, trees, state, lower_devices)
    if state.overlay:
        return _Prepared(None, set(), lower_devices)
    merged = trees.merged
    _assemble(job, merged, link=False, devices=lower_devices)
    state.view = _prepare_view(job, merged)
    lower_paths = tree.paths_of(merged)
    upper_paths = tree.paths_of(job.custom_root)
    tree.copy_tree(job.custom_root, merged)
    skip: set[str] = set()
    if job.chroot:
        for name in tree_system_dirs(merged):
            (merged / name).mkdir(mode=0o755)
            skip.add(name)
    return _Prepared(tree.snapshot(merged, lower_paths, upper_paths), skip, lower_devices)


def _prepare_overlay(job: SandboxJob, trees: _Trees, state: _State, lower_devices: dict[str, list]) -> bool:
    """The lower tree and the upper layer's start, then the overlay mount; False (upper emptied again)
    where overlayfs is unavailable."""
    lower, upper = trees.lower, trees.upper
    lower.mkdir()
    trees.ovlwork.mkdir()
    # Copies, never hard links: a link changes the input's ctime (and its owner, should the
    # script chown it through ../lower); a build never modifies its inputs.
    _assemble(job, lower, link=False, devices=lower_devices)
    state.view = _prepare_view(job, lower)
    if job.chroot:
        # Mount points for the chroot, below everything (they never reach the upper layer).
        for name in tree_system_dirs(lower):
            (lower / name).mkdir(mode=0o755)
    tree.copy_tree(job.custom_root, upper)
    if _mount_overlay(trees.work, lower, upper, trees.ovlwork, trees.merged):
        return True
    tree.remove(upper)
    upper.mkdir()
    return False


def _finish(
    job: SandboxJob, trees: _Trees, state: _State, prepared: _Prepared, registry: tuple[str, str]
) -> SandboxOutcome:
    """After the script succeeded: the layer's own tree (diffed where there was no overlay),
    extraCommands on it, the devices it holds, the layer tar. `registry`: the mknod shim's lines and
    the prefix of the paths in them."""
    t2 = time.monotonic()
    upper = trees.upper
    if prepared.snap is not None:
        tree.diff_to_upper(trees.merged, prepared.snap, upper, prepared.skip)
    if job.after_script.strip():
        # runAsRoot's extraCommands: on the new layer's files only, as dockerTools does.
        after_tail: list[str] = []
        code = _run_after(job, upper, after_tail)
        if code != 0:
            raise _AfterFailed(code, after_tail)
    devices = {
        rel: dev
        for rel, dev in prepared.lower_devices.items()
        if (upper / rel).is_file() and not (upper / rel).is_symlink() and (upper / rel).stat().st_size == 0
    }
    devices.update(_devices(*registry, upper))
    if job.caller_ids:
        uid, gid = job.caller_ids
        fakeshims.refuse_ambiguous_caller_ids(upper, uid, gid, trees.work / "fakeroot-shim")
    stats = _write_layer(job, upper, trees.merged, devices)
    state.timings["write"] = time.monotonic() - t2
    return SandboxOutcome("ok", stats=stats, engine="overlay" if state.overlay else "copy")


def _clean_up(trees: _Trees, state: _State) -> None:
    kill_descendants()
    _undo_mounts(state.chroot_mounts)
    if state.overlay:
        with contextlib.suppress(OSError):
            mounts.umount(trees.merged)
    # Files owned by subordinate ids can only be removed from in here.
    if trees.scratch is not None:
        with contextlib.suppress(OSError):
            mounts.umount(trees.scratch)
    for left in (trees.merged, trees.upper, trees.ovlwork, trees.lower, trees.scratch):
        if left is not None:
            with contextlib.suppress(OSError):
                tree.remove(left)


def tree_system_dirs(root: Path) -> list[str]:
    return [n for n in SYSTEM_DIRS if not os.path.lexists(root / n)]


def _prepare_view(job: SandboxJob, root: Path) -> hostview.View | None:
    """Before the layer's reference state is taken: the chroot's mount points for the host view and,
    for runAsRoot, a /tmp where the image has none (the image's own /tmp is used as it is: its files
    are visible and what the script leaves there is in the layer, as in dockerTools' VM)."""
    if not job.chroot:
        return None
    if job.tmp and not os.path.lexists(root / "tmp"):
        (root / "tmp").mkdir(mode=0o755)
        (root / "tmp").chmod(0o1777)
    return hostview.prepare(root, job.store_dir)


if __name__ == "__main__":
    main()
