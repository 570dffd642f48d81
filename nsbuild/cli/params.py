"""Parameter coercion without pydantic (issue 17: start-up).

Recent typer releases coerce every parameter value through a pydantic TypeAdapter, built the first
time a command's parameters are processed: importing pydantic and building the adapters cost more than
the rest of the CLI's start (~40-100 ms of every `nsbuild` command). This CLI's parameters are all of
a few plain types (str, int, float, Path, lists of str, flags), so `install` gives typer a coercion of
its own for exactly those — same values, same error messages — and leaves anything else to typer.
With a typer that has no such hook (older releases coerce through click, without pydantic) it does
nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
import typer.core

try:
    from typer import _coercion, _param_types
except ImportError:  # a typer without pydantic coercion: nothing to replace
    _coercion = _param_types = None  # type: ignore[assignment]

_NUMBER_WORDS = {int: ("integer", "an integer"), float: ("number", "a number")}
# What pydantic's lax bool parsing (typer's adapter) takes from a string, e.g. an environment variable.
_BOOLS = {
    **dict.fromkeys(("", "0", "off", "f", "false", "n", "no"), False),
    **dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
}


def _plain_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(sys.getfilesystemencoding(), "surrogateescape")
    return str(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLS:
        return _BOOLS[value.strip().lower()]
    raise ValueError("Input should be a valid boolean, unable to interpret input")


def _number(kind: type, value: Any, info: Any) -> Any:
    """int or float as typer's pydantic adapter parses them, with its messages."""
    word, article = _NUMBER_WORDS[kind]
    try:
        number = kind(value.strip()) if isinstance(value, str) else kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"Input should be a valid {word}, unable to parse string as {article}") from None
    if info.min is not None and number < info.min:
        raise ValueError(f"Input should be greater than or equal to {info.min}")
    if info.max is not None and number > info.max:
        raise ValueError(f"Input should be less than or equal to {info.max}")
    return number


if _coercion is not None:

    @dataclass(frozen=True)
    class PlainParam(_coercion.RuntimeParam):
        """Coercion of str, bool, int, float, Path and list[str] values (typer's RuntimeParam contract)."""

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            annotation, info = self.annotation, self.parameter_info
            try:
                if annotation in _NUMBER_WORDS and not info.clamp:
                    return _number(annotation, value, info)
                if annotation is bool:
                    return _bool(value)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), ctx=ctx, param=param) from None
            if annotation is str:
                return _plain_str(value)
            if get_origin(annotation) is list:
                return [_plain_str(v) for v in value]
            # typer's own checks of a path value (exists, readable, …), given a Path: no adapter needed
            path = value if isinstance(value, Path) else Path(os.fsdecode(value))
            return _param_types.coerce_cli_path(path, info, path_type=Path, param=param, ctx=ctx)


def _handled(annotation: Any, info: Any) -> bool:
    if annotation in (str, bool, Path) or (annotation in _NUMBER_WORDS and not info.clamp):
        return annotation is not Path or info.path_type in (None, Path)
    return get_origin(annotation) is list and get_args(annotation) == (str,)


def install() -> None:
    """Make typer coerce the plain parameter types here (idempotent)."""
    original: Callable[..., Any] | None = getattr(typer.core, "build_runtime_param", None)
    if _coercion is None or original is None or getattr(original, "_nsbuild", False):
        return

    def build_runtime_param(descriptor: Any) -> Any:
        if descriptor.file_annotation is None and _handled(descriptor.annotation, descriptor.parameter_info):
            return PlainParam(annotation=descriptor.annotation, parameter_info=descriptor.parameter_info)
        return original(descriptor)

    build_runtime_param._nsbuild = True  # type: ignore[attr-defined]
    typer.core.build_runtime_param = build_runtime_param
