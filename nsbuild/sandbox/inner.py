"""The customisation step as it runs inside the sandbox: `python -m nsbuild.sandbox.inner PLAN.json`.

Runs as namespace root (backend userns / userns-fakeroot) or under fakeroot (userns-fakeroot, fakeroot).
Steps: assemble the earlier layers (lower), prepare the customisation layer's tree (upper), show the
script the merged image (overlayfs, or a copy that is diffed afterwards), run the script, kill whatever
it left running, write the layer with nsbuild.sandbox.layerjob in this same context (so lstat shows the ids and
modes the script set, real or faked), remove the trees. The outcome goes to PLAN["result"] as JSON.

PLAN keys: work, custom_root, lower ([[host, target], ...]), base_layers, script, chroot, engine
("overlay"|"copy"), in_ns, network, out, mtime, root_owner {uid,gid,uname,gname}, result, env,
scratch_mib (writable space on a tmpfs of that size; namespaces only), memory_mib (RLIMIT_AS of each
script process), store_dir and what ("fakeRootCommands" | "runAsRoot", as messages name the script).
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
from pathlib import Path
from typing import Any, Literal

import prctl

from nsbuild.sandbox import boundary, fakeshims, hostview, layerjob, mounts, tree
from nsbuild.sandbox.proc import kill_descendants, status_code

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


def _assemble(plan: dict, root: Path, link: bool, devices: dict[str, list]) -> None:
    # A base image is input from elsewhere: every layer is validated against the tree so far before a
    # byte of it is written (HostileLayer: one clear line, nothing written outside root).
    model = tree.ImageModel(refuse_devices=bool(plan.get("strict")))
    for i, tar in enumerate(plan["base_layers"]):
        tree.unpack_layer(Path(tar), root, devices, model=model, label=f"fromImage layer {i}")
    for host, target in plan["lower"]:
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


def _run_script(plan: dict, merged: Path, tail: list[str] | None = None, view: hostview.View | None = None) -> int:
    chroot = plan["chroot"]
    env = dict(plan["env"]) if plan.get("env") is not None else dict(os.environ)
    # fakeroot's session (preload library, daemon key) must reach the script whatever env it was given.
    env.update({k: v for k, v in os.environ.items() if k.startswith(FAKEROOT_VARS)})
    shell = _shell(merged, chroot, view, plan.get("what", "fakeRootCommands"))
    argv = [*shell, plan["script"]]
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

    memory = plan.get("memory_mib")

    def enter() -> None:
        if memory:
            # buildVMMemorySize: a hard limit on each of the script's processes.
            limit = int(memory) << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if "FAKEROOTKEY" not in os.environ:
        shim_dir = "/dev/.nsbuild" if chroot else str(Path(plan["work"]) / "shim")
        env["PATH"] = shim_dir + ":" + env.get("PATH", CHROOT_PATH)
    elif not chroot:
        env["PATH"] = fakeshims.install(Path(plan["work"]) / "fakeroot-shim") + ":" + env.get("PATH", CHROOT_PATH)
    # The fakeroot shims keep their notes (which inodes a chown went through) beside them.
    shims = Path(plan["work"]) / "fakeroot-shim"
    writable = [merged, Path(plan["work"]) / "reg", *_script_dirs(env), *([shims] if shims.is_dir() else [])]
    return _spawn(argv, env, _behind_boundary(plan, merged if chroot else None, writable, merged, enter, env), tail)


def _script_dirs(env: dict[str, str]) -> list[Path]:
    """The script's $HOME and $TMPDIR (host directories in the build's scratch tree), kept writable."""
    out = []
    for var in ("HOME", "TMPDIR"):
        p = Path(env.get(var, ""))
        if p.is_absolute() and p.is_dir() and not p.is_symlink() and p != Path("/"):
            out.append(p)
    return out


def _behind_boundary(
    plan: dict, root: Path | None, writable: list[Path], cwd: Path, enter: Any, env: dict[str, str]
) -> Any:
    """preexec_fn for a script: behind nsbuild.sandbox.boundary where there are namespaces (the
    caller's home hidden, the spec's directory readable); the fakeroot backend has none (its scripts
    run as the caller, with the caller's view)."""
    if plan.get("in_ns"):
        hidden = [Path(h) for h in plan.get("hide") or [] if Path(h).is_dir() and Path(h) != Path("/")]
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


def _run_after(plan: dict, upper: Path, tail: list[str]) -> int:
    env = dict(plan.get("after_env") or os.environ)
    env.update({k: v for k, v in os.environ.items() if k.startswith(FAKEROOT_VARS)})

    def enter() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    preexec = _behind_boundary(plan, None, [upper, *_script_dirs(env)], upper, enter, env)
    return _spawn(["bash", "--noprofile", "--norc", "-e", "-c", plan["after_script"]], env, preexec, tail)


def _write_layer(plan: dict, upper: Path, names_root: Path, devices: dict[str, list]) -> dict:
    """nsbuild.sandbox.layerjob's job, run in this process: we are already inside the namespace / fakeroot
    session, so lstat shows the ids and modes the script set (and one interpreter start is saved)."""
    owner = plan["root_owner"]
    job = {
        "sources": [[str(upper), "/"]],
        "out": plan["out"],
        "mtime": plan["mtime"],
        "owner": {
            "mode": "mapped",
            **owner,
            "passwd": _image_file(names_root, "etc/passwd"),
            "group": _image_file(names_root, "etc/group"),
        },
        "overlay_whiteouts": True,
        "devices": devices,
    }
    return layerjob.run_job(job)


def _image_file(root: Path, rel: str) -> str | None:
    p = root / rel
    return str(p) if p.is_file() and not p.is_symlink() else None


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    prctl.set_child_subreaper(True)
    os.umask(0o022)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    work = Path(plan["work"])
    lower, upper, ovlwork, merged = work / "lower", work / "upper", work / "ovlwork", work / "merged"
    result: dict = {"status": "error"}
    chroot_mounts: list[Path] = []
    overlay = False
    view: hostview.View | None = None
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    scratch: Path | None = None
    try:
        if plan.get("scratch_mib") and plan.get("in_ns"):
            # diskSize: everything the script can write lives on a tmpfs of that size.
            scratch = work / "scratch"
            scratch.mkdir()
            mounts.mount(
                "tmpfs",
                scratch,
                "tmpfs",
                mounts.MS_NOSUID | mounts.MS_NODEV,
                f"size={int(plan['scratch_mib'])}m,mode=0755",
            )
            upper, ovlwork, merged = scratch / "upper", scratch / "ovlwork", scratch / "merged"
        for d in (upper, merged):
            d.mkdir()
        skip: set[str] = set()
        lower_devices: dict[str, list] = {}  # base-layer devices the namespace could not create
        if plan["engine"] == "overlay":
            lower.mkdir()
            ovlwork.mkdir()
            # Copies, never hard links: a link changes the input's ctime (and its owner, should the
            # script chown it through ../lower); a build never modifies its inputs.
            _assemble(plan, lower, link=False, devices=lower_devices)
            view = _prepare_view(plan, lower)
            if plan["chroot"]:
                # Mount points for the chroot, below everything (they never reach the upper layer).
                for name in tree_system_dirs(lower, plan):
                    (lower / name).mkdir(mode=0o755)
            tree.copy_tree(Path(plan["custom_root"]), upper)
            overlay = _mount_overlay(work, lower, upper, ovlwork, merged)
            if not overlay:
                tree.remove(upper)
                upper.mkdir()
        if not overlay:
            _assemble(plan, merged, link=False, devices=lower_devices)
            view = _prepare_view(plan, merged)
            lower_paths = tree.paths_of(merged)
            upper_paths = tree.paths_of(Path(plan["custom_root"]))
            tree.copy_tree(Path(plan["custom_root"]), merged)
            if plan["chroot"]:
                for name in tree_system_dirs(merged, plan):
                    (merged / name).mkdir(mode=0o755)
                    skip.add(name)
            snap = tree.snapshot(merged, lower_paths, upper_paths)
        timings["prepare"] = time.monotonic() - t0
        # The shim's registry: in a directory of its own, writable for the script (the rest of the
        # scratch tree is read-only to it).
        (work / "reg").mkdir()
        registry = work / "reg" / "devices.tsv"
        if "FAKEROOTKEY" not in os.environ:
            (work / "shim").mkdir()
            _write_shim(work / "shim", str(registry))
        if plan["chroot"]:
            chroot_mounts = _setup_chroot(merged, plan["network"])
            if view is not None:
                (work / "empty").mkdir()
                chroot_mounts += hostview.mount(merged, view, work / "empty")
        _wait_for_network()
        t1 = time.monotonic()
        tail: list[str] | None = [] if plan.get("tail") else None
        code = _run_script(plan, merged, tail, view)
        # Before the mounts go: did the script fill its diskSize-limited space?
        full = code != 0 and _full(scratch)
        timings["script"] = time.monotonic() - t1
        # Read the shim's registry now: in a chroot it lives in the /dev tmpfs, unmounted next.
        reg_file, reg_prefix = (
            (merged / "dev/.nsbuild/devices", "/") if plan["chroot"] else (registry, str(merged) + "/")
        )
        try:
            reg_lines = reg_file.read_text()
        except FileNotFoundError:
            reg_lines = ""
        _undo_mounts(chroot_mounts)
        chroot_mounts = []
        if code != 0:
            result = {"status": "script", "code": code, "tail": tail or [], "full": full}
        else:
            t2 = time.monotonic()
            if not overlay:
                tree.diff_to_upper(merged, snap, upper, skip)
            if plan.get("after_script", "").strip():
                # runAsRoot's extraCommands: on the new layer's files only, as dockerTools does.
                after_tail: list[str] = []
                code = _run_after(plan, upper, after_tail)
                if code != 0:
                    raise _AfterFailed(code, after_tail)
            devices = {
                rel: dev
                for rel, dev in lower_devices.items()
                if (upper / rel).is_file() and not (upper / rel).is_symlink() and (upper / rel).stat().st_size == 0
            }
            devices.update(_devices(reg_lines, reg_prefix, upper))
            if plan.get("caller_ids"):
                uid, gid = plan["caller_ids"]
                fakeshims.refuse_ambiguous_caller_ids(upper, uid, gid, work / "fakeroot-shim")
            stats = _write_layer(plan, upper, merged, devices)
            timings["write"] = time.monotonic() - t2
            result = {"status": "ok", "stats": stats, "engine": "overlay" if overlay else "copy"}
    except _AfterFailed as exc:
        result = {"status": "after", "code": exc.code, "tail": exc.tail}
    except fakeshims.Unrecordable as exc:
        result = {"status": "error", "message": str(exc)}
    except tree.HostileLayer as exc:
        result = {"status": "hostile", "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        result = {
            "status": "error",
            "message": str(exc) or type(exc).__name__,
            "full": isinstance(exc, OSError) and exc.errno == errno.ENOSPC,
        }
    finally:
        kill_descendants()
        _undo_mounts(chroot_mounts)
        if overlay:
            with contextlib.suppress(OSError):
                mounts.umount(merged)
        # Files owned by subordinate ids can only be removed from in here.
        if scratch is not None:
            with contextlib.suppress(OSError):
                mounts.umount(scratch)
        for left in (merged, upper, ovlwork, lower, scratch):
            if left is not None:
                with contextlib.suppress(OSError):
                    tree.remove(left)
        result["timings"] = timings
        Path(plan["result"]).write_text(json.dumps(result))
    sys.exit(0)


def tree_system_dirs(root: Path, plan: dict | None = None) -> list[str]:
    return [n for n in SYSTEM_DIRS if not os.path.lexists(root / n)]


def _prepare_view(plan: dict, root: Path) -> hostview.View | None:
    """Before the layer's reference state is taken: the chroot's mount points for the host view and,
    for runAsRoot, a /tmp where the image has none (the image's own /tmp is used as it is: its files
    are visible and what the script leaves there is in the layer, as in dockerTools' VM)."""
    if not plan["chroot"]:
        return None
    if plan.get("tmp") and not os.path.lexists(root / "tmp"):
        (root / "tmp").mkdir(mode=0o755)
        (root / "tmp").chmod(0o1777)
    return hostview.prepare(root, plan.get("store_dir"))


if __name__ == "__main__":
    main()
