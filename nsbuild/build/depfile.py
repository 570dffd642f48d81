"""`--depfile FILE`: a make rule naming every input the build read, as `gcc -MD` writes one.

Listed: the spec; every entry of every `contents`/`copyToRoot` tree (directories too: adding or
removing a file moves its directory's mtime); a local `fromImage` (an OCI layout: its index and
blobs); files the scripts name as `$NSBUILD_SPEC_DIR/...`. Store paths are immutable, so each is
listed once, not file by file. Every prerequisite also gets an empty rule of its own (gcc's `-MP`),
so that deleting an input rebuilds instead of stopping make with "No rule to make target".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nsbuild.core.progress import Progress
from nsbuild.core.refs import parse_ref
from nsbuild.sinks.sinks import atomic_output
from nsbuild.spec.spec import Spec

# `$NSBUILD_SPEC_DIR/name`, `${NSBUILD_SPEC_DIR}/name` and `"$NSBUILD_SPEC_DIR"/name`.
_SPEC_DIR_REF = re.compile(r"""\$\{?NSBUILD_SPEC_DIR\}?"?/([A-Za-z0-9._+@%,/-]+)""")


def _walk(top: Path) -> Iterator[Path]:
    yield top
    if top.is_symlink() or not top.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def _in_store(path: Path, store_dir: str) -> Path | None:
    """The top-level store path `path` lies in, if it does."""
    parts = path.parts
    store = Path(store_dir).parts
    if len(parts) > len(store) and parts[: len(store)] == store:
        return Path(*parts[: len(store) + 1])
    return None


def _script_inputs(spec: Spec) -> Iterator[Path]:
    scripts = [spec.extra_commands, spec.fake_root_commands, spec.run_as_root or ""]
    for script in scripts:
        for rel in _SPEC_DIR_REF.findall(script):
            path = Path(os.path.normpath(spec.base_dir / rel))
            if path.exists():
                yield from _walk(path)


def _base_inputs(spec: Spec) -> Iterator[Path]:
    if not spec.from_image:
        return
    ref = parse_ref(spec.from_image)
    if ref.format in ("registry", "load"):
        return  # a registry base is pinned by digest or tag: make cannot see it change
    path = ref.path
    if not path.is_absolute():
        path = spec.base_dir / path
    yield from _walk(path)


def depfile_inputs(spec: Spec, store_paths: Iterable[Path]) -> list[Path]:
    """Every input of the build, each once, in a stable order."""
    seen: dict[Path, None] = {spec.spec_path.absolute(): None}
    for entry in [*spec.contents, *spec.copy_to_root]:
        top = _in_store(entry.path, spec.store_dir)
        for path in [top] if top is not None else _walk(entry.path):
            seen.setdefault(path.absolute(), None)
    for store_path in sorted(store_paths):
        seen.setdefault(store_path, None)
    for path in [*_base_inputs(spec), *_script_inputs(spec)]:
        seen.setdefault(path.absolute(), None)
    return list(seen)


def escape(name: str) -> str:
    """A file name as make (and ninja's depfile reader) reads it back: gcc's escapes."""
    return re.sub(r"([ #\\])", r"\\\1", name.replace("$", "$$"))


def render(target: str, inputs: Iterable[Path], progress: Progress) -> str:
    names: list[str] = []
    for path in inputs:
        text = os.fsdecode(path)
        if "\n" in text or "\r" in text:
            progress.warn(f"--depfile: {text!r} cannot be written in a make rule (a newline); left out")
            continue
        names.append(escape(text))
    lines = [f"{escape(target)}:" + "".join(f" \\\n  {n}" for n in names), ""]
    lines += [f"{n}:" for n in names]
    return "\n".join(lines) + "\n"


def write_depfile(path: Path, target: str, inputs: Iterable[Path], progress: Progress) -> None:
    with atomic_output(path) as f:
        f.write(render(target, inputs, progress).encode())
