"""`perms` (issue 16): owner and mode rules declared in the spec, applied as each layer tar is written.

Builds run the installed nsbuild as the unprivileged accounts (every backend each can use for the
script cases); layers are read back with GNU tar (`tar -tvv`, numeric and named), `nsbuild inspect`
and, where rootless podman works for the account, by running the image (`stat` inside it).
The writer-level cases (hard links, whiteouts, narrowing) call the writer directly.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.core import HOST_BUSYBOX, FakeStore, require_busybox
from support.users import UserTmpFactory, backends_for, chown_tree, describe, run_nsbuild
from support.verifiers import image_layers, podman_load_and_run

from nsbuild.cache.shared import content_fingerprint
from nsbuild.core.perms import parse_perms
from nsbuild.errors import SpecError
from nsbuild.layer.contentkey import TarMismatch, check_tar
from nsbuild.tar.owners import Owner, OwnerPolicy
from nsbuild.tar.perms import compiled
from nsbuild.tar.tarwriter import Source, write_tar

# --- reading layers back with GNU tar -------------------------------------------------------------------

_BITS = {"r": 4, "w": 2, "x": 1}


def _mode(text: str) -> int:
    """`-rwsr-x---` → 0o4750, as GNU tar prints modes."""
    mode = 0
    for i, (shift, special) in enumerate(((6, 0o4000), (3, 0o2000), (0, 0o1000))):
        triple = text[1 + 3 * i : 4 + 3 * i]
        for ch in triple[:2]:
            mode |= _BITS.get(ch, 0) << shift
        if triple[2] in "xst":
            mode |= 1 << shift
        if triple[2] in "sStT":
            mode |= special
    return mode


def gnutar_listing(layer: Path) -> dict[str, tuple[str, int, int, int, str, str]]:
    """name → (type letter, mode, uid, gid, user, group) from `tar -tvv` with and without
    --numeric-owner (an empty name shows as the number)."""
    out: dict[str, tuple[str, int, int, int, str, str]] = {}
    numeric = _tar_lines(layer, "--numeric-owner")
    named = _tar_lines(layer)
    assert len(numeric) == len(named)
    for (perm, ids, name), (_, names, _) in zip(numeric, named, strict=True):
        uid, gid = (int(x) for x in ids.split("/"))
        user, group = names.split("/")
        out[name] = (perm[0], _mode(perm), uid, gid, user, group)
    return out


def _tar_lines(layer: Path, *flags: str) -> list[tuple[str, str, str]]:
    proc = subprocess.run(["tar", "-tvv", *flags, "-f", str(layer)], capture_output=True, text=True, check=True)
    lines = []
    for line in proc.stdout.splitlines():
        perm, owner, _size, _date, _time, rest = line.split(None, 5)
        name = re.split(r" -> | link to ", rest)[0].rstrip("/")
        lines.append((perm, owner, name))
    return lines


def _build(user: str | None, work: Path, spec: dict[str, Any], *args: str, kind: str = "layered") -> Path:
    out = work / f"{spec['name']}.tar"
    path = work / f"{spec['name']}.json"
    path.write_text(json.dumps(spec))
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    chown_tree(user, path, tmp)
    proc = run_nsbuild([kind, path, "-o", out, "--no-cache", "-q", *args], user, env={"TMPDIR": str(tmp)}, cwd=work)
    assert proc.returncode == 0, describe(proc)
    return out


def _entries(image: Path, work: Path) -> dict[str, tuple[str, int, int, int, str, str]]:
    """Every layer's GNU tar listing merged (later layers win), the names as the image has them."""
    merged: dict[str, tuple[str, int, int, int, str, str]] = {}
    for layer in image_layers(image, work / f"x-{image.stem}"):
        merged.update(gnutar_listing(layer))
    return merged


# --- content and store layers -------------------------------------------------------------------------


