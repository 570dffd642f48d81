"""Command-line overrides of a parsed spec, as pipelines pass them: `--tag`, `--compressor`,
`--label K=V`, `--annotation K=V`. A new Spec is made; the parsed one is never changed.

How they combine with the spec: `--tag` and `--compressor` replace the spec's value; each `--label`
is set over the spec's `config.Labels` (a key given in both takes the command line's value, the other
keys of the spec stay); `--annotation` likewise over the spec's `annotations`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from nsbuild.errors import UsageError
from nsbuild.spec.spec import TAG_RE, Spec

COMPRESSORS = ("gz", "zstd", "none")


@dataclass(frozen=True)
class Overrides:
    tag: str | None = None
    compressor: str | None = None
    labels: tuple[str, ...] = ()  # KEY=VALUE, in command-line order
    annotations: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == Overrides()

    def annotation_map(self) -> dict[str, str]:
        """`--annotation K=V`, checked, the last of a key winning (what apply_overrides sets on the
        spec; `nsbuild index` also sets it on the index)."""
        return _pairs("--annotation", self.annotations)


def _pairs(option: str, items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {item!r}: expected KEY=VALUE")
        if "\0" in item:
            raise UsageError(f"{option} {item!r}: contains a NUL character")
        out[key] = value  # the last one given wins, as for repeated docker/buildah --label
    return out


def apply_overrides(spec: Spec, overrides: Overrides) -> Spec:
    if overrides.empty:
        return spec
    changes: dict[str, object] = {}
    if overrides.tag is not None:
        if not TAG_RE.match(overrides.tag):
            raise UsageError(
                f"--tag {overrides.tag!r}: not a valid tag (up to 128 of letters, digits, '_', '.', '-', "
                "not starting with '.' or '-')"
            )
        changes["tag"] = overrides.tag
    if overrides.compressor is not None:
        if overrides.compressor not in COMPRESSORS:
            raise UsageError(f"--compressor: expected one of {', '.join(COMPRESSORS)}, got {overrides.compressor!r}")
        changes["compressor"] = overrides.compressor
    if overrides.labels:
        config = dict(spec.config)
        config["Labels"] = {**(config.get("Labels") or {}), **_pairs("--label", overrides.labels)}
        changes["config"] = config
    if overrides.annotations:
        changes["annotations"] = {**spec.annotations, **overrides.annotation_map()}
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]
