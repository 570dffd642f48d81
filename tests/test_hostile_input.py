"""Malformed base images and specs (issues 10 and 11): every bad input ends in one line, quickly.

The tar archives here are crafted byte by byte (Python's tarfile cannot write a negative size, a bad
checksum or a non-octal number); nsbuild runs as the unprivileged test account with its own TMPDIR,
which must be empty afterwards (no workspace left), and writes no output.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from support.layouts import Layout, image_config, layer_descriptor, sha256
from support.users import UserTmpFactory, account, describe, is_root, run_nsbuild

from nsbuild.tar.tarscan import TarFormatError, iter_members

BLOCK = 512


# --- crafting tars byte by byte ------------------------------------------------------------------------


def octal(n: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def base256(n: int, width: int = 12) -> bytes:
    """GNU base-256: 0x80 + big-endian for a positive number, two's complement (0xff...) for a negative one."""
    if n < 0:
        return (n % 256**width).to_bytes(width, "big")
    return b"\x80" + n.to_bytes(width - 1, "big")


def header(
    name: bytes,
    size: int = 0,
    kind: bytes = b"0",
    *,
    link: bytes = b"",
    mode: int = 0o644,
    size_field: bytes | None = None,
    fields: dict[int, bytes] | None = None,
    checksum: int | None = None,
) -> bytes:
    """One ustar header; `fields` overwrites raw bytes at offsets (before the checksum is computed)."""
    h = bytearray(BLOCK)
    h[0 : len(name)] = name
    h[100:108] = octal(mode, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = size_field if size_field is not None else octal(size, 12)
    h[136:148] = octal(1, 12)
    h[156:157] = kind
    h[157 : 157 + len(link)] = link
    h[257:265] = b"ustar\x0000"
    for off, raw in (fields or {}).items():
        h[off : off + len(raw)] = raw
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % (sum(h) if checksum is None else checksum)
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes = b"", kind: bytes = b"0", **kw: object) -> bytes:
    return header(name, len(data), kind, **kw) + pad(data)  # type: ignore[arg-type]


def pax(records: dict[str, str] | bytes) -> bytes:
    if isinstance(records, bytes):
        body = records
    else:
        body = b""
        for k, v in records.items():
            rec = f" {k}={v}\n".encode()
            n = len(rec) + 1
            while len(str(n)) + len(rec) != n:  # the length counts its own digits
                n = len(str(n)) + len(rec)
            body += str(n).encode() + rec
    return member(b"PaxHeader/x", body, b"x")


END = bytes(2 * BLOCK)


def good_layer() -> bytes:
    return member(b"etc/", kind=b"5", mode=0o755) + member(b"etc/hostname", b"hostile\n") + END


def docker_archive(layers: list[bytes], tail: bytes = b"", end: bytes = END) -> bytes:
    """A docker-archive of `layers`; `tail` goes after the layers, before the end-of-archive blocks."""
    diff_ids = ["sha256:" + hashlib.sha256(d).hexdigest() for d in layers]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"L{i}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["hostile:latest"], "Layers": names}]).encode()
    out = member(b"manifest.json", manifest) + member(config_name.encode(), config)
    for name, data in zip(names, layers, strict=True):
        out += member(name.encode(), data)
    return out + tail + end


def oci_layout(root: Path, layers: list[bytes], config: bytes | None = None) -> None:
    oci = Layout(root)
    if config is None:
        config = image_config([sha256(d) for d in layers])
    oci.finish(config, [layer_descriptor(oci.put(d), len(d)) for d in layers])


def oci_archive(layers: list[bytes], tail: bytes = b"", scratch: Path | None = None) -> bytes:
    """An OCI archive (the layout as a tar) with `tail` before its end-of-archive blocks."""
    assert scratch is not None
    oci_layout(scratch, layers)
    out = b""
    for dirpath, dirnames, filenames in sorted(os.walk(scratch)):
        dirnames.sort()
        for n in sorted(filenames):
            p = Path(dirpath) / n
            out += member(str(p.relative_to(scratch)).encode(), p.read_bytes())
    shutil.rmtree(scratch)
    return out + tail + END


