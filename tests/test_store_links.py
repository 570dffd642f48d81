"""Store contents are linked into / of the customisation layer without ever writing outside it."""

from __future__ import annotations

import os
import stat

from support.core import FakeStore, read_image, write_spec
from support.users import describe, run_nsbuild


def test_links_never_go_through_a_symlink_from_an_earlier_content_path(unprivileged_user, user_tmp) -> None:
    tmp = user_tmp(unprivileged_user)
    outside = tmp / "outside"  # stands for the host's /tmp: must not be touched
    outside.mkdir()
    outside.chmod(0o1777)
    store = FakeStore(tmp / "store")
    a = store.add("a", {"bin/a": "a\n"})
    (a / "tmp").symlink_to(outside)
    b = store.add("b", {"tmp/planted": "b\n", "bin/b": "b\n"})
    spec = write_spec(
        tmp,
        {"name": "links", "tag": "t", "compressor": "none", "storeDir": str(store.dir), "contents": [str(a), str(b)]},
    )
    proc = run_nsbuild(["layered", str(spec), "-o", str(tmp / "out.tar"), "--no-cache"], unprivileged_user)
    assert proc.returncode == 0, describe(proc)
    assert "/tmp is provided by several contents" in proc.stderr
    assert os.listdir(outside) == []
    assert stat.S_IMODE(outside.stat().st_mode) == 0o1777
    image = read_image(tmp / "out.tar", tmp / "unpacked")
    custom = image.names(len(image.layers) - 1)
    assert "tmp" in custom and not any(n.startswith("tmp/") for n in custom)
    links = {m.name: m.linkname for m in image.layers[-1]}
    assert links["tmp"] == str(a / "tmp")
    assert links["bin/a"] == str(a / "bin" / "a") and links["bin/b"] == str(b / "bin" / "b")
