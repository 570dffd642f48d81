"""The command line (typer): nsbuild layered | stream | image | inspect | schema | doctor."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from nsbuild.errors import NsbuildError, UsageError
from nsbuild.progress import Progress

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build Docker/OCI images without root, without a daemon and without Nix.")

SpecArg = Annotated[Path, typer.Argument(help="spec.json (dockerTools attribute names)", show_default=False)]
OutputOpt = Annotated[str | None, typer.Option(
    "-o", "--output", help="PATH, docker-archive:PATH[:NAME:TAG], oci:DIR[:TAG], oci-archive:PATH[:TAG]")]
FormatOpt = Annotated[str | None, typer.Option(
    "--format", help="docker-archive | oci-dir | oci-archive (for a bare -o path)")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="no progress on stderr")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
IsolationOpt = Annotated[str, typer.Option(
    "--isolation", help="fakeRootCommands backend: auto | userns | userns-fakeroot | fakeroot")]
NetworkOpt = Annotated[str, typer.Option("--network", help="scripts' network: none (only lo) | host")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="layer cache [default: $XDG_CACHE_HOME/nsbuild]")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="build every layer, use and keep no cache")]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=0, help="layers built at once [default: CPUs]")]


def _fail(exc: NsbuildError) -> NoReturn:
    sys.stderr.write(f"nsbuild: error: {exc}\n")
    raise typer.Exit(exc.exit_code)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _build(kind: str, spec_path: Path, output: str | None, fmt: str | None, quiet: bool, as_json: bool,
           isolation: str, network: str, cache_dir: Path | None, no_cache: bool, jobs: int,
           stream: bool = False) -> None:
    from nsbuild.build import BuildOptions, build_image, resolve_output
    from nsbuild.refs import FORMATS, ImageRef, parse_ref
    from nsbuild.spec import load_spec

    try:
        _check_choice("--isolation", isolation, ("auto", "userns", "userns-fakeroot", "fakeroot"))
        _check_choice("--network", network, ("none", "host"))
        if fmt is not None:
            _check_choice("--format", fmt, FORMATS)
        spec = load_spec(spec_path, kind)
        if stream:
            spec.compressor = "none"
            ref = ImageRef("docker-archive", "-")
        else:
            ref = resolve_output(parse_ref(output) if output else None, fmt, spec)
        progress = Progress(quiet=quiet or as_json and not sys.stderr.isatty())
        from nsbuild.cache import default_cache_dir

        options = BuildOptions(isolation=isolation, network=network, jobs=jobs,
                               cache_dir=None if no_cache else (cache_dir or default_cache_dir()))
        result = build_image(spec, ref, progress, options)
    except NsbuildError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.stderr.write("nsbuild: interrupted; nothing was written\n")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader went away (`| head`): not our failure to report with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stderr.write("nsbuild: output pipe closed before the image was written\n")
        raise typer.Exit(1) from None
    image = result.image
    if not stream:
        progress.info(f"wrote {result.output} ({result.format}) {image.reference} {image.manifest_digest}")
    if as_json:
        print(json.dumps({
            "output": result.output, "format": result.format, "name": image.name, "tag": image.tag,
            "image_digest": image.manifest_digest, "config_digest": image.config_digest,
            "layers": [{"diff_id": layer.diff_id, "digest": layer.digest, "size": layer.size,
                        "uncompressed_size": layer.tar.size, "media_type": layer.media_type,
                        "comment": layer.comment} for layer in image.layers],
        }, indent=2))


@app.command()
def layered(spec: SpecArg, output: OutputOpt = None, format: FormatOpt = None, quiet: QuietOpt = False,
            json_out: JsonOpt = False, isolation: IsolationOpt = "auto", network: NetworkOpt = "none",
            cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False, jobs: JobsOpt = 0) -> None:
    """Build a layered image (buildLayeredImage) and write it."""
    _build("layered", spec, output, format, quiet, json_out, isolation, network, cache_dir, no_cache, jobs)


@app.command()
def stream(spec: SpecArg, quiet: QuietOpt = False, isolation: IsolationOpt = "auto",
           network: NetworkOpt = "none", cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False,
           jobs: JobsOpt = 0) -> None:
    """Write an uncompressed docker-archive to stdout (streamLayeredImage): `| podman load`."""
    if sys.stdout.isatty():
        _fail(UsageError("refusing to write an image to a terminal; pipe it (| podman load) or use layered"))
    _build("layered", spec, None, None, quiet, False, isolation, network, cache_dir, no_cache, jobs, stream=True)


@app.command()
def image(spec: SpecArg, output: OutputOpt = None, format: FormatOpt = None, quiet: QuietOpt = False,
          json_out: JsonOpt = False, isolation: IsolationOpt = "auto", network: NetworkOpt = "none",
          cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False, jobs: JobsOpt = 0) -> None:
    """Build a single-layer image on a base (buildImage), runAsRoot without KVM."""
    _build("image", spec, output, format, quiet, json_out, isolation, network, cache_dir, no_cache, jobs)


@app.command()
def schema(kind: Annotated[str, typer.Option("--kind", help="layered | image")] = "layered") -> None:
    """Print the spec's JSON Schema."""
    from nsbuild.spec import json_schema

    try:
        _check_choice("--kind", kind, ("layered", "image"))
    except NsbuildError as exc:
        _fail(exc)
    print(json.dumps(json_schema(kind), indent=2))


@app.command()
def inspect(image_ref: Annotated[str, typer.Argument(metavar="IMAGE", help="archive, OCI dir or transport ref")],
            json_out: JsonOpt = False) -> None:
    """List an image's layers and, per entry, type, mode, owner, size and link target."""
    from nsbuild.inspect import inspect_image, render_text

    try:
        report = inspect_image(image_ref)
    except NsbuildError as exc:
        _fail(exc)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render_text(report))


@app.command()
def doctor() -> None:
    """Show which fakeRootCommands backends work here, and why the others do not."""
    try:
        from nsbuild.doctor import run_doctor
    except ImportError:
        _fail(NsbuildError("doctor is not available in this build"))
    text, ok = run_doctor()
    print(text)
    raise typer.Exit(0 if ok else 1)


cache_app = typer.Typer(help="Inspect and trim the layer cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("du")
def cache_du(cache_dir: CacheDirOpt = None) -> None:
    """How much the layer cache holds."""
    from nsbuild.cache import LayerCache, default_cache_dir
    from nsbuild.progress import human

    root = cache_dir or default_cache_dir()
    try:
        entries, blobs, size = LayerCache(root).usage()
    except NsbuildError as exc:
        _fail(exc)
    print(f"{root}: {entries} layer entries, {blobs} blobs, {human(size)}")


@cache_app.command("prune")
def cache_prune(cache_dir: CacheDirOpt = None,
                older_than: Annotated[float, typer.Option("--older-than", help="days unused")] = 0.0) -> None:
    """Drop layer entries unused for --older-than days (default: all) and blobs nothing refers to."""
    from nsbuild.cache import LayerCache, default_cache_dir
    from nsbuild.progress import human

    root = cache_dir or default_cache_dir()
    try:
        removed, freed = LayerCache(root).prune(older_than * 86400)
    except NsbuildError as exc:
        _fail(exc)
    print(f"{root}: removed {removed} layer entries, freed {human(freed)}")


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