# --- malformed headers ------------------------------------------------------------------------------------

ONE = member(b"a", b"1")
# name → (tar bytes of one layer or of the tail of an outer archive, a fragment of the one error line)
MALFORMED: dict[str, tuple[bytes, str]] = {
    "negative-size-base256": (ONE + header(b"neg", size_field=base256(-512)) + END, "negative size"),
    "negative-size-loop-back": (ONE + header(b"neg", size_field=base256(-1024)) + END, "negative size"),
    "size-with-sign": (ONE + header(b"neg", size_field=b"-0000001000\0") + END, "not an octal number"),
    "size-not-octal": (ONE + header(b"x", size_field=b"0000000009\0 ") + END, "not an octal number"),
    "size-underscore": (ONE + header(b"x", size_field=b"00000_00001\0") + END, "not an octal number"),
    "mode-not-octal": (ONE + header(b"x", fields={100: b"0o64400\0"}) + END, "not an octal number"),
    "uid-negative": (ONE + header(b"x", fields={108: b"\xff" * 8}) + END, "negative uid"),
    "bad-checksum": (ONE + header(b"x", checksum=1234) + END, "bad header checksum"),
    "absurd-size": (ONE + header(b"huge", size=(8 << 30) - 1) + b"h" * BLOCK + END, "absurd size"),
    "huge-base256-size": (ONE + header(b"huge", size_field=base256(1 << 80)) + END, "absurd size"),
    "truncated-member": ((ONE + member(b"big", b"y" * 20000))[:3000], "truncated"),
    "no-end-marker": (ONE, "no end-of-archive marker"),
    "half-header": (ONE + header(b"x")[:300], "no end-of-archive marker"),
    "data-after-end": (ONE + bytes(BLOCK) + member(b"hidden", b"x") + END, "after the end-of-archive marker"),
    "dir-with-data": (ONE + header(b"d/", size=BLOCK, kind=b"5") + bytes(BLOCK) + END, "declares 512 bytes"),
    "symlink-with-data": (
        ONE + header(b"l", size=BLOCK, kind=b"2", link=b"a") + bytes(BLOCK) + END,
        "declares 512 bytes",
    ),
    "unknown-type": (ONE + member(b"v", b"x", b"V") + END, "unsupported entry type"),
    "gnu-sparse": (ONE + member(b"s", b"x", b"S") + END, "unsupported entry type"),
    "pax-negative-size": (ONE + pax({"size": "-512"}) + header(b"p") + END, "not a non-negative decimal"),
    "pax-size-not-number": (ONE + pax({"size": "abc"}) + header(b"p") + END, "not a non-negative decimal"),
    "pax-bad-length": (ONE + pax(b"99 path=a\n") + header(b"p") + END, "malformed PAX record"),
    "pax-no-equals": (ONE + pax(b"9 pathx\n\n") + header(b"p") + END, "malformed PAX record"),
    "pax-nul-in-path": (ONE + pax({"path": "a\0b"}) + header(b"p") + END, "NUL byte"),
    "pax-chained": (ONE + pax({"path": "one"}) + pax({"path": "two"}) + header(b"p") + END, "two extended headers"),
    "pax-without-entry": (ONE + pax({"path": "one"}) + END, "describes no entry"),
    "global-pax-path": (ONE + member(b"g", b"15 path=/etc/x\n", b"g") + header(b"p") + END, "global PAX header"),
    "gnu-longname-too-big": (
        ONE + header(b"././@LongLink", size=(2 << 20), kind=b"L") + bytes(2 << 20) + END,
        "extended header of",
    ),
}
OUTER_ONLY: set[str] = set()


def _prepare(work: Path, user: str | None, spec: dict) -> tuple[Path, Path, Path]:
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    out = work / "out.tar"
    if is_root():
        acc = account(user)
        for dirpath, dirnames, filenames in os.walk(work):
            for n in [dirpath, *[os.path.join(dirpath, x) for x in dirnames + filenames]]:
                os.lchown(n, acc.uid, acc.gid)
    return spec_path, tmp, out


