"""The command line (typer): nsbuild layered | stream | image | index | push | inspect | schema | doctor."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from nsbuild import __version__
from nsbuild.cli import params
from nsbuild.core.progress import Progress, human
from nsbuild.core.refs import FORMATS, ImageRef, is_registry, parse_ref
from nsbuild.errors import BuildError, NsbuildError, UsageError

# Each command imports the stages it runs when it runs (start-up, issue 17): `--version`, `--help` and a
# spec error load none of them.
if TYPE_CHECKING:
    from nsbuild.build.context import BuildOptions, BuildResult
    from nsbuild.registry import RegistryOptions
    from nsbuild.spec.overrides import Overrides
    from nsbuild.spec.spec import Spec

params.install()  # typer's pydantic coercion costs more than the rest of the start
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's own help: wrapped to the terminal (80 columns readable), never cut off with "…"
    rich_markup_mode=None,
    help="Build Docker/OCI images without root, without a daemon and without Nix.",
)


def _version(value: bool) -> None:
    if value:
        print(f"nsbuild {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Build Docker/OCI images without root, without a daemon and without Nix."""


SpecArg = Annotated[Path, typer.Argument(help="spec.json (dockerTools attribute names)", show_default=False)]
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "-o",
        "--output",
        help="PATH (.tar plain, .tar.gz/.tar.zst compressed), docker-archive:PATH[:NAME:TAG], oci:DIR[:TAG], "
        "oci-archive:PATH[:REF], docker://HOST/REPO[:TAG], containers-storage:[NAME[:TAG]] (podman), "
        "docker-daemon:[NAME[:TAG]] (docker)",
    ),
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="docker-archive | oci-dir | oci-archive (for a bare -o path)")
]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="no progress on stderr")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
IsolationOpt = Annotated[
    str, typer.Option("--isolation", help="fakeRootCommands backend: auto | userns | userns-fakeroot | fakeroot")
]
NetworkOpt = Annotated[str, typer.Option("--network", help="scripts' network: none (only lo) | host")]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="layer cache [default: $XDG_CACHE_HOME/nsbuild]")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="build every layer, use and keep no cache")]
JobsOpt = Annotated[
    int, typer.Option("--jobs", "-j", min=0, show_default=False, help="layers built at once [default: CPUs]")
]
ManifestFormatOpt = Annotated[
    str, typer.Option("--manifest-format", help="docker:// outputs: oci | docker (Docker v2 schema 2)")
]
AuthfileOpt = Annotated[
    Path | None,
    typer.Option(
        "--authfile",
        help="registry credentials file [default: $REGISTRY_AUTH_FILE, "
        "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json]",
    ),
]
CredsOpt = Annotated[
    str | None, typer.Option("--creds", metavar="USER:PASSWORD", help="registry credentials", show_default=False)
]
TlsVerifyOpt = Annotated[
    bool,
    typer.Option(
        "--tls-verify/--no-tls-verify",
        help="verify registry TLS (--tls-verify=false also works); off: plain http allowed",
    ),
]
CertDirOpt = Annotated[
    Path | None, typer.Option("--cert-dir", help="directory of CA certificates (*.crt) for registries")
]
CacheToOpt = Annotated[
    str | None,
    typer.Option(
        "--cache-to", metavar="docker://REF", help="push this build's layer cache to a registry (shared cache)"
    ),
]
CacheFromOpt = Annotated[
    str | None,
    typer.Option("--cache-from", metavar="docker://REF", help="take layers from a shared cache in a registry"),
]
LoadOpt = Annotated[
    bool,
    typer.Option("--load", help="load the image into podman (or docker, if podman is missing); no file written"),
]
DepfileOpt = Annotated[
    Path | None,
    typer.Option("--depfile", metavar="FILE", help="write a make rule of every input the build read (gcc -MD)"),
]
TagOpt = Annotated[str | None, typer.Option("--tag", help="the image's tag (overrides the spec's tag)")]
CompressorOpt = Annotated[
    str | None, typer.Option("--compressor", help="gz | zstd | none (overrides the spec's compressor)")
]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option("--label", metavar="KEY=VALUE", help="a config label (repeatable; over the spec's Labels)"),
]
AnnotationOpt = Annotated[
    list[str] | None,
    typer.Option("--annotation", metavar="KEY=VALUE", help="an OCI manifest annotation (repeatable; over the spec's)"),
]
SbomOpt = Annotated[
    str | None,
    typer.Option(
        "--sbom",
        metavar="spdx|cyclonedx|both|none",
        show_default=False,
        help="SBOM formats, attached with a provenance record as OCI referrers (to oci:DIR, docker://, "
        "and to oci-archive: when given) [default: both for oci: and docker:// outputs and with "
        "--sbom-output, else none]",
    ),
]
SbomOutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--sbom-output",
        metavar="FILE",
        help="the SBOM as a plain file too (both formats: FILE.spdx.json and FILE.cdx.json, "
        "a .json suffix of FILE left out)",
    ),
]
SignKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--sign-key", metavar="KEY.pem", help="sign the provenance (DSSE envelope) with this ed25519 or P-256 key"
    ),
]


