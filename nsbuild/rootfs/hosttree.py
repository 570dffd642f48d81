"""Host trees (contents root trees, copyToRoot): which symlinks may be followed on the build host.

A tree given to nsbuild is copied as it is: a symlink stays a symlink, because inside the container
it resolves against the image, not against the build host. The only link ever followed while copying
is one into storeDir that leads to a directory (copyToRoot without keepContentsDirlinks), which is
what dockerTools does with buildEnv trees. A link that leads out of the tree (an absolute target
outside storeDir, or a relative one whose `..` climbs above the tree's top) is worth a warning: on
this host it names something else (the builder's home, the host's /run), and the image gets the
link, never what it points at here.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nsbuild.plan.store import Store

if TYPE_CHECKING:
    from nsbuild.core.progress import Progress
    from nsbuild.spec.spec import Spec

INSIDE = "inside"  # resolves below the tree's top (relative, no escaping `..`)
STORE = "store"  # resolves into storeDir
OUTSIDE = "outside"  # anything else: the build host's files
SHOWN = 5  # links named in the warning line; the rest are counted


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass
class HostTree:
    """One tree being copied: its physical top and the store links may lead into."""

    top: str  # realpath of the tree's top directory
    store_dir: str
    escaped: list[tuple[str, str]] = field(default_factory=list)  # (path in the image, link text)

    def __post_init__(self) -> None:
        self.store = os.path.normpath(self.store_dir)
        self.real_store = os.path.realpath(self.store)

    def classify(self, link_dir: str, text: str) -> str:
        """Where a link with target `text`, found in the physical directory `link_dir`, leads; judged
        on the text alone (as the container will), never by resolving it on this host."""
        absolute = text.startswith("/")
        where = os.path.normpath(text if absolute else os.path.join(link_dir, text))
        if not absolute and _under(where, self.top):
            return INSIDE
        if _under(where, self.store) or _under(where, self.real_store):
            return STORE
        return OUTSIDE

    def directory_behind(self, link: Path, kind: str) -> Path | None:
        """The physical directory a link inside the tree or into the store leads to, or None (a file,
        dangling, a loop, or a chain that ends outside both after all: never followed)."""
        if kind == OUTSIDE:
            return None
        real = os.path.realpath(link)
        if not (_under(real, self.top) or _under(real, self.real_store)):
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None
        return Path(real) if stat.S_ISDIR(st.st_mode) else None

    def note(self, image_path: str, link_dir: str, text: str) -> str:
        kind = self.classify(link_dir, text)
        if kind == OUTSIDE:
            self.escaped.append((image_path, text))
        return kind


def warning(what: str, escaped: list[tuple[str, str]]) -> str | None:
    """One line for every link of a tree that leads out of it (the first few named), or None."""
    if not escaped:
        return None
    n = len(escaped)
    shown = ", ".join(f"{os.fsdecode(p)} -> {os.fsdecode(t)}" for p, t in escaped[:SHOWN])
    more = f", and {n - SHOWN} more" if n > SHOWN else ""
    return (
        f"{what}: {n} symlink{'s' if n > 1 else ''} lead{'' if n > 1 else 's'} out of the tree "
        f"({shown}{more}); kept as symlink{'s' if n > 1 else ''}, which resolve inside the container, "
        "never followed on the build host"
    )


def image_path(at: str, rel: str) -> str:
    return "/" + "/".join(p for p in (*at.split("/"), *rel.split("/")) if p)


def escaping_links(top: Path, store_dir: str, at: str = "/") -> list[tuple[str, str]]:
    """(path in the image, link text) of every symlink below `top` that leads out of it, in the
    image's order (names byte-sorted per directory, parents first). Nothing is followed.

    The walk does not sort: only the links found are, at the end (by their byte-wise path components,
    which is the image's order), so a tree of many files costs one scandir per directory and no more."""
    tree = HostTree(os.path.realpath(top), store_dir)
    links: list[tuple[tuple[bytes, ...], str, str, str]] = []
    stack = [(tree.top, "")]
    while stack:
        host, rel = stack.pop()
        try:
            with os.scandir(host) as it:
                entries = list(it)
        except OSError:
            continue  # unreadable: the layer writer names it when it gets there
        for e in entries:
            path = f"{rel}/{e.name}" if rel else e.name
            if e.is_symlink():
                key = tuple(os.fsencode(p) for p in path.split("/"))
                links.append((key, image_path(at, path), host, os.readlink(e.path)))
            elif e.is_dir(follow_symlinks=False):
                stack.append((e.path, path))
    for _, image, host, text in sorted(links):
        tree.note(image, host, text)
    return tree.escaped


def warn_contents_links(spec: Spec, progress: Progress) -> None:
    """`nsbuild layered`: one warning per contents root tree holding links that lead out of it (the
    tar writer keeps every link as it is; this only says so)."""
    store = Store(spec.store_dir)
    for entry in spec.contents:
        if entry.target is None and store.entry_of(entry.path) is not None:
            continue  # a store path: linked into / as dockerTools does
        top = Path(os.path.realpath(entry.path))
        if not top.is_dir():
            continue
        line = warning(entry.field.removesuffix(".path"), escaping_links(top, spec.store_dir, entry.target or "/"))
        if line:
            progress.warn(line)
