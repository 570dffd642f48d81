"""Load a finished image into the local podman or docker: the uncompressed docker-archive is streamed
into `podman load` / `docker load` through a pipe, as `nsbuild stream | podman load` would, with no
temporary file of ours (what the client does with the stream is its business)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from typing import IO, BinaryIO, cast

from nsbuild.errors import BuildError, UsageError
from nsbuild.image.image import Image
from nsbuild.sinks.sinks import write_docker_archive

# `--load` without a choice: podman first (rootless, no daemon), as the users of this tool expect.
CLIENTS = ("podman", "docker")


def pick_client(wanted: str | None) -> str:
    """The client to load with: the one asked for, which must be installed, or the first found."""
    if wanted is not None:
        if wanted not in CLIENTS:
            raise UsageError(f"--load: expected one of {', '.join(CLIENTS)}, got {wanted!r}")
        if shutil.which(wanted) is None:
            raise UsageError(f"--load: {wanted} is not installed (not found on PATH)")
        return wanted
    for client in CLIENTS:
        if shutil.which(client) is not None:
            return client
    raise UsageError("--load: neither podman nor docker is on PATH; write a file instead (-o NAME.tar)")


def _drain(stream: IO[bytes], into: list[bytes]) -> None:
    into.append(stream.read())


def _loaded_name(stdout: str) -> str | None:
    # podman: "Loaded image: localhost/app:1.0" (older: "Loaded image(s): ..."); docker: "Loaded image: app:1.0".
    for line in stdout.splitlines():
        head, sep, rest = line.partition(":")
        if sep and head.strip().startswith("Loaded image"):
            return rest.strip()
    return None


def load_image(image: Image, client: str, *, repo_tag: str, mtime: int) -> str:
    """Stream `image` into `CLIENT load`; the name the client reports having loaded."""
    argv = [client, "load"]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches us; we stop the client ourselves
        )
    except OSError as exc:
        raise BuildError(f"{client} load: cannot start {client}: {exc.strerror or exc}") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    # Both pipes are drained while we write: a client that talks while reading must never block us.
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
    ]
    for t in readers:
        t.start()
    broken = False
    try:
        try:
            write_docker_archive(image, cast(BinaryIO, proc.stdin), compressor="none", mtime=mtime, repo_tag=repo_tag)
            proc.stdin.close()
        except BrokenPipeError:
            broken = True  # the client stopped reading: its exit status and message say why
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    for t in readers:
        t.join()
    stdout = b"".join(out).decode("utf-8", "replace")
    stderr = b"".join(err).decode("utf-8", "replace").strip()
    if code != 0 or broken:
        last = stderr.splitlines()[-1] if stderr else f"exit status {code}"
        raise BuildError(f"{client} load failed: {last}")
    return _loaded_name(stdout) or repo_tag


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """An interrupted load: the client and whatever it started go, and are waited for."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