def _fail(exc: NsbuildError) -> NoReturn:
    sys.stderr.write(f"nsbuild: error: {exc}\n")
    raise typer.Exit(exc.exit_code)


def _io_error(exc: OSError) -> BuildError:
    """Last resort for an I/O failure nothing below turned into a BuildError (a full disk in the
    workspace, ...): one line, exit 1, as every other build failure."""
    where = f"{os.fsdecode(exc.filename)}: " if exc.filename else ""
    return BuildError(f"{where}{exc.strerror or exc}")


@dataclass(frozen=True)
class Failures:
    """How a command words the failures that are not its own NsbuildErrors."""

    interrupted: str = "interrupted"  # the line for Ctrl-C or SIGTERM (exit 130)
    pipe_closed: str | None = None  # the line when stdout's reader left while the image was written


BUILD_FAILURES = Failures("interrupted; nothing was written", "output pipe closed before the image was written")


@contextmanager
def failures(how: Failures = Failures()) -> Iterator[None]:
    """The one error → exit-code handler of every command: an NsbuildError is one line and its exit
    code, an I/O error nothing below reported is one line and exit 1; never a traceback."""
    try:
        yield
    except NsbuildError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.stderr.write(f"nsbuild: {how.interrupted}\n")
        raise typer.Exit(130) from None
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) and how.pipe_closed is not None:
            # The reader went away (`| head`): not our failure to report with a traceback.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.stderr.write(f"nsbuild: {how.pipe_closed}\n")
            raise typer.Exit(1) from None
        _fail(_io_error(exc))


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class RegistryFlags:
    """The registry flags every command that talks to a registry takes, as skopeo spells them."""

    manifest_format: str = "oci"
    authfile: Path | None = None
    creds: str | None = None
    tls_verify: bool = True
    cert_dir: Path | None = None
    cache_to: str | None = None
    cache_from: str | None = None

    def options(self) -> RegistryOptions:
        from nsbuild.registry import options_from_cli

        _check_choice("--manifest-format", self.manifest_format, ("oci", "docker"))
        if self.cert_dir is not None and not self.cert_dir.is_dir():
            raise UsageError(f"--cert-dir {self.cert_dir}: not a directory")
        return options_from_cli(
            authfile=self.authfile, creds=self.creds, tls_verify=self.tls_verify, cert_dir=self.cert_dir
        )


@dataclass(frozen=True)
class SbomFlags:
    """--sbom, --sbom-output, --sign-key (layered and image)."""

    sbom: str | None = None
    output: Path | None = None
    sign_key: Path | None = None

    def checked(self) -> SbomFlags:
        if self.sbom is not None:
            _check_choice("--sbom", self.sbom, ("spdx", "cyclonedx", "both", "none"))
        return self


@dataclass(frozen=True)
class BuildFlags:
    """What layered, image and stream take from the command line, filled once."""

    kind: str  # the spec's kind: layered | image
    spec_path: Path
    output: str | None
    fmt: str | None
    quiet: bool
    as_json: bool
    isolation: str
    network: str
    cache_dir: Path | None
    no_cache: bool
    jobs: int
    registry: RegistryFlags
    stream: bool = False  # stdout, uncompressed (streamLayeredImage)
    load: bool = False  # into podman or docker
    depfile: Path | None = None
    overrides: Overrides | None = None
    sbom: SbomFlags = SbomFlags()


