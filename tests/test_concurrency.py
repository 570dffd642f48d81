"""Concurrent processes on one cache or one OCI layout (issue 11): real nsbuild processes, run as the
unprivileged test account at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.core import write_spec
from support.users import account, describe, run_nsbuild
from support.verifiers import oci_validate, umoci_unpack

TIMEOUT = 900  # hang guard only


def make_inputs(d: Path, user: str | None) -> Path:
    """Three content trees (small files and a 2 MiB one each), the user's; a gzip spec naming them."""
    for name in ("alpha", "beta", "gamma"):
        t = d / "in" / name
        (t / "sub").mkdir(parents=True)
        (t / "sub" / "f.txt").write_text(f"{name}\n")
        (t / "big.bin").write_bytes(os.urandom(2 << 20))
    if user is not None:
        acc = account(user)
        for root, dirs, files in os.walk(d):
            for n in [*dirs, *files]:
                os.lchown(os.path.join(root, n), acc.uid, acc.gid)
    return write_spec(
        d,
        {
            "name": "conc",
            "tag": "t",
            "compressor": "gz",
            "mtime": "2023-11-14T22:13:20Z",
            "contents": [{"path": str(d / "in" / n), "target": f"/{n}"} for n in ("alpha", "beta", "gamma")],
        },
    )


def build(spec: Path, out: str, user: str | None, *extra: str) -> subprocess.CompletedProcess:
    return run_nsbuild(["layered", str(spec), "-o", out, *extra], user, timeout=TIMEOUT)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, describe(proc)


def in_parallel(jobs: list[Callable[[], subprocess.CompletedProcess]]) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: job(), jobs))


def layout_tags(layout: Path) -> set[str]:
    index = json.loads((layout / "index.json").read_text())
    images = [m for m in index["manifests"] if "artifactType" not in m]  # not the SBOMs beside them
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in images}


