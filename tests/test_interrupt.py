"""An interrupted build stops every layer thread promptly and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time

import pytest
from support.core import write_spec
from support.users import popen_nsbuild, processes_of, run_nsbuild


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_while_a_huge_layer_is_written(unprivileged_user, user_tmp, sig: signal.Signals) -> None:
    tmp = user_tmp(unprivileged_user)
    big = tmp / "big"
    big.mkdir()
    with open(big / "sparse", "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of holes: minutes to read, so only a real cancellation ends it soon
    small = tmp / "small"
    small.mkdir()
    (small / "f").write_text("x")
    for p in (big, big / "sparse", small, small / "f"):
        os.chmod(p, 0o755)
    spec = write_spec(tmp, {"name": "int", "tag": "t", "compressor": "none", "contents": [str(big), str(small)]})
    scratch = tmp / "scratch"
    scratch.mkdir()
    cache = tmp / "cache"
    out = tmp / "out.tar"
    proc = popen_nsbuild(
        ["layered", str(spec), "-o", str(out), "--cache-dir", str(cache)],
        unprivileged_user,
        env={"TMPDIR": str(scratch)},
    )
    try:
        time.sleep(2)
        assert proc.poll() is None, "the build ended before it was interrupted"
        proc.send_signal(sig)
        # Without cancellation the writer thread would read all 64 GiB before the process could exit.
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr
    assert "interrupted" in (stderr.decode() if isinstance(stderr, bytes) else stderr)
    assert not out.exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".out.tar")] == []
    assert list(scratch.iterdir()) == []
    blobs = cache / "blobs" / "sha256"
    assert not blobs.exists() or [p.name for p in blobs.iterdir() if p.name.startswith(".tmp")] == []
    assert not [cmd for _, cmd in processes_of(unprivileged_user) if str(spec) in cmd]


@pytest.mark.parametrize("output", ["{tmp}/missing-dir/out.tar", "{tmp}", "oci:{tmp}/afile", "oci:{tmp}/junk"])
def test_unwritable_output_is_refused_before_anything_is_built(tmp_path, output: str) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "something").write_text("x")
    spec = write_spec(tmp_path, {"name": "early", "tag": "t", "extraCommands": 'touch "$NSBUILD_SPEC_DIR/ran"'})
    proc = run_nsbuild(["layered", str(spec), "-o", output.format(tmp=tmp_path), "--no-cache"])
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists(), "extraCommands ran although the output could not be written"