def _check_registry_refs(flags: RegistryFlags, output_is_registry: bool, compressor: str) -> None:
    for name, value in (("--cache-to", flags.cache_to), ("--cache-from", flags.cache_from)):
        if value is not None:
            from nsbuild.registry.usage import registry_reference

            if not is_registry(value):
                raise UsageError(f"{name}: expected docker://HOST/REPO[:TAG], got {value!r}")
            registry_reference(value, name)
    if flags.manifest_format == "docker" and output_is_registry and compressor == "zstd":
        raise UsageError(
            "--manifest-format docker: Docker v2 schema 2 has no zstd layer type; use compressor "
            "gz (or none), or the default --manifest-format oci"
        )


def _prepare(flags: BuildFlags) -> tuple[Spec, ImageRef, BuildOptions]:
    """The spec, the output and the build's options, every flag checked before anything is built."""
    from nsbuild.spec.overrides import Overrides, apply_overrides
    from nsbuild.spec.spec import load_spec

    _check_choice("--isolation", flags.isolation, ("auto", "userns", "userns-fakeroot", "fakeroot"))
    _check_choice("--network", flags.network, ("none", "host"))
    if flags.fmt is not None:
        _check_choice("--format", flags.fmt, FORMATS)
    reg_options = flags.registry.options()
    spec = apply_overrides(load_spec(flags.spec_path, flags.kind), flags.overrides or Overrides())
    from nsbuild.build.build import resolve_output
    from nsbuild.build.context import BuildOptions
    from nsbuild.cache.cache import default_cache_dir

    if flags.depfile is not None and (flags.load or is_registry(flags.output)):
        raise UsageError("--depfile: the rule's target is a file; use it with an archive or OCI layout output")
    if flags.load and flags.output is not None:
        raise UsageError("--load and -o: choose one (-o containers-storage:NAME or docker-daemon:NAME names the store)")
    if flags.stream:
        # stdout is never compressed: the spec's compressor gives way, for every layer
        spec = dataclasses.replace(spec, compressor="none")
        ref = ImageRef("docker-archive", "-")
    elif flags.load:
        ref = ImageRef("load", "")
    else:
        ref = resolve_output(parse_ref(flags.output) if flags.output else None, flags.fmt, spec)
    if ref.format == "registry":
        from nsbuild.registry.usage import registry_reference

        registry_reference("docker://" + ref.location, "-o")
    _check_registry_refs(flags.registry, ref.format == "registry", spec.compressor)
    sbom = flags.sbom.checked()
    options = BuildOptions(
        isolation=flags.isolation,
        network=flags.network,
        jobs=flags.jobs,
        cache_dir=None if flags.no_cache else (flags.cache_dir or default_cache_dir()),
        registry=reg_options,
        manifest_format=flags.registry.manifest_format,
        cache_to=flags.registry.cache_to,
        cache_from=flags.registry.cache_from,
        sbom=sbom.sbom,
        sbom_output=sbom.output,
        sign_key=sbom.sign_key,
    )
    return spec, ref, options


def _build(flags: BuildFlags) -> None:
    with failures(BUILD_FAILURES):
        spec, ref, options = _prepare(flags)
        from nsbuild.build.build import build_image

        progress = _progress(flags.quiet, flags.as_json)
        result = build_image(spec, ref, progress, options)
    image = result.image
    pushed = result.push
    if pushed is not None and not flags.as_json:
        # The digest that `REPO@DIGEST` pulls (a Docker v2 manifest has another one than the OCI one).
        print(f"{pushed.reference}@{pushed.digest}")
    elif not flags.stream and pushed is None:
        # An output that already held these exact bytes was left alone (nothing to do, as make says).
        if result.loaded is not None:
            if not flags.as_json:
                print(result.loaded)  # the name the client loaded, for `podman run $(nsbuild ... --load)`
            progress.info(f"loaded {result.loaded} into {result.output} manifest {image.manifest_digest}")
        else:
            verb = "wrote" if result.written else "up to date:"
            progress.info(
                f"{verb} {result.output} ({result.format}) {image.reference} manifest {image.manifest_digest}"
            )
    if flags.depfile is not None:
        _write_depfile(flags, spec, result, progress)
    if flags.as_json:
        print(json.dumps(_result_json(result, flags.registry), indent=2))