def manifest_of(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    images = [m for m in index["manifests"] if "artifactType" not in m]  # not the SBOMs beside them
    return next(m["digest"] for m in images if m["annotations"]["org.opencontainers.image.ref.name"] == tag)


def test_prune_racing_builds_never_fails_a_build(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    """Builders loop over archive and layout outputs on one cache while two prunes loop on it too."""
    user = user_with_subids
    d = user_tmp(user)
    spec = make_inputs(d, user)
    cache = ["--cache-dir", str(d / "cache")]
    check(build(spec, f"oci-archive:{d / 'ref.tar'}", user, "--no-cache"))
    check(build(spec, f"oci:{d / 'ref'}:t", user, "--no-cache"))
    reference = (d / "ref.tar").read_bytes()
    reference_manifest = manifest_of(d / "ref", "t")
    done = threading.Event()
    prunes: list[subprocess.CompletedProcess] = []

    def pruner() -> None:
        while not done.is_set():
            prunes.append(run_nsbuild(["cache", "prune", "--all", *cache], user, timeout=TIMEOUT))

    def builder(worker: int) -> list[str]:
        problems = []
        for i in range(6):
            name = f"w{worker}-{i}"
            if i % 2:
                proc = build(spec, f"oci:{d / name}:t", user, *cache)
                same = proc.returncode == 0 and manifest_of(d / name, "t") == reference_manifest
            else:
                proc = build(spec, f"oci-archive:{d / name}.tar", user, *cache)
                same = proc.returncode == 0 and (d / f"{name}.tar").read_bytes() == reference
            if not same or "Traceback" in proc.stderr:
                problems.append(describe(proc))
        return problems

    threads = [threading.Thread(target=pruner) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            problems = [p for ps in pool.map(builder, range(3)) for p in ps]
    finally:
        done.set()
        for t in threads:
            t.join()
    assert problems == [], f"{len(problems)} of 18 builds failed or differ:\n" + "\n".join(problems[:3])
    assert len(prunes) >= 4
    for proc in prunes:
        check(proc)
    # Afterwards the cache is consistent and clean: nothing to repair, no temporary left.
    verify = run_nsbuild(["cache", "verify", *cache], user)
    assert verify.returncode == 0, describe(verify)
    du = run_nsbuild(["cache", "du", *cache], user)
    assert "; 0 temporary files" in du.stdout, describe(du)


def populate(cache: Path, user: str | None, entries: int = 1500, blobs: int = 1500) -> None:
    """Many entries (copies of a real one under other fingerprints) and unreferenced blobs: enough
    work that concurrent prunes really overlap."""
    real = next((cache / "layers").glob("*.json")).read_text()
    acc = account(user)
    for i in range(entries):
        p = cache / "layers" / f"{i:064x}.json"
        p.write_text(real)
        os.lchown(p, acc.uid, acc.gid)
    for i in range(blobs):
        p = cache / "blobs" / "sha256" / f"{i + 1 << 128:064x}"
        p.write_bytes(b"x" * 100)
        os.lchown(p, acc.uid, acc.gid)


def test_two_prunes_at_once(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    user = user_with_subids
    d = user_tmp(user)
    spec = make_inputs(d, user)
    cache = ["--cache-dir", str(d / "cache")]
    for _ in range(3):
        check(build(spec, f"oci-archive:{d / 'o.tar'}", user, *cache))
        populate(d / "cache", user)
        procs = in_parallel([lambda: run_nsbuild(["cache", "prune", "--all", *cache], user, timeout=TIMEOUT)] * 4)
        for proc in procs:
            check(proc)
        assert sum(int(p.stdout.split("removed ")[1].split()[0]) for p in procs) == 1503, [p.stdout for p in procs]
        assert list((d / "cache/blobs/sha256").iterdir()) == []


def test_eight_writers_into_one_oci_layout_keep_every_tag(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    user = user_with_subids
    d = user_tmp(user)
    spec = make_inputs(d, user)
    layout = d / "layout"
    rounds = 5  # the first round creates the layout, the others add to it
    for round_ in range(rounds):
        tags = [f"r{round_}-{i}" for i in range(8)]
        procs = in_parallel(
            [lambda tag=tag: build(spec, f"oci:{layout}:{tag}", user, "--cache-dir", str(d / "cache")) for tag in tags]
        )
        for proc in procs:
            check(proc)
        assert set(tags) <= layout_tags(layout), sorted(layout_tags(layout))
    assert len(layout_tags(layout)) == 8 * rounds
    assert len({manifest_of(layout, t) for t in layout_tags(layout)}) == 1  # one image, many names
    oci_validate(layout, user=user)
    mtree = umoci_unpack(layout, "r1-7", d / "bundle", user=user)
    assert "beta/sub/f.txt" in mtree
    assert not [p for p in layout.iterdir() if p.name.startswith(".")]  # no temporary beside the index


def test_eight_builds_sharing_one_cache_match_serial_builds(user_with_subids: str | None, user_tmp) -> None:  # noqa: ANN001
    user = user_with_subids
    d = user_tmp(user)
    spec = make_inputs(d, user)
    check(build(spec, f"oci-archive:{d / 'serial.tar'}", user, "--no-cache", "-j", "1"))
    serial = (d / "serial.tar").read_bytes()
    for round_ in ("cold", "warm"):
        outs = [d / f"{round_}{i}.tar" for i in range(8)]
        procs = in_parallel(
            [lambda out=out: build(spec, f"oci-archive:{out}", user, "--cache-dir", str(d / "cache")) for out in outs]
        )
        for proc in procs:
            check(proc)
        assert all(out.read_bytes() == serial for out in outs), round_
    verify = run_nsbuild(["cache", "verify", "--cache-dir", str(d / "cache")], user)
    assert verify.returncode == 0 and "0 problems" in verify.stdout, describe(verify)


def test_prune_racing_builds_from_a_registry_base(
    user_with_subids: str | None,
    user_tmp,  # noqa: ANN001
    registry: str,
) -> None:
    """Pulled base blobs live in the cache unreferenced by any entry: prune takes them unless the
    build pinned them; a build that finds them pruned between pull and pin downloads them again."""
    user = user_with_subids
    d = user_tmp(user)
    base_spec = make_inputs(d, user)
    check(build(base_spec, f"docker://{registry}/base:1", user, "--no-cache", "--tls-verify=false"))
    child = d / "child"
    child.mkdir()
    (child / "c.txt").write_text("child\n")
    os.lchown(child, account(user).uid, account(user).gid)
    os.lchown(child / "c.txt", account(user).uid, account(user).gid)
    spec = write_spec(
        d,
        {"name": "child", "tag": "1", "fromImage": f"docker://{registry}/base:1", "contents": [str(child)]},
        "child.json",
    )
    args = ["--tls-verify=false"]
    check(build(spec, str(d / "ref.tar"), user, "--no-cache", *args))
    reference = (d / "ref.tar").read_bytes()
    cache = ["--cache-dir", str(d / "cache")]
    done = threading.Event()
    prunes: list[subprocess.CompletedProcess] = []

    def pruner() -> None:
        while not done.is_set():
            prunes.append(run_nsbuild(["cache", "prune", "--all", *cache], user, timeout=TIMEOUT))

    def builder(worker: int) -> list[str]:
        problems = []
        for i in range(5):
            out = d / f"w{worker}-{i}.tar"
            proc = build(spec, str(out), user, *cache, *args)
            if proc.returncode != 0 or "Traceback" in proc.stderr or out.read_bytes() != reference:
                problems.append(describe(proc))
        return problems

    thread = threading.Thread(target=pruner)
    thread.start()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            problems = [p for ps in pool.map(builder, range(2)) for p in ps]
    finally:
        done.set()
        thread.join()
    assert problems == [], f"{len(problems)} of 10 builds failed or differ:\n" + "\n".join(problems[:3])
    for proc in prunes:
        check(proc)
