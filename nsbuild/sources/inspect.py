"""nsbuild inspect: an image's layers (file, layout or registry) and, per entry, type, mode, owner, size, link."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nsbuild.core.platform import host_architecture
from nsbuild.core.progress import Progress, human
from nsbuild.core.refs import is_registry
from nsbuild.errors import BuildError
from nsbuild.image.image import canonical_json
from nsbuild.layer.layer import Layer
from nsbuild.sbom import SbomRequest, documents_for, facts_from_layers, render_packages
from nsbuild.sources.baseimage import BaseImage, load_base
from nsbuild.sources.indexsource import index_report, read_layout_index, render_index

if TYPE_CHECKING:
    from nsbuild.registry import RegistryOptions

TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.DIRTYPE: "dir",
    tarfile.FIFOTYPE: "fifo",
}


def inspect_image(ref: str, options: RegistryOptions | None = None) -> dict[str, Any]:
    """The report of the image at `ref`: a file, a layout or a `docker://` reference (pulled with
    `options`, as a build pulls its base, without progress lines)."""
    work = Path(tempfile.mkdtemp(prefix="nsbuild-inspect-"))
    try:
        index = _index(ref, work, options)
        if index is not None:
            return index
        base = _read(ref, work, options)
        return {"config": base.config, "layers": [_layer_report(layer) for layer in base.layers]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def inspect_packages(ref: str, options: RegistryOptions | None = None) -> tuple[str, list[dict[str, Any]]]:
    """`nsbuild inspect --sbom`: the packages of the image at `ref`, layer by layer (text), and as
    JSON-ready records (--json)."""
    work = Path(tempfile.mkdtemp(prefix="nsbuild-inspect-"))
    try:
        base = _read(ref, work, options)
        config = base.raw_config or canonical_json(base.config)
        facts = facts_from_layers(ref, "", config, _named(base))
        docs = documents_for(facts, SbomRequest(formats=("spdx",), work_dir=work))
        return render_packages(docs), [dataclasses.asdict(p) for p in docs.packages]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _named(base: BaseImage) -> list[Layer]:
    """The layers named as the image's history names them (the comment nsbuild wrote, or the
    command that made the layer), where the history has one entry per layer."""
    history = [h for h in base.history if isinstance(h, dict) and not h.get("empty_layer")]
    if len(history) != len(base.layers):
        return base.layers
    return [
        dataclasses.replace(layer, comment=str(h.get("comment") or h.get("created_by") or layer.comment))
        for layer, h in zip(base.layers, history, strict=True)
    ]


def _index(ref: str, work: Path, options: RegistryOptions | None) -> dict[str, Any] | None:
    """The report of an index (its platforms), None when `ref` names a single image."""
    if is_registry(ref):
        from nsbuild.sources import pull

        return pull.remote_index(ref, options, work)
    index = read_layout_index(ref, work)
    if index is None:
        return None
    return index_report(index.media_type, index.digest, [m.descriptor() for m in index.manifests])


def _read(ref: str, work: Path, options: RegistryOptions | None) -> BaseImage:
    if is_registry(ref):
        from nsbuild.sources import pull

        pulled = pull.pull_base(
            ref,
            store_root=work,
            architecture=host_architecture(),
            options=options,
            progress=Progress(quiet=True),
            need_tar=True,
        )
        return pulled.base
    return load_base(ref, work / "blobs", work, architecture=host_architecture())


def _layer_report(layer: Layer) -> dict[str, Any]:
    assert layer.tar.path is not None
    try:
        with tarfile.open(layer.tar.path, "r:") as tar:
            entries = [_entry(m) for m in tar]
    except tarfile.TarError as exc:
        raise BuildError(f"layer {layer.diff_id}: unreadable tar: {exc}") from None
    return {
        "diff_id": layer.diff_id,
        "digest": layer.digest,
        "size": layer.size,
        "media_type": layer.media_type,
        "entries": entries,
    }


def _entry(m: tarfile.TarInfo) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": m.name,
        "type": TYPES.get(m.type, m.type.decode(errors="replace")),
        "mode": f"{stat.S_IMODE(m.mode):04o}",
        "uid": m.uid,
        "gid": m.gid,
        "uname": m.uname,
        "gname": m.gname,
        "size": m.size,
    }
    if m.linkname:
        entry["link"] = m.linkname
    if m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        entry["device"] = f"{m.devmajor},{m.devminor}"
    xattrs = {k[len("SCHILY.xattr.") :]: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    if xattrs:
        entry["xattrs"] = sorted(xattrs)
    return entry


def render_text(report: dict[str, Any]) -> str:
    if "index" in report:
        return render_index(report)
    cfg = report["config"]
    lines = [f"architecture: {cfg.get('architecture')}  os: {cfg.get('os')}  created: {cfg.get('created')}"]
    inner = cfg.get("config") or {}
    for key in ("Entrypoint", "Cmd", "User", "WorkingDir", "Env"):
        if inner.get(key):
            lines.append(f"{key}: {inner[key]}")
    for i, layer in enumerate(report["layers"]):
        lines.append(f"layer {i}: {layer['diff_id']} {human(layer['size'])} {len(layer['entries'])} entries")
        for e in layer["entries"]:
            link = f" -> {e['link']}" if "link" in e else ""
            if e["type"] == "hardlink":
                link = f" => {e['link']}"
            xa = f" xattrs={','.join(e['xattrs'])}" if "xattrs" in e else ""
            lines.append(
                f"  {e['type']:<8} {e['mode']} {e['uid']}:{e['gid']} {e['uname']}:{e['gname']} "
                f"{e['size']:>10} {e['path']}{link}{xa}"
            )
    return "\n".join(lines) + "\n"