def _write_depfile(flags: BuildFlags, spec: Spec, result: BuildResult, progress: Progress) -> None:
    from nsbuild.build.depfile import depfile_inputs, write_depfile

    assert flags.depfile is not None
    with failures(BUILD_FAILURES):
        write_depfile(flags.depfile, result.output, depfile_inputs(spec, result.store_paths), progress)


def _progress(quiet: bool, as_json: bool) -> Progress:
    # --json is on stdout: progress stays on stderr, where CI logs want it; only -q silences it
    return Progress(quiet=quiet)


def _result_json(result: BuildResult, registry: RegistryFlags) -> dict[str, Any]:
    """A build's --json document."""
    image = result.image
    pushed = result.push
    doc: dict[str, Any] = {
        "output": result.output,
        "format": result.format,
        "name": image.name,
        "tag": image.tag,
        "written": result.written,
        "loaded": result.loaded,
        "image_digest": pushed.digest if pushed else image.manifest_digest,
        "config_digest": image.config_digest,
        "layers": [
            {
                "diff_id": layer.diff_id,
                "digest": layer.digest,
                "size": layer.size,
                "uncompressed_size": layer.tar.size,
                "media_type": layer.media_type,
                "comment": layer.comment,
                # where it came from (base | built | cache | cache-from) and how long that took
                "source": source,
                "seconds": round(seconds, 3),
            }
            for layer, (source, seconds) in zip(image.layers, result.layer_sources, strict=True)
        ],
    }
    if pushed is not None or result.cache_push is not None:
        from nsbuild.sinks.push import push_json
    if pushed is not None:
        doc["push"] = push_json(pushed)
    if result.base is not None:
        doc["base"] = result.base
    if registry.cache_from:
        doc["cache_from"] = {"reference": registry.cache_from, "layers": result.remote_hits}
    if result.cache_push is not None:
        doc["cache_to"] = push_json(result.cache_push)
    if result.sbom is not None:
        doc["sbom"] = result.sbom
    return doc


def _overrides(
    tag: str | None, compressor: str | None, label: list[str] | None, annotation: list[str] | None
) -> Overrides:
    """--tag, --compressor, --label and --annotation as every building command passes them on
    (nsbuild.spec.overrides.apply_overrides checks and applies them to a spec)."""
    from nsbuild.spec.overrides import Overrides

    return Overrides(tag, compressor, tuple(label or ()), tuple(annotation or ()))


def _build_command(kind: str, doc: str) -> Callable[..., None]:
    """layered and image: one command line, the spec's kind apart."""

    def command(
        spec: SpecArg,
        output: OutputOpt = None,
        format: FormatOpt = None,
        quiet: QuietOpt = False,
        json_out: JsonOpt = False,
        isolation: IsolationOpt = "auto",
        network: NetworkOpt = "none",
        cache_dir: CacheDirOpt = None,
        no_cache: NoCacheOpt = False,
        jobs: JobsOpt = 0,
        manifest_format: ManifestFormatOpt = "oci",
        authfile: AuthfileOpt = None,
        creds: CredsOpt = None,
        tls_verify: TlsVerifyOpt = True,
        cert_dir: CertDirOpt = None,
        cache_to: CacheToOpt = None,
        cache_from: CacheFromOpt = None,
        load: LoadOpt = False,
        depfile: DepfileOpt = None,
        tag: TagOpt = None,
        compressor: CompressorOpt = None,
        label: LabelOpt = None,
        annotation: AnnotationOpt = None,
        sbom: SbomOpt = None,
        sbom_output: SbomOutputOpt = None,
        sign_key: SignKeyOpt = None,
    ) -> None:
        registry = RegistryFlags(manifest_format, authfile, creds, tls_verify, cert_dir, cache_to, cache_from)
        overrides = _overrides(tag, compressor, label, annotation)
        flags = BuildFlags(
            kind,
            spec,
            output,
            format,
            quiet,
            json_out,
            isolation,
            network,
            cache_dir,
            no_cache,
            jobs,
            registry,
            load=load,
            depfile=depfile,
            overrides=overrides,
            sbom=SbomFlags(sbom, sbom_output, sign_key),
        )
        _build(flags)

    command.__doc__ = doc
    return command


