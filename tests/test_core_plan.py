"""Layer planning and store scanning seen from the image: references found wherever Nix finds them,
`./result` symlinks, every budget keeps every file and the contents order decides conflicts."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from support.core import FakeStore, build, read_image, write_spec


def final_view(layers: list[list[tarfile.TarInfo]], plain: list[Path]) -> dict[str, bytes | str]:
    """The file system after applying the layers in order (no whiteouts here): path -> content."""
    fs: dict[str, bytes | str] = {}
    for members, path in zip(layers, plain, strict=True):
        with tarfile.open(path, "r:") as tar:
            for m in members:
                name = m.name.rstrip("/")
                if m.isfile():
                    f = tar.extractfile(m)
                    assert f is not None
                    fs[name] = f.read()
                elif m.issym():
                    fs[name] = "-> " + m.linkname
                elif m.isdir():
                    fs.setdefault(name, "dir")
    return fs


def make_trees(tmp: Path, sizes: list[int]) -> list[Path]:
    trees = []
    for i, size in enumerate(sizes):
        t = tmp / f"tree{i}"
        (t / "etc").mkdir(parents=True)
        (t / "etc" / "conf").write_text(f"from tree{i}\n")
        (t / f"only{i}").write_bytes(b"x" * size)
        trees.append(t)
    return trees


@pytest.mark.parametrize("max_layers", [2, 3, 4, 5, 8])
@pytest.mark.parametrize(
    "sizes",
    [[10, 100000, 20, 30], [100000, 10, 20, 30], [10, 20, 30, 100000]],
    ids=["big-second", "big-first", "big-last"],
)
def test_later_contents_win_whatever_the_budget(tmp_path: Path, max_layers: int, sizes: list[int]) -> None:
    trees = make_trees(tmp_path, sizes)
    spec = write_spec(
        tmp_path, {"name": "order", "tag": "t", "maxLayers": max_layers, "contents": [str(t) for t in trees]}
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert len(view.layers) == min(max_layers, len(trees) + 1)
    fs = final_view(view.layers, view.plain_paths)
    assert fs["etc/conf"] == f"from tree{len(trees) - 1}\n".encode(), "the last contents entry must win"
    for i, size in enumerate(sizes):
        assert fs[f"only{i}"] == b"x" * size


@pytest.mark.parametrize("max_layers", [2, 3, 4, 6, 100])
def test_trees_and_store_paths_share_the_budget(tmp_path: Path, max_layers: int) -> None:
    store = FakeStore(tmp_path / "store")
    lib = store.add("lib", {"lib/a.so": b"a" * 5000})
    apps = [store.add(f"app{i}", {f"bin/app{i}": b"b" * (1000 * (i + 1))}, refs=[lib]) for i in range(3)]
    trees = make_trees(tmp_path, [10, 20, 30])
    spec = write_spec(
        tmp_path,
        {
            "name": "mix",
            "tag": "t",
            "maxLayers": max_layers,
            "storeDir": str(store.dir),
            "contents": [*map(str, apps), *map(str, trees)],
        },
    )
    build(spec, tmp_path / "img.tar")
    view = read_image(tmp_path / "img.tar", tmp_path / "view")
    assert len(view.layers) == min(max_layers, 4 + 3 + 1)
    fs = final_view(view.layers, view.plain_paths)
    assert fs["etc/conf"] == b"from tree2\n"
    for i, app in enumerate(apps):
        assert fs[f"{app}/bin/app{i}".lstrip("/")] == b"b" * (1000 * (i + 1))
        assert fs[f"bin/app{i}"] == f"-> {app}/bin/app{i}"
    assert fs[f"{lib}/lib/a.so".lstrip("/")] == b"a" * 5000


def test_references_found_like_nix(tmp_path: Path) -> None:
    """A reference across the scanner's 1 MiB chunk boundary, one only in a symlink target, one in a
    single-file store path; unreferenced paths stay out."""
    store = FakeStore(tmp_path / "store")
    straddled = store.add("straddled", {"share/x": "x"})
    via_link = store.add("via-link", {"lib/libv.so": "v"})
    via_script = store.add("via-script", {"share/y": "y"})
    unrelated = store.add("unrelated", {"share/z": "z"})
    script = store.add_file("script.sh", "#!/bin/sh\n", refs=[via_script])
    top = store.path_of("top")
    (top / "bin").mkdir(parents=True)
    boundary = 1 << 20
    ref = str(straddled).encode()
    blob = bytearray(b"\0" * (boundary + 4096))
    at = boundary - 40  # the hash part (after the store dir) crosses the boundary
    blob[at : at + len(ref)] = ref
    (top / "bin" / "big").write_bytes(bytes(blob))
    (top / "lib").mkdir()
    (top / "lib" / "libv.so").symlink_to(via_link / "lib" / "libv.so")
    (top / "bin" / "run").write_text(f"exec {script}\n")
    result = tmp_path / "result"
    result.symlink_to(top)  # as `nix-build` leaves it
    spec = write_spec(tmp_path, {"name": "refs", "tag": "t", "storeDir": str(store.dir), "contents": ["result"]})
    build(spec, tmp_path / "img.tar")
    names = read_image(tmp_path / "img.tar", tmp_path / "view").all_names()
    for p in (top, straddled, via_link, via_script, script):
        assert str(p).lstrip("/") in names, f"{p.name} missing from the closure"
    assert str(unrelated).lstrip("/") not in names
    assert "bin/big" in names and "bin/run" in names  # linked into / from the top path
