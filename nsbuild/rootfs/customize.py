"""The customisation layer when fakeRootCommands (or enableFakechroot) is set (DESIGN.md §4)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsbuild.core.perms import PermRule
from nsbuild.errors import BuildError
from nsbuild.sandbox.backends import MODE, USES_FAKEROOT, choose
from nsbuild.sandbox.boundary import hide_own_process, sandbox_env
from nsbuild.sandbox.cleanup import remove_tree
from nsbuild.sandbox.job import Engine, SandboxJob, SandboxOutcome
from nsbuild.sandbox.runner import Command, run
from nsbuild.sandbox.tree import place
from nsbuild.tar.owners import Owner
from nsbuild.tar.tarwriter import Source

STATIC_WARNING = (
    "fakeroot backend: statically linked programs bypass fakeroot; their chown/mknod are not recorded (or fail)"
)


@dataclass(frozen=True)
class CustomisationResult:
    diff_id: str
    size: int
    entries: int
    backend: str
    engine: str  # "overlay" or "copy" (copy-and-diff)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CustomisationJob:
    """What build_customisation_layer runs, and where.

    custom_root      the customisation layer's tree so far (after extraCommands); read, never modified.
    upper_sources    further sources that belong to the customisation layer itself (e.g. store paths
                     folded into it); they are part of the layer whatever the script does.
    lower            earlier layers' host trees at their targets (read only for the script; changing a
                     file copies it up, deleting one writes a whiteout).
    base_layer_tars  fromImage layer tars in order (plain, gz or zstd), applied below `lower`.
    script           bash, run with -e; cwd = the image root (or `/` of a chroot into it when
                     enable_fakechroot: /dev, /proc, /sys are provided and never end up in the layer).
    root_owner       what namespace root (the caller) becomes in the layer; other ids are kept, named from
                     the image's own /etc/passwd and /etc/group.
    perms            the spec's owner and mode rules, applied as the layer is written (after root_owner).
    isolation        "auto" | "userns" | "userns-fakeroot" | "fakeroot";  network "none" | "host".
    workdir          an empty scratch directory on the same file system as custom_root; emptied before
                     returning, whatever happens (files owned by subordinate ids are removed from inside
                     the namespace).
    out_tar          the uncompressed layer tar, written atomically (absent unless the build succeeds).
    log              has .info(str) and .warn(str).
    env              the script's environment (default: nsbuild.sandbox.boundary.sandbox_env()).
    scratch_mib      (runAsRoot's diskSize) the script's writable space is a tmpfs of this many MiB in
                     its mount namespace (copy-and-diff: the whole image copy counts); not enforced
                     by the fakeroot backend (no namespaces), which warns.
    memory_mib       (runAsRoot's buildVMMemorySize) RLIMIT_AS of every script process, in MiB.
    what             "fakeRootCommands" or "runAsRoot" (buildImage), as messages name it: runAsRoot
                     uses the image's own /tmp (created if missing; what it leaves there is in the layer),
                     base layers holding device nodes are refused, and a failure shows the script's last
                     output lines.
    after_script     (buildImage's extraCommands with runAsRoot) bash run after the script, not chrooted,
                     cwd = the new layer's own tree (its files only), with after_env.
    store_dir        (chroot only) the host's store, visible read-only at its own path inside the chroot
                     beside the host's tools (nsbuild.sandbox.hostview); never part of the layer.
    """

    custom_root: Path
    lower: list[Source]
    base_layer_tars: list[Path]
    script: str
    enable_fakechroot: bool
    root_owner: Owner
    mtime: int
    isolation: str
    network: str
    workdir: Path
    out_tar: Path
    log: Any
    upper_sources: list[Source] | None = None
    env: dict[str, str] | None = None
    scratch_mib: int | None = None
    memory_mib: int | None = None
    what: str = "fakeRootCommands"
    after_script: str = ""
    after_env: dict[str, str] | None = None
    store_dir: str | None = None
    perms: tuple[PermRule, ...] = ()


def build_customisation_layer(job: CustomisationJob) -> CustomisationResult:
    """Run fakeRootCommands as namespace root over the image being built; write the customisation layer
    (CustomisationJob says what each field means).

    Raises BuildError (exit 1) when no backend works, the script fails (its status; its output went to
    stderr live), or the layer cannot be written. KeyboardInterrupt propagates after teardown.
    """
    backend = _backend(job)
    work = Path(tempfile.mkdtemp(prefix="fr-", dir=Path(job.workdir)))
    os.chmod(work, 0o755)
    custom = work / "custom-in" if job.upper_sources else Path(job.custom_root)
    result_path = work / "result.json"
    tmp_out = job.out_tar.with_name(job.out_tar.name + ".part")
    plan = _sandbox_job(job, backend, work, custom, tmp_out, result_path)
    what, network = job.what, job.network
    job.log.info(f"{what} backend: {backend} ({'overlayfs' if plan.engine == 'overlay' else 'copy-and-diff'})")
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan.to_wire()))
    argv = [sys.executable, "-m", "nsbuild.sandbox.inner", str(plan_path)]
    # Not the caller's environment: every sandbox process's /proc/PID/environ is visible to the script.
    run_env = sandbox_env()
    if USES_FAKEROOT[backend]:
        argv = ["fakeroot", "--", *argv]
        # fakeroot only forgives EPERM from the real chown; where a single id is mapped (our namespace,
        # or a container we run in) it is EINVAL. The record in fakeroot is what counts anyway.
        run_env["FAKEROOTDONTTRYCHOWN"] = "1"
    try:
        if job.upper_sources:
            # The layer's own content: one tree, custom_root over the folded sources.
            custom.mkdir()
            for s in [*job.upper_sources, Source(Path(job.custom_root), "/")]:
                _copy_source(s, custom)
        res = run(Command(MODE[backend], argv, network=network, env=run_env))
        outcome = _read_result(result_path)
        if outcome is None:
            raise BuildError(f"{what}: the {backend} sandbox failed (exit {res.returncode})")
        _check_outcome(job, backend, outcome)
        os.replace(tmp_out, job.out_tar)
        stats = outcome.stats
        assert stats is not None  # an "ok" outcome carries them (SandboxOutcome.from_wire)
        return CustomisationResult(
            stats.diff_id, stats.size, stats.entries, backend, outcome.engine or "", dict(outcome.timings)
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_out.unlink()
        cleanup(work, backend)


def _backend(job: CustomisationJob) -> str:
    """The sandbox backend for `job.isolation`, refused when it cannot do what the job needs."""
    backend = choose(job.isolation)
    hide_own_process()  # the fakeroot backend's scripts run as the caller, beside this process
    if backend == "fakeroot" and job.enable_fakechroot and job.what == "runAsRoot":
        raise BuildError(
            "runAsRoot needs a user namespace to chroot into the image (backends userns or "
            "userns-fakeroot); the fakeroot backend cannot (see `nsbuild doctor`)"
        )
    if backend == "fakeroot" and job.enable_fakechroot:
        raise BuildError(
            "enableFakechroot needs a user namespace (backends userns or userns-fakeroot); "
            "the fakeroot backend cannot chroot"
        )
    if job.scratch_mib and backend == "fakeroot":
        job.log.warn("fakeroot backend: the disk space limit (diskSize) is not enforced without namespaces")
    if USES_FAKEROOT[backend]:
        job.log.warn(STATIC_WARNING.replace("fakeroot backend", f"{backend} backend"))
    return backend


def _sandbox_job(
    job: CustomisationJob, backend: str, work: Path, custom: Path, tmp_out: Path, result_path: Path
) -> SandboxJob:
    """The job as the inner process (nsbuild.sandbox.inner) reads it."""
    what = job.what
    # NSBUILD_SANDBOX_ENGINE=copy forces copy-and-diff (what userns falls back to without overlayfs).
    engine: Engine = "overlay" if backend == "userns" and os.environ.get("NSBUILD_SANDBOX_ENGINE") != "copy" else "copy"
    return SandboxJob(
        work=work,
        custom_root=custom,
        lower=tuple((str(s.host), s.target) for s in job.lower),
        base_layers=tuple(Path(p) for p in job.base_layer_tars),
        script=job.script,
        chroot=job.enable_fakechroot,
        engine=engine,
        network=job.network,
        out=tmp_out,
        mtime=int(job.mtime),
        result=result_path,
        root_owner=job.root_owner,
        perms=job.perms,
        env=job.env,
        in_ns=backend != "fakeroot",
        scratch_mib=job.scratch_mib,
        memory_mib=job.memory_mib,
        tmp=what == "runAsRoot",
        strict=what == "runAsRoot",
        tail=what == "runAsRoot",
        after_script=job.after_script,
        after_env=job.after_env,
        store_dir=job.store_dir,
        what=what,
        # Without a namespace the caller's real ids can show through fakeroot: they become root.
        caller_ids=(os.getuid(), os.getgid()) if backend == "fakeroot" and os.getuid() != 0 else None,
        # Out of sight for scripts on the host's tree (namespace backends): keys, tokens, credentials.
        hide=tuple(_caller_homes()),
    )


def _check_outcome(job: CustomisationJob, backend: str, outcome: SandboxOutcome) -> None:
    """The inner process's report: a BuildError for anything but a written layer."""
    what, scratch_mib, memory_mib = job.what, job.scratch_mib, job.memory_mib
    status = outcome.status
    tail = "\n".join(outcome.tail or ())
    if status == "script" and outcome.full and scratch_mib:
        raise BuildError(
            f"{what} ran out of disk space: diskSize is {scratch_mib} MiB (raise diskSize)"
            + (f"; its output:\n{tail}" if tail else "")
        )
    if status == "script" and memory_mib and _out_of_memory(outcome):
        raise BuildError(
            f"{what} ran out of memory: buildVMMemorySize is {memory_mib} MiB per process "
            "(raise buildVMMemorySize)" + (f"; its output:\n{tail}" if tail else "")
        )
    if status == "script":
        raise BuildError(
            f"{what} failed with exit status {outcome.code} (backend {backend}"
            + (f"); its output:\n{tail}" if tail else "; its output is above)")
        )
    if status == "after":
        raise BuildError(
            f"extraCommands failed with exit status {outcome.code}"
            + (f"; its output:\n{tail}" if tail else " (no output)")
        )
    if status == "hostile":
        raise BuildError(f"refusing the base image: {outcome.message}")
    if status == "error" and outcome.full and scratch_mib:
        raise BuildError(f"{what}: the image does not fit in diskSize ({scratch_mib} MiB): {outcome.message}")
    if status != "ok":
        # A key the status does not carry is absent on the wire: None here.
        raise BuildError(f"{what} ({backend}): {outcome.message if outcome.message is not None else 'failed'}")


def _caller_homes() -> list[str]:
    """The caller's home directories ($HOME and the password database's), never `/`."""
    import pwd

    homes = {os.environ.get("HOME", "")}
    with contextlib.suppress(KeyError):
        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    return sorted(h for h in homes if h.startswith("/") and os.path.realpath(h) != "/")


OOM_SIGNS = (
    "cannot allocate memory",
    "out of memory",
    "memory exhausted",
    "memoryerror",
    "bad_alloc",
    "failed to allocate",
    "memory allocation failed",
    "memory allocation of",
    "outofmemory",
)


def _out_of_memory(outcome: SandboxOutcome) -> bool:
    """RLIMIT_AS shows up as failed allocations, which programs report in these words. (An exit by
    signal is not taken as a sign: the limit is the default for every runAsRoot, and a crash for
    another reason must not be blamed on it.)"""
    text = "\n".join(outcome.tail or ()).lower()
    return any(s in text for s in OOM_SIGNS)


def _copy_source(s: Source, root: Path) -> None:
    place(Path(s.host), s.target, root, link=False)


def _read_result(path: Path) -> SandboxOutcome | None:
    """None: the inner process wrote no outcome, or not one it could have written (WireError)."""
    try:
        return SandboxOutcome.from_wire(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def cleanup(path: Path, backend: str) -> None:
    """Remove a scratch tree, from inside the namespace where subordinate ids own files in it."""
    remove_tree(path)
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)