app.command("layered")(_build_command("layered", "Build a layered image (buildLayeredImage) and write or push it."))


@app.command()
def stream(
    spec: SpecArg,
    quiet: QuietOpt = False,
    isolation: IsolationOpt = "auto",
    network: NetworkOpt = "none",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    jobs: JobsOpt = 0,
    authfile: AuthfileOpt = None,
    creds: CredsOpt = None,
    tls_verify: TlsVerifyOpt = True,
    cert_dir: CertDirOpt = None,
    cache_to: CacheToOpt = None,
    cache_from: CacheFromOpt = None,
) -> None:
    """Write an uncompressed docker-archive to stdout (streamLayeredImage): `| podman load`."""
    if sys.stdout.isatty():
        _fail(UsageError("refusing to write an image to a terminal; pipe it (| podman load) or use layered"))
    registry = RegistryFlags("oci", authfile, creds, tls_verify, cert_dir, cache_to, cache_from)
    flags = BuildFlags(
        "layered", spec, None, None, quiet, False, isolation, network, cache_dir, no_cache, jobs, registry, stream=True
    )
    _build(flags)


app.command("image")(
    _build_command("image", "Build a single-layer image on a base (buildImage), runAsRoot without KVM.")
)


@app.command("index")
def index_command(
    specs: Annotated[list[Path], typer.Argument(metavar="SPEC", help="one spec.json per platform", show_default=False)],
    output: Annotated[
        str, typer.Option("-o", "--output", help="oci:DIR[:TAG], oci-archive:PATH[:TAG] or docker://HOST/REPO[:TAG]")
    ],
    kind: Annotated[str, typer.Option("--kind", help="the specs' kind: layered | image")] = "layered",
    manifest_format: Annotated[
        str, typer.Option("--manifest-format", help="oci (OCI image index) | docker (Docker manifest list)")
    ] = "oci",
    tag: Annotated[
        str | None, typer.Option("--tag", help="the index's tag [default: the output's, else the first spec's]")
    ] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    isolation: IsolationOpt = "auto",
    network: NetworkOpt = "none",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    jobs: JobsOpt = 0,
    authfile: AuthfileOpt = None,
    creds: CredsOpt = None,
    tls_verify: TlsVerifyOpt = True,
    cert_dir: CertDirOpt = None,
    compressor: CompressorOpt = None,
    label: LabelOpt = None,
    annotation: Annotated[
        list[str] | None,
        typer.Option(
            "--annotation",
            metavar="KEY=VALUE",
            help="an annotation of every platform's manifest and of the OCI index (repeatable; "
            "a Docker manifest list has none)",
        ),
    ] = None,
    sbom: SbomOpt = None,
    sbom_output: Annotated[
        Path | None,
        typer.Option(
            "--sbom-output",
            metavar="FILE",
            help="each platform's SBOM as a plain file too, the platform after FILE's stem "
            "(sbom.json: sbom.linux-arm64.json; both formats: sbom.linux-arm64.spdx.json and .cdx.json)",
        ),
    ] = None,
    sign_key: SignKeyOpt = None,
) -> None:
    """Build one image per spec (each its own architecture and variant) and write one multi-platform
    image index (or Docker manifest list) over them."""
    from nsbuild.build.context import BuildOptions
    from nsbuild.build.multi import IndexRequest, build_index
    from nsbuild.cache.cache import default_cache_dir
    from nsbuild.spec.overrides import COMPRESSORS, apply_overrides
    from nsbuild.spec.spec import load_spec

    with failures(BUILD_FAILURES):
        _check_choice("--kind", kind, ("layered", "image"))
        _check_choice("--manifest-format", manifest_format, ("oci", "docker"))
        _check_choice("--isolation", isolation, ("auto", "userns", "userns-fakeroot", "fakeroot"))
        _check_choice("--network", network, ("none", "host"))
        if compressor is not None:
            _check_choice("--compressor", compressor, COMPRESSORS)
        if manifest_format == "docker" and compressor == "zstd":
            raise UsageError(
                "--compressor zstd: a Docker manifest list's images have no zstd layer type; "
                "use gz (or none), or --manifest-format oci"
            )
        overrides = _overrides(None, compressor, label, annotation)  # --tag is the index's
        index_annotations = overrides.annotation_map()
        flags = RegistryFlags(manifest_format, authfile, creds, tls_verify, cert_dir)
        sbom_flags = SbomFlags(sbom, sbom_output, sign_key).checked()
        if sbom_flags.output is not None and sbom_flags.sbom == "none":
            raise UsageError("--sbom-output: no SBOM is made with --sbom none")
        options = BuildOptions(
            isolation=isolation,
            network=network,
            jobs=jobs,
            cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
            registry=flags.options(),
            sbom=sbom_flags.sbom,
            sbom_output=sbom_flags.output,
            sign_key=sbom_flags.sign_key,
        )
        loaded = tuple(apply_overrides(load_spec(path, kind), overrides) for path in specs)
        request = IndexRequest(loaded, parse_ref(output), manifest_format, tag, index_annotations)
        result = build_index(request, _progress(quiet, json_out), options)
    if json_out:
        print(json.dumps(result.to_json(loaded), indent=2))
    else:
        print(f"{result.output}@{result.push.index.digest if result.push else result.index.digest}")