def _content(work: Path) -> tuple[Path, Path]:
    """A root tree under /app and a store path (with a symlink and a setuid candidate)."""
    tree = work / "tree"
    for rel, text in {"app/bin/tool": "#!/bin/sh\n", "app/data/db": "x\n", "app/README": "r\n"}.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    (tree / "app/bin/tool").chmod(0o755)
    (tree / "app/bin/sub").mkdir()
    (tree / "app/link").symlink_to("README")
    os.link(tree / "app/README", tree / "app/README.hard")
    store = FakeStore(work / "store")
    pkg = store.add("pkg", {"bin/pkg": "#!/bin/sh\necho pkg\n", "share/doc/pkg": "doc\n"})
    (pkg / "bin/pkg").chmod(0o755)
    (pkg / "bin/alias").symlink_to("pkg")
    return tree, pkg


def _rules(pkg: Path) -> list[dict[str, Any]]:
    return [
        {"path": "/app", "uid": 1000, "gid": 1000, "uname": "app", "gname": "app"},
        {"regex": "/app/bin/.*", "mode": "4755"},  # setuid on files; the directory below is left alone
        {"path": "/app/", "dirMode": "0750"},
        {"path": "/app/data", "gid": 2000},  # later wins for gid (and the group name); uid and user kept
        {"regex": r".*\.hard", "mode": "0600"},  # a hard link gets what its first name gets, not this
        {"path": "/app/link", "uid": 7, "mode": "0600"},  # a symlink: owner yes, mode never
        {"path": str(pkg), "mode": "0555", "dirMode": "0511", "gid": 30, "gname": "pkgs"},
    ]