def assert_one_line(proc, code: int, needle: str, tmp: Path, out: Path, what: object) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode == code, (what, describe(proc))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsbuild: error:"), (what, describe(proc))
    assert needle in lines[0], (what, needle, describe(proc))
    assert "Traceback" not in proc.stderr
    assert not out.exists(), what
    assert os.listdir(tmp) == [], (what, "left behind", os.listdir(tmp))


def _run(work: Path, user: str | None, kind: str, spec: dict) -> tuple[object, Path, Path]:
    spec_path, tmp, out = _prepare(work, user, spec)
    # A hang is a failure: every case must be refused at once (60 s for what takes well under 1 s).
    proc = run_nsbuild(
        [kind, spec_path, "-o", out, "--no-cache", "-q"], user=user, env={"TMPDIR": str(tmp)}, timeout=60
    )
    return proc, tmp, out


PLACES = ("docker-layer", "oci-layout-layer", "docker-outer", "oci-archive-outer")


@pytest.mark.parametrize("place", PLACES)
def test_malformed_headers_refused(place: str, user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """Every malformed header, in a layer and in the outer archive, of both archive kinds, through both
    commands: exit 1, one line naming the problem, no workspace left, no output."""
    user = user_with_subids
    work = user_tmp(user)
    for name, (data, needle) in MALFORMED.items():
        case = work / name
        case.mkdir()
        if place == "docker-layer":
            (case / "base.tar").write_bytes(docker_archive([good_layer(), data]))
            ref, where = str(case / "base.tar"), "layer 1"
        elif place == "oci-layout-layer":
            oci_layout(case / "oci", [data])
            ref, where = f"oci:{case / 'oci'}:t", "layer 0"
        elif place == "docker-outer":
            # The malformed bytes stand where the outer archive's next member would be.
            tail = data[len(ONE) :]
            (case / "base.tar").write_bytes(docker_archive([good_layer()], tail=tail, end=b""))
            ref, where = str(case / "base.tar"), "base.tar"
        else:
            tail = data[len(ONE) :]
            raw = oci_archive([good_layer()], scratch=case / "scratch")
            (case / "base.tar").write_bytes(raw[: -len(END)] + tail)
            ref, where = f"oci-archive:{case / 'base.tar'}:t", "base.tar"
        for kind in ("layered", "image"):
            proc, tmp, out = _run(
                case, user, kind, {"name": "victim", "tag": "t", "compressor": "none", "fromImage": ref}
            )
            assert_one_line(proc, 1, needle, tmp, out, (place, name, kind))
            assert where in proc.stderr, (place, name, kind, proc.stderr)


def test_good_crafted_base_builds(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """The crafting helpers make images nsbuild accepts (the refusals above are about the one bad field),
    PAX records and GNU long names included."""
    user = user_with_subids
    work = user_tmp(user)
    long = b"d/" + b"n" * 150
    layer = (
        good_layer()[: -len(END)]
        + pax({"path": "etc/pax-named", "uid": "1000"})
        + header(b"short", 3)
        + pad(b"abc")
        + member(b"././@LongLink", long + b"\0", b"L")
        + header(b"trunc", 0)
        + member(b"sym", kind=b"2", link=b"etc/hostname")
        + END
    )
    (work / "base.tar").write_bytes(docker_archive([layer]))
    for kind in ("layered", "image"):
        proc, tmp, out = _run(
            work, user, kind, {"name": "ok", "tag": "t", "compressor": "none", "fromImage": str(work / "base.tar")}
        )
        assert proc.returncode == 0, describe(proc)
        assert os.listdir(tmp) == []
        out.unlink()


# --- whiteouts that name no file (issue 11) --------------------------------------------------------------


WHITEOUTS = {
    "dotdot-root": b".wh...",
    "dot-root": b".wh..",
    "empty-root": b".wh.",
    "dotdot-deep": b"etc/.wh...",
    "dot-deep": b"etc/.wh..",
    "empty-deep": b"etc/.wh.",
}


@pytest.mark.parametrize("mode", ["image", "layered-fakeRootCommands"])
def test_overlong_names_refused(mode: str, user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """A base entry whose name (PAX) has a component over NAME_MAX or is longer than PATH_MAX is refused
    before anything is unpacked, with one line (not an OSError half-way through)."""
    user = user_with_subids
    work = user_tmp(user)
    for name, path in {"component": "etc/" + "c" * 300, "total": "d/" * 2100 + "f"}.items():
        case = work / name
        case.mkdir()
        bad = pax({"path": path}) + header(b"placeholder", 0) + END
        (case / "base.tar").write_bytes(docker_archive([good_layer(), bad]))
        spec = {"name": "victim", "tag": "t", "compressor": "none", "fromImage": str(case / "base.tar")}
        kind = "image"
        if mode != "image":
            kind, spec["fakeRootCommands"] = "layered", "true"
        proc, tmp, out = _run(case, user, kind, spec)
        assert_one_line(proc, 1, "longer than the kernel takes", tmp, out, (name, mode))


@pytest.mark.parametrize("mode", ["image", "layered-fakeRootCommands"])
def test_whiteouts_of_dot_names_refused(mode: str, user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """`.wh...` would delete the parent of the unpack root, `.wh..`/`.wh.` the directory itself: refused,
    whether the layer is only read (image) or unpacked in the sandbox (fakeRootCommands), and the
    directory around the build's TMPDIR keeps its files."""
    user = user_with_subids
    work = user_tmp(user)
    for name, wh in WHITEOUTS.items():
        case = work / name
        case.mkdir()
        (case / "canary").write_text("keep me\n")
        (case / "base.tar").write_bytes(docker_archive([good_layer(), member(wh) + END]))
        spec = {"name": "victim", "tag": "t", "compressor": "none", "fromImage": str(case / "base.tar")}
        kind = "image"
        if mode != "image":
            kind, spec["fakeRootCommands"] = "layered", "true"
        proc, tmp, out = _run(case, user, kind, spec)
        assert_one_line(proc, 1, "is a whiteout of", tmp, out, (name, mode))
        assert (case / "canary").read_text() == "keep me\n" and (case / "base.tar").exists(), name


def test_ordinary_whiteouts_and_overlay_xattrs(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """A normal whiteout and an opaque marker still work; an overlayfs xattr on a base entry is refused
    (overlayfs would read it from the lower layer the script's mount is made of)."""
    user = user_with_subids
    work = user_tmp(user)
    upper = member(b"etc/.wh.hostname") + member(b"etc/.wh..wh..opq") + member(b"etc/new", b"n\n") + END
    (work / "base.tar").write_bytes(docker_archive([good_layer(), upper]))
    spec = {
        "name": "ok",
        "tag": "t",
        "compressor": "none",
        "fromImage": str(work / "base.tar"),
        "fakeRootCommands": "test ! -e etc/hostname && test -f etc/new",
    }
    proc, tmp, out = _run(work, user, "layered", spec)
    assert proc.returncode == 0, describe(proc)
    out.unlink()
    bad = pax({"SCHILY.xattr.user.overlay.redirect": "/etc"}) + header(b"etc/", kind=b"5", mode=0o755) + END
    (work / "base.tar").write_bytes(docker_archive([bad]))
    proc, tmp, out = _run(work, user, "layered", spec)
    assert_one_line(proc, 1, "overlayfs attribute", tmp, out, "xattr")


# --- the strict reader agrees with tarfile (the sandbox unpacks with tarfile) -----------------------------


def _sample_archives() -> list[bytes]:
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for name, kind, data in [
                ("etc", tarfile.DIRTYPE, b""),
                ("etc/passwd", tarfile.REGTYPE, b"root:x:0\n"),
                ("a/" + "long" * 30 + "/" + "x" * 60, tarfile.REGTYPE, b"z" * 700),
                ("lnk", tarfile.SYMTYPE, b""),
                ("hard", tarfile.LNKTYPE, b""),
                ("fifo", tarfile.FIFOTYPE, b""),
            ]:
                ti = tarfile.TarInfo(name)
                ti.type = kind
                ti.size = len(data)
                ti.linkname = "etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                if fmt == tarfile.PAX_FORMAT:
                    ti.pax_headers = {"comment": "x"}
                tf.addfile(ti, io.BytesIO(data) if data else None)
        out.append(buf.getvalue())
    return out


def _ours(data: bytes) -> list[tuple] | None:
    try:
        return [
            (m.name, m.type, m.size if m.isreg() else 0, m.linkname, m.data_offset)
            for m in iter_members(io.BytesIO(data), len(data))
        ]
    except TarFormatError:
        return None


def _theirs(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [(m.name, m.type, m.size if m.isreg() else 0, m.linkname, m.offset_data) for m in tf.getmembers()]


def test_strict_reader_reads_what_tarfile_reads() -> None:
    """Random byte flips in the headers of ustar, GNU and PAX archives: whatever the strict reader
    accepts, tarfile reads as the same entries (names, types, sizes, link targets, data offsets), so the
    layer that was checked is the layer that gets unpacked. (Seeded: the same cases every run.)"""
    rng = random.Random(10)
    accepted = refused = 0
    for data in _sample_archives():
        assert _ours(data) == _theirs(data)
        members = list(iter_members(io.BytesIO(data), len(data)))
        # Every header: the entries' own and their extended (PAX, GNU long name) headers and records.
        headers = sorted({m.data_offset - BLOCK for m in members} | {m.offset for m in members})
        for _ in range(3000):
            raw = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                base = rng.choice(headers) if rng.random() < 0.8 else rng.randrange(0, len(raw) - BLOCK)
                at = base + rng.randrange(2 * BLOCK if base in headers else BLOCK)
                raw[at] = rng.choice(b"\0 /.-+_0789aLKxgS5=\n\x80\xff")
            if rng.random() < 0.5:  # keep the checksum right, or the flip is only ever a bad checksum
                for off in headers:
                    raw[off + 148 : off + 156] = b" " * 8
                    raw[off + 148 : off + 156] = b"%06o\0 " % sum(raw[off : off + BLOCK])
            ours = _ours(bytes(raw))
            if ours is None:
                refused += 1
                continue
            accepted += 1
            assert ours == _theirs(bytes(raw)), bytes(raw)
    assert accepted > 100 and refused > 100, (accepted, refused)  # both branches really ran


# --- a million entries -------------------------------------------------------------------------------------


def test_million_entry_layer(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """A base layer of a million entries is read in time linear in the entries: a generous timeout
    catches a hang or quadratic behaviour (it took well over two minutes before); the time is printed."""
    user = user_with_subids
    work = user_tmp(user)
    layer_path = work / "layer.tar"
    with open(layer_path, "wb") as f:  # 512 MiB: written as it is made, not held in memory
        for d in range(1000):
            f.write(header(b"d%04d/" % d, kind=b"5", mode=0o755))
            f.write(b"".join(header(b"d%04d/f%04d" % (d, i)) for i in range(1000)))
        f.write(END)
    with open(layer_path, "rb") as f:
        diff_id = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    ).encode()
    manifest = json.dumps([{"Config": "c.json", "RepoTags": ["big:t"], "Layers": ["L0/layer.tar"]}]).encode()
    size = layer_path.stat().st_size
    with open(work / "base.tar", "wb") as out_f, open(layer_path, "rb") as src:
        out_f.write(member(b"manifest.json", manifest) + member(b"c.json", config) + header(b"L0/layer.tar", size))
        shutil.copyfileobj(src, out_f, 1 << 20)
        out_f.write(pad(b"") + END)
    layer_path.unlink()
    for kind in ("layered", "image"):
        spec_path, tmp, out = _prepare(
            work, user, {"name": "big", "tag": "t", "compressor": "none", "fromImage": str(work / "base.tar")}
        )
        t0 = time.monotonic()
        proc = run_nsbuild(
            [kind, spec_path, "-o", out, "--no-cache", "-q"], user=user, env={"TMPDIR": str(tmp)}, timeout=300
        )
        print(f"{kind}: a million-entry base layer in {time.monotonic() - t0:.1f} s")
        assert proc.returncode == 0, describe(proc)
        assert os.listdir(tmp) == []
        out.unlink()


# --- specs that crashed --------------------------------------------------------------------------------------

BASE_SPEC = '{"name": "x", "tag": "t", "contents": ["root"]'
# name → (spec text, extra environment, the field the one line names, a fragment of it)
BAD_SPECS: dict[str, tuple[str, dict[str, str], str, str]] = {
    "deep-100000": (
        '{"name": "x", "config": {"Labels": ' + "[" * 100000 + "]" * 100000 + "}}",
        {},
        "spec.json",
        "nested too deeply",
    ),
    "deep-40": (
        '{"name": "x", "config": {"Labels": ' + "[" * 40 + "]" * 40 + "}}",
        {},
        "config.Labels[0]",
        "levels deep",
    ),
    "int-5000-digits": (BASE_SPEC + ', "uid": ' + "9" * 5000 + "}", {}, "uid", "5000 digits"),
    "nan": (BASE_SPEC + ', "uid": NaN}', {}, "spec.json", "NaN is not JSON"),
    "nul-in-script": (BASE_SPEC + ', "extraCommands": "echo a\\u0000b"}', {}, "extraCommands", "NUL byte"),
    "nul-in-fakeroot": (BASE_SPEC + ', "fakeRootCommands": "\\u0000"}', {}, "fakeRootCommands", "NUL byte"),
    "nul-in-target": (
        '{"name": "x", "contents": [{"path": "root", "target": "/a\\u0000b"}]}',
        {},
        "contents[0].target",
        "NUL byte",
    ),
    "nul-in-storeDir": (BASE_SPEC + ', "storeDir": "/nix/st\\u0000ore"}', {}, "storeDir", "NUL byte"),
    "nul-in-label": (
        BASE_SPEC + ', "config": {"Labels": {"org.example.a": "b\\u0000"}}}',
        {},
        'config.Labels["org.example.a"]',
        "NUL byte",
    ),
    "lone-surrogate": (BASE_SPEC + ', "extraCommands": "\\ud800"}', {}, "extraCommands", "surrogate"),
    "name-10000": (BASE_SPEC.replace('"x"', '"' + "a" * 10000 + '"', 1) + "}", {}, "name", "at most 255"),
    "target-component-300": (
        '{"name": "x", "contents": [{"path": "root", "target": "/' + "a" * 300 + '"}]}',
        {},
        "contents[0].target",
        "at most 255",
    ),
    "path-6000": ('{"name": "x", "contents": ["' + "a/" * 3000 + '"]}', {}, "contents[0]", "at most 4095"),
    "fromImage-long": (BASE_SPEC + ', "fromImage": "' + "b" * 300 + '.tar"}', {}, "fromImage", "at most 255"),
    "storeDir-long": (BASE_SPEC + ', "storeDir": "/' + "s" * 300 + '"}', {}, "storeDir", "at most 255"),
    "epoch-superscript": (BASE_SPEC + "}", {"SOURCE_DATE_EPOCH": "²"}, "SOURCE_DATE_EPOCH", "whole seconds"),
    "epoch-20-digits": (BASE_SPEC + "}", {"SOURCE_DATE_EPOCH": "9" * 20}, "SOURCE_DATE_EPOCH", "whole seconds"),
    "created-after-9999": (BASE_SPEC + ', "created": "9999-12-31T23:59:59-23:59"}', {}, "created", "after 9999"),
}


def test_bad_specs_one_line(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """Specs that used to end in a traceback (or build): exit 2, one line naming the field, nothing left."""
    user = user_with_subids
    work = user_tmp(user)
    (work / "root").mkdir()
    (work / "root" / "f").write_text("x\n")
    for name, (text, env, field, needle) in BAD_SPECS.items():
        spec_path, tmp, out = _prepare(work, user, {})
        spec_path.write_text(text, encoding="utf-8", errors="surrogatepass")
        proc = run_nsbuild(
            ["layered", spec_path, "-o", out, "--no-cache", "-q"],
            user=user,
            env={"TMPDIR": str(tmp), **env},
            timeout=60,
        )
        assert_one_line(proc, 2, needle, tmp, out, name)
        assert f"error: {field}" in proc.stderr or (field == "spec.json" and "spec.json:" in proc.stderr), (
            name,
            proc.stderr,
        )


def test_dev_zero_as_spec(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """/dev/zero is read up to the size cap, never to the end of memory."""
    user = user_with_subids
    work = user_tmp(user)
    _, tmp, out = _prepare(work, user, {})
    proc = run_nsbuild(["layered", "/dev/zero", "-o", out, "-q"], user=user, env={"TMPDIR": str(tmp)}, timeout=60)
    assert_one_line(proc, 2, "/dev/zero: larger than", tmp, out, "/dev/zero")


# --- manifests, indexes and configs of the wrong shape -------------------------------------------------------


def _docker_with(manifest: bytes, config: bytes) -> bytes:
    layer = good_layer()
    return member(b"manifest.json", manifest) + member(b"c.json", config) + member(b"L0/layer.tar", layer) + END


def test_malformed_image_metadata(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """JSON of the wrong type, nested past the recursion limit, with a 5000-digit number, or not JSON, in
    a docker-archive's manifest.json or config and an OCI layout's index or config: exit 1, one line."""
    user = user_with_subids
    work = user_tmp(user)
    did = "sha256:" + hashlib.sha256(good_layer()).hexdigest()
    cfg = {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [did]}}
    ok_manifest = json.dumps([{"Config": "c.json", "Layers": ["L0/layer.tar"]}]).encode()
    docker_cases = {
        "manifest-of-numbers": (b"[1]", json.dumps(cfg).encode(), "malformed manifest"),
        "manifest-config-number": (b'[{"Config": 1}]', json.dumps(cfg).encode(), "Config missing"),
        "manifest-deep": (b"[" * 100000 + b"]" * 100000, json.dumps(cfg).encode(), "nested too deeply"),
        "config-list": (ok_manifest, b"[]", "expected a JSON object"),
        "config-deep": (ok_manifest, b'{"a":' * 100000 + b"1" + b"}" * 100000, "nested too deeply"),
        "config-big-int": (ok_manifest, b'{"a": ' + b"9" * 5000 + b"}", "invalid JSON"),
        "config-not-json": (ok_manifest, b"{nope", "invalid JSON"),
        "config-env-number": (ok_manifest, json.dumps({**cfg, "config": {"Env": 5}}).encode(), "config.Env"),
        "config-label-number": (
            ok_manifest,
            json.dumps({**cfg, "config": {"Labels": {"a": 1}}}).encode(),
            "config.Labels",
        ),
        "config-history-number": (ok_manifest, json.dumps({**cfg, "history": 5}).encode(), "history"),
    }
    for name, (manifest, config, needle) in docker_cases.items():
        case = work / name
        case.mkdir()
        (case / "base.tar").write_bytes(_docker_with(manifest, config))
        for kind in ("layered", "image"):
            proc, tmp, out = _run(
                case, user, kind, {"name": "v", "tag": "t", "compressor": "none", "fromImage": str(case / "base.tar")}
            )
            assert_one_line(proc, 1, needle, tmp, out, (name, kind))
    oci_cases = {
        "index-list": (b"[]", "lists no manifest"),
        "index-manifests-numbers": (b'{"manifests": [1]}', "malformed manifest"),
        "index-digest-number": (b'{"manifests": [{"digest": 5}]}', "not a sha256 digest"),
        "index-deep": (b'{"manifests": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    }
    for name, (index, needle) in oci_cases.items():
        case = work / name
        case.mkdir()
        oci_layout(case / "oci", [good_layer()])
        (case / "oci" / "index.json").write_bytes(index)
        proc, tmp, out = _run(
            case, user, "layered", {"name": "v", "tag": "t", "compressor": "none", "fromImage": f"oci:{case / 'oci'}"}
        )
        assert_one_line(proc, 1, needle, tmp, out, name)