@app.command()
def push(
    image_ref: Annotated[str, typer.Argument(metavar="IMAGE", help="docker-archive, OCI dir or OCI archive")],
    dest: Annotated[str, typer.Argument(metavar="REF", help="docker://HOST[:PORT]/REPO[:TAG] (tag: latest)")],
    compressor: Annotated[
        str | None,
        typer.Option(
            "--compressor",
            show_default=False,
            help="for uncompressed layers: gz | zstd | none [default: gz; an index is pushed byte for byte: "
            "gz and zstd are refused]",
        ),
    ] = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    cache_dir: CacheDirOpt = None,
    manifest_format: ManifestFormatOpt = "oci",
    authfile: AuthfileOpt = None,
    creds: CredsOpt = None,
    tls_verify: TlsVerifyOpt = True,
    cert_dir: CertDirOpt = None,
) -> None:
    """Push an existing image (docker-archive, OCI layout or OCI archive) to a registry."""
    from nsbuild.build import remote
    from nsbuild.cache.cache import default_cache_dir
    from nsbuild.registry.usage import registry_reference
    from nsbuild.sinks.push import push_json

    flags = RegistryFlags(manifest_format, authfile, creds, tls_verify, cert_dir)
    with failures():
        if compressor is not None:
            _check_choice("--compressor", compressor, ("gz", "zstd", "none"))
        options = flags.options()
        if not is_registry(dest):
            raise UsageError(f"REF: expected docker://HOST[:PORT]/REPO[:TAG], got {dest!r}")
        target = registry_reference(dest, "REF")
        if manifest_format == "docker" and compressor == "zstd":
            raise UsageError("--manifest-format docker: Docker v2 schema 2 has no zstd layer type; use --compressor gz")
        result = remote.push_existing(
            image_ref,
            target,
            compressor=compressor,
            manifest_format=manifest_format,
            options=options,
            progress=_progress(quiet, json_out),
            cache_dir=cache_dir or default_cache_dir(),
        )
    if json_out:
        print(json.dumps(push_json(result), indent=2))
    else:
        print(f"{result.reference}@{result.digest}")


@app.command()
def schema(kind: Annotated[str, typer.Option("--kind", help="layered | image")] = "layered") -> None:
    """Print the spec's JSON Schema."""
    from nsbuild.spec.spec import json_schema

    with failures():
        _check_choice("--kind", kind, ("layered", "image"))
    print(json.dumps(json_schema(kind), indent=2))


@app.command()
def inspect(
    image_ref: Annotated[str, typer.Argument(metavar="IMAGE", help="archive, OCI dir or transport ref")],
    json_out: JsonOpt = False,
    authfile: AuthfileOpt = None,
    creds: CredsOpt = None,
    tls_verify: TlsVerifyOpt = True,
    cert_dir: CertDirOpt = None,
    sbom: Annotated[
        bool, typer.Option("--sbom", help="the packages per layer (dpkg, apk, Python, Nix store paths)")
    ] = False,
) -> None:
    """List an image's layers and, per entry, type, mode, owner, size and link target."""
    from nsbuild.sources.inspect import inspect_image, inspect_packages, render_text

    flags = RegistryFlags(authfile=authfile, creds=creds, tls_verify=tls_verify, cert_dir=cert_dir)
    with failures():
        # The registry flags matter to a docker:// image only; a file is read as it always was.
        options = flags.options() if is_registry(image_ref) else None
        if sbom:
            text, packages = inspect_packages(image_ref, options)
            sys.stdout.write(json.dumps({"packages": packages}, indent=2) + "\n" if json_out else text)
            return
        report = inspect_image(image_ref, options)  # stderr stays as quiet as for a file
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(render_text(report))