def test_rules_on_content_and_store_layers(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    user = unprivileged_user
    work = user_tmp(user)
    tree, pkg = _content(work)
    chown_tree(user, tree, pkg.parent)
    spec = {
        "name": "perms",
        "tag": "t",
        "compressor": "none",
        "storeDir": str(pkg.parent),
        "contents": ["tree", str(pkg)],
        "perms": _rules(pkg),
    }
    image = _build(user, work, spec)
    got = _entries(image, work)
    p = str(pkg).lstrip("/")
    assert got["app"] == ("d", 0o750, 1000, 1000, "app", "app")
    assert got["app/bin"] == ("d", 0o750, 1000, 1000, "app", "app")
    assert got["app/bin/sub"] == ("d", 0o750, 1000, 1000, "app", "app"), "mode is for non-directories only"
    assert got["app/bin/tool"] == ("-", 0o4755, 1000, 1000, "app", "app")
    assert got["app/data"] == ("d", 0o750, 1000, 2000, "app", "2000"), "gid without gname: no stale name"
    assert got["app/data/db"] == ("-", 0o644, 1000, 2000, "app", "2000"), "unset fields keep what was there"
    assert got["app/README"] == ("-", 0o644, 1000, 1000, "app", "app")
    assert got["app/README.hard"][0] == "h" and got["app/README.hard"][1:] == got["app/README"][1:]
    assert got["app/link"] == ("l", 0o777, 7, 1000, "7", "app"), "a symlink's mode stays"
    # The store path at its own place: its rule, and only there.
    assert got[p] == ("d", 0o511, 0, 30, "root", "pkgs")
    assert got[f"{p}/bin/pkg"] == ("-", 0o555, 0, 30, "root", "pkgs")
    assert got[f"{p}/bin/alias"] == ("l", 0o777, 0, 30, "root", "pkgs")
    # The customisation layer's links into the store are not below the store path: untouched.
    assert got["bin/pkg"] == ("l", 0o777, 0, 0, "root", "root")
    parent = str(pkg.parent).lstrip("/")
    assert got[parent][1:] == (0o755, 0, 0, "root", "root")
    # nsbuild inspect shows the owners the rules gave.
    proc = run_nsbuild(["inspect", image], user, cwd=work)
    assert proc.returncode == 0, describe(proc)
    assert re.search(r"^  file +4755 1000:1000 app:app +\d+ app/bin/tool$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^  dir +0750 1000:2000 app: +0 app/data$", proc.stdout, re.M), proc.stdout
    # Same rules, same bytes.
    again = _build(user, work, {**spec, "name": "perms-again"})
    assert [la.read_bytes() for la in image_layers(again, work / "a")] == [
        la.read_bytes() for la in image_layers(image, work / "b")
    ]


def test_cache_keys_follow_the_rules(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """With the layer cache: the same rules hit it; a changed /app rule rebuilds the /app layer (new
    bytes) and leaves the store layer, which no rule of it can touch, a cache hit; a changed store
    rule rebuilds that one."""
    user = user_with_subids
    work = user_tmp(user)
    tree, pkg = _content(work)
    chown_tree(user, tree, pkg.parent)
    cache = work / "cache"
    spec = {
        "name": "cached",
        "tag": "t",
        "compressor": "none",
        "storeDir": str(pkg.parent),
        "contents": ["tree", str(pkg)],
    }

    def build(perms: list[dict[str, Any]]) -> list[dict[str, Any]]:
        path = work / "cached.json"
        path.write_text(json.dumps({**spec, "perms": perms}))
        chown_tree(user, path)
        out = work / "cached.tar"
        proc = run_nsbuild(["layered", path, "-o", out, "--cache-dir", cache, "-q", "--json"], user, cwd=work)
        assert proc.returncode == 0, describe(proc)
        layers: list[dict[str, Any]] = json.loads(proc.stdout)["layers"]
        return layers

    app_rule = {"path": "/app", "uid": 1000}
    store_rule = {"path": str(pkg), "mode": "0555"}
    first = build([app_rule, store_rule])
    assert len(first) == 3, first  # the store path, the tree, the customisation layer
    second = build([app_rule, store_rule])
    assert [la["source"] for la in second[:2]] == ["cache", "cache"]
    assert [la["diff_id"] for la in second] == [la["diff_id"] for la in first]
    tree_i = next(i for i, la in enumerate(first) if "tree" in str(la["comment"]))
    store_i = 1 - tree_i
    changed = build([{**app_rule, "uid": 1001}, store_rule])
    assert changed[tree_i]["source"] == "built" and changed[tree_i]["diff_id"] != first[tree_i]["diff_id"]
    assert changed[store_i]["source"] == "cache" and changed[store_i]["diff_id"] == first[store_i]["diff_id"]
    changed = build([{**app_rule, "uid": 1001}, {**store_rule, "mode": "0500"}])
    assert changed[store_i]["source"] == "built" and changed[store_i]["diff_id"] != first[store_i]["diff_id"]
    # A layer no rule can touch has the key it has without perms: a rule for a path no content layer
    # holds finds both content layers of the build without rules in the cache, the same bytes.
    plain = build([])
    assert plain[store_i]["diff_id"] != first[store_i]["diff_id"]
    elsewhere = build([{"path": "/nowhere", "uid": 5}])
    assert [la["source"] for la in elsewhere[:2]] == ["cache", "cache"]
    assert [la["diff_id"] for la in elsewhere] == [la["diff_id"] for la in plain]


# --- scripts: every backend, and the image kind ---------------------------------------------------------

FAKEROOT = (
    "mkdir -p srv/www && echo hi > srv/www/index.html && chown -R 1234:1234 srv && chmod 700 srv/www\n"
    "echo x > srv/keep && chown 4321:4321 srv/keep && chmod 640 srv/keep\n"
)


def test_rules_over_fake_root_commands_on_every_backend(
    unprivileged_user: str | None, user_tmp: UserTmpFactory
) -> None:
    """The rules apply to the customisation layer over what the script chowned and chmodded, the
    same bytes on every backend the account can use; unset fields keep the script's values."""
    if shutil.which("fakeroot") is None:
        pytest.skip("fakeroot is not installed (`make deps`)")
    user = unprivileged_user
    work = user_tmp(user)
    spec = {
        "name": "scripted",
        "tag": "t",
        "compressor": "none",
        "fakeRootCommands": FAKEROOT,
        "perms": [
            {"path": "/srv/www", "uid": 33, "gid": 33, "uname": "www-data", "gname": "www-data", "dirMode": "2750"},
            {"regex": "/srv/www/.*\\.html", "mode": "0440"},
            {"path": "/srv/keep", "gid": 50},
        ],
    }
    layers = {}
    for backend in backends_for(user):
        image = _build(user, work, {**spec, "name": f"scripted-{backend}"}, "--isolation", backend)
        layer = image_layers(image, work / f"x-{backend}")[-1]
        got = gnutar_listing(layer)
        assert got["srv"] == ("d", 0o755, 1234, 1234, "1234", "1234"), (backend, got)
        assert got["srv/www"] == ("d", 0o2750, 33, 33, "www-data", "www-data"), backend
        assert got["srv/www/index.html"] == ("-", 0o440, 33, 33, "www-data", "www-data"), backend
        assert got["srv/keep"] == ("-", 0o640, 4321, 50, "4321", "50"), backend
        layers[backend] = layer.read_bytes()
    assert len(set(layers.values())) == 1, "the backends wrote different layers"


def test_rules_on_the_image_kind(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """`nsbuild image`: copyToRoot alone (no backend), then runAsRoot (userns-fakeroot and userns); the
    rule's gid over what the script left, its uid kept."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    root = work / "root"
    (root / "opt/tool").mkdir(parents=True)
    (root / "opt/tool/run").write_text("#!/bin/sh\n")
    chown_tree(user, root)
    perms = [{"path": "/opt", "uid": 500, "gid": 500, "uname": "tool"}, {"regex": "/opt/tool/run", "mode": "6755"}]
    spec = {"name": "img", "tag": "t", "compressor": "none", "copyToRoot": ["root"], "perms": perms}
    got = _entries(_build(user, work, spec, kind="image"), work)
    assert got["opt/tool/run"] == ("-", 0o6755, 500, 500, "tool", "500")
    assert got["opt"] == ("d", 0o755, 500, 500, "tool", "500")
    base = _build(
        user,
        work,
        {
            "name": "base",
            "tag": "t",
            "compressor": "none",
            "contents": [{"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
            "extraCommands": "mkdir -p bin && for a in sh mkdir chown echo; do ln -s busybox bin/$a; done",
        },
    )
    # A static busybox's chown bypasses fakeroot: that backend's script only makes the directory.
    for backend, script, uid in (
        ("userns-fakeroot", "mkdir -p /var/x", 0),
        ("userns", "mkdir -p /var/x && chown 9:9 /var/x", 9),
    ):
        scripted = {**spec, "name": f"img-{backend}", "fromImage": str(base), "runAsRoot": script}
        scripted["perms"] = [*perms, {"path": "/var/x", "gid": 11}]
        got = gnutar_listing(
            image_layers(_build(user, work, scripted, "--isolation", backend, kind="image"), work / backend)[-1]
        )
        assert got["var/x"] == ("d", 0o755, uid, 11, str(uid) if uid else "root", "11"), backend
        assert got["opt/tool/run"] == ("-", 0o6755, 500, 500, "tool", "500"), backend


# --- podman: config.User owns its WorkingDir and home -------------------------------------------------


def test_user_owns_its_workdir_in_podman(user_with_subids: str | None, user_tmp: UserTmpFactory) -> None:
    """The README's one-line rule: `{"path": "/home/app", "uid": 1000, "gid": 1000, "uname": "app",
    "gname": "app"}` with config.User app and WorkingDir /home/app; podman runs it (and with --user)
    and the user writes into its directory; a setuid mode shows as podman's stat sees it."""
    require_busybox()
    user = user_with_subids
    work = user_tmp(user)
    rootfs = work / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "home/app").mkdir(parents=True)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\napp:x:1000:\n")
    chown_tree(user, rootfs)
    spec = {
        "name": "workdir",
        "tag": "t",
        "compressor": "none",
        "contents": ["rootfs", {"path": HOST_BUSYBOX, "target": "/bin/busybox"}],
        "extraCommands": "mkdir -p bin && for a in sh stat touch id; do ln -s busybox bin/$a; done",
        "config": {"User": "app", "WorkingDir": "/home/app", "Env": ["PATH=/bin"]},
        "perms": [
            {"path": "/home/app", "uid": 1000, "gid": 1000, "uname": "app", "gname": "app"},
            {"path": "/bin/busybox", "mode": "4755"},
        ],
    }
    image = _build(user, work, spec)
    script = 'touch made && stat -c "%u %g %a %U" . made /bin/busybox'
    shown = podman_load_and_run(image, ["sh", "-c", script], user=user).split("\n")
    assert shown[:3] == ["1000 1000 755 app", "1000 1000 644 app", "0 0 4755 root"], shown
    shown = podman_load_and_run(
        image, ["sh", "-c", "touch f && id -u && stat -c %u f"], user=user, run_args=["--user", "1000:1000"]
    )
    assert shown.split() == ["1000", "1000"], shown


# --- refused rules -------------------------------------------------------------------------------------

BAD = [
    ({"path": "/a", "mode": "0855"}, "perms[0].mode"),
    ({"path": "/a", "mode": 0o17777}, "perms[0].mode"),
    ({"path": "/a", "mode": 755}, "perms[0].mode"),  # a JSON number is decimal: refused, not 0o1363
    ({"path": "/a", "dirMode": True}, "perms[0].dirMode"),
    ({"path": "a", "uid": 1}, "perms[0].path"),
    ({"path": "/a/../b", "uid": 1}, "perms[0].path"),
    ({"regex": "/a/(", "uid": 1}, "perms[0].regex"),
    ({"path": "/a", "regex": "/b", "uid": 1}, "perms[0]"),
    ({"uid": 1}, "perms[0]"),
    ({"path": "/a"}, "perms[0]"),
    ({"path": "/a", "uid": -1}, "perms[0].uid"),
    ({"path": "/a", "gid": 2**32}, "perms[0].gid"),
    ({"path": "/a", "uname": "x" * 33}, "perms[0].uname"),
    ({"path": "/a", "gname": "a:b"}, "perms[0].gname"),
    ({"path": "/a", "dirmode": "0755"}, "perms[0].dirmode"),
    ("/a", "perms[0]"),
]


@pytest.mark.parametrize(("rule", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_rules_are_spec_errors(rule: Any, field: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_perms("perms", [rule])
    assert info.value.field == field


def test_bad_rules_exit_2_naming_the_field(unprivileged_user: str | None, user_tmp: UserTmpFactory) -> None:
    user = unprivileged_user
    work = user_tmp(user)
    cases = [
        ("layered", [{"path": "/a", "uid": 1}, {"path": "/b", "mode": "rwx"}], "perms[1].mode"),
        ("layered", [{"regex": "[a-", "uid": 1}], "perms[0].regex"),
        ("image", [{"path": "/a", "dirMode": "0755", "gid": "wheel"}], "perms[0].gid"),
        ("layered", {"path": "/a"}, "perms"),
    ]
    for kind, perms, field in cases:
        path = work / "bad.json"
        path.write_text(json.dumps({"name": "bad", "perms": perms}))
        chown_tree(user, path)
        proc = run_nsbuild([kind, path, "-o", work / "bad.tar", "--no-cache"], user, cwd=work)
        assert proc.returncode == 2, describe(proc)
        assert f"{field}:" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (work / "bad.tar").exists()


# --- the writer itself ----------------------------------------------------------------------------------


def _write(tmp: Path, perms: list[dict[str, Any]], sources: list[Source], owner: Owner | None = None) -> bytes:
    policy = OwnerPolicy.fixed_owner(owner or Owner(0, 0, "root", "root"), compiled(parse_perms("perms", perms)))
    buf = io.BytesIO()
    write_tar(sources, buf, mtime=1, owner=policy)
    out = tmp / "layer.tar"
    out.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_no_rules_is_the_writer_without_rules(tmp_path: Path) -> None:
    (tmp_path / "t/a").mkdir(parents=True)
    (tmp_path / "t/a/f").write_text("f")
    plain = io.BytesIO()
    write_tar([Source(tmp_path / "t", "/")], plain, mtime=1, owner=OwnerPolicy.fixed_owner(Owner(0, 0, "root", "root")))
    assert _write(tmp_path, [], [Source(tmp_path / "t", "/")]) == plain.getvalue()
    # A rule that matches nothing changes no byte either.
    assert (
        _write(
            tmp_path, [{"path": "/nothere", "uid": 5}, {"regex": "/x.*", "mode": "0001"}], [Source(tmp_path / "t", "/")]
        )
        == plain.getvalue()
    )


def test_whiteouts_and_regex_semantics(tmp_path: Path) -> None:
    """A rule never touches a whiteout; a regex matches the whole absolute path (not a search)."""
    t = tmp_path / "t"
    (t / "etc").mkdir(parents=True)
    (t / "etc/.wh.issue").write_text("")
    (t / "etc/motd").write_text("m")
    (t / "etc/motd.d").mkdir()
    _write(tmp_path, [{"regex": "/etc/.*", "uid": 9, "mode": "0600"}, {"regex": "etc", "gid": 3}], [Source(t, "/")])
    got = gnutar_listing(tmp_path / "layer.tar")
    assert got["etc/.wh.issue"][1:4] == (0o644, 0, 0)
    assert got["etc/motd"][1:4] == (0o600, 9, 0), "'etc' alone must not match /etc/motd (full match)"
    assert got["etc/motd.d"][1:4] == (0o755, 9, 0)
    assert got["etc"][1:4] == (0o755, 0, 0)


def test_narrowed_rules_keep_what_can_match(tmp_path: Path) -> None:
    """A layer's cache key holds the rules that can touch it: regex rules always, path rules on the way
    to its targets, and those below a target where the source has that path."""
    (tmp_path / "root/app/deep").mkdir(parents=True)
    store, root = (str(tmp_path / "pkg"), "/nix/store/abc-pkg"), (str(tmp_path / "root"), "/")
    rules = compiled(
        parse_perms("perms", [{"path": "/app", "uid": 1}, {"path": "/nix", "gid": 2}, {"regex": "/x", "mode": "0001"}])
    )
    assert rules is not None
    narrowed = rules.narrowed([store])
    assert narrowed is not None and [r.path for r in narrowed.rules] == ["/nix", None]
    assert rules.narrowed([root]) is not None and [r.path for r in rules.narrowed([root]).rules] == ["/app", None]
    assert rules.narrowed([root, store]) is rules
    deep = compiled(parse_perms("perms", [{"path": "/app/deep", "uid": 1}, {"path": "/app/none", "uid": 2}]))
    assert deep is not None and deep.narrowed([store]) is None
    assert [r.path for r in (deep.narrowed([root]) or deep).rules] == ["/app/deep"]
    assert deep.narrowed([(str(tmp_path / "root/app"), "/app")]) is not None


def test_shared_cache_fingerprint_sees_the_rules(tmp_path: Path) -> None:
    """--cache-from/--cache-to name a layer by the headers the writer emits: with rules, the
    fingerprint computed from the sources is the one a check of the written tar finds, and it is not
    the fingerprint without them (a record's layer without the rules is never taken for one with)."""
    t = tmp_path / "t"
    (t / "app/bin").mkdir(parents=True)
    (t / "app/bin/x").write_text("x")
    sources = [Source(t, "/")]
    root = Owner(0, 0, "root", "root")
    ruled = OwnerPolicy.fixed_owner(root, compiled(parse_perms("perms", [{"path": "/app", "uid": 3, "mode": "0700"}])))
    plain = OwnerPolicy.fixed_owner(root)
    key = content_fingerprint(sources, mtime=1, owner=ruled)
    assert key != content_fingerprint(sources, mtime=1, owner=plain)
    buf = io.BytesIO()
    write_tar(sources, buf, mtime=1, owner=ruled)
    check_tar(io.BytesIO(buf.getvalue()).read, key, mtime=1, owner=ruled)
    unruled = io.BytesIO()
    write_tar(sources, unruled, mtime=1, owner=plain)
    with pytest.raises(TarMismatch):
        check_tar(io.BytesIO(unruled.getvalue()).read, key, mtime=1, owner=ruled)