@app.command()
def doctor() -> None:
    """Show which fakeRootCommands backends work here, and why the others do not."""
    from nsbuild.cli.doctor import run_doctor

    with failures():
        text, ok = run_doctor()
    print(text)
    raise typer.Exit(0 if ok else 1)


cache_app = typer.Typer(help="Inspect and trim the layer cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@contextmanager
def _cache_errors(root: Path) -> Iterator[None]:
    """An I/O failure while the cache is walked names the cache directory."""
    try:
        yield
    except OSError as exc:
        raise BuildError(f"cache directory {root}: {exc.strerror or exc}") from None


@cache_app.command("du")
def cache_du(cache_dir: CacheDirOpt = None) -> None:
    """How much the layer cache holds (temporary files of running or dead builds included)."""
    from nsbuild.cache.cache import LayerCache, default_cache_dir

    root = cache_dir or default_cache_dir()
    with failures():
        entries, blobs, size, temps, temp_size = LayerCache(root, write=False).usage()
    print(f"{root}: {entries} layer entries, {blobs} blobs, {human(size)}; {temps} temporary files, {human(temp_size)}")


PRUNE_DAYS = 30.0  # `cache prune` keeps what a build used this recently, unless --all


@cache_app.command("prune")
def cache_prune(
    cache_dir: CacheDirOpt = None,
    older_than: Annotated[
        float | None, typer.Option("--older-than", min=0, help=f"days unused [default: {PRUNE_DAYS:.0f}]")
    ] = None,
    all_entries: Annotated[bool, typer.Option("--all", help="empty the cache")] = False,
) -> None:
    """Drop layer entries unused for --older-than days (default 30; --all: every entry) and blobs
    nothing refers to. Safe while builds use the cache: blobs a running build uses are kept."""
    from nsbuild.cache.cache import LayerCache, default_cache_dir

    root = cache_dir or default_cache_dir()
    with failures(), _cache_errors(root):
        if all_entries and older_than is not None:
            raise UsageError("--all and --older-than: choose one")
        days = 0.0 if all_entries else PRUNE_DAYS if older_than is None else older_than
        removed, freed = LayerCache(root).prune(days * 86400)
    print(f"{root}: removed {removed} layer entries, freed {human(freed)}")


@cache_app.command("verify")
def cache_verify(cache_dir: CacheDirOpt = None) -> None:
    """Hash every cached blob again and check every layer entry against its blobs; what is wrong is
    removed (the next build rebuilds it). Exit 1 when something was wrong."""
    from nsbuild.cache.cache import LayerCache, default_cache_dir

    root = cache_dir or default_cache_dir()
    with failures(), _cache_errors(root):
        checked, size, problems = LayerCache(root).verify()
    for problem in problems:
        print(f"nsbuild: {root}: {problem}", file=sys.stderr)
    print(f"{root}: {checked} blobs checked ({human(size)}), {len(problems)} problems")
    raise typer.Exit(1 if problems else 0)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _skopeo_bools(argv: list[str]) -> list[str]:
    """`--tls-verify=false` as skopeo users write it (Go bool flags) → typer's `--no-tls-verify`."""
    out: list[str] = []
    for arg in argv:
        if arg == "--":
            out.extend(argv[len(out) :])
            break
        name, eq, value = arg.partition("=")
        if eq and name == "--tls-verify":
            if value.lower() in ("false", "0", "no"):
                arg = "--no-tls-verify"
            elif value.lower() in ("true", "1", "yes"):
                arg = "--tls-verify"
        out.append(arg)
    return out


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.argv[1:] = _skopeo_bools(sys.argv[1:])
    try:
        app()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
