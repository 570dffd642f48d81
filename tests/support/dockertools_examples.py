"""A fake Nix store with stand-ins for the packages nixpkgs' dockerTools examples use.

tests/test_nixos_dockertools.py ports the subtests of nixpkgs' NixOS test `docker-tools`: each of its
example images is re-expressed as an nsbuild spec over this store. No Nix is involved:

- every store path is a `<32 nix-base32 chars>-name` directory (or file, or symlink) under
  `<root>/nix/store`, and names the other paths it needs by their full path, so that nsbuild finds the
  references by scanning, as Nix would;
- Debian's static busybox stands in for bash, coreutils and the few programs the examples run
  (`hello` is a two-line shell script, `nginx` is busybox's httpd, `nix` only answers `--version`);
- `buildEnv`/`writeTextDir`/`writeText`/`writeScriptBin` results are plain store paths laid out the
  way those functions lay them out (an env is real directories holding one symlink per file).

Nothing here imports nsbuild.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .core import BUSYBOX, nix_hash

HELLO_OUTPUT = "Hello, world!"


@dataclass(frozen=True)
class Link:
    """A symlink to write into a store path (its target verbatim)."""

    target: str


@dataclass(frozen=True)
class Exe:
    """An executable file (mode 0555, as files in a real store are)."""

    text: str


FileSpec = str | bytes | Link | Exe

# The applets our "coreutils" offers (busybox provides each); no shell among them, as in GNU coreutils.
COREUTILS = (
    "cat",
    "ls",
    "env",
    "test",
    "[",
    "stat",
    "readlink",
    "id",
    "echo",
    "mkdir",
    "chmod",
    "touch",
    "sha256sum",
    "basename",
    "true",
    "false",
    "sleep",
    "printf",
    "ln",
    "chown",
    "rm",
    "wc",
)
# What our "busybox" store path links (pkgsStatic.busybox links every applet; these are enough).
BUSYBOX_APPLETS = (*COREUTILS, "sh", "ash", "find", "grep", "wget", "httpd", "sed")


class ExampleStore:
    """The store directory and the stand-in packages, created on first use (each once)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / "nix" / "store"
        self.dir.mkdir(parents=True)
        for d in (self.root / "nix", self.dir):
            d.chmod(0o755)
        self._made: dict[str, Path] = {}

    # --- writing store paths ----------------------------------------------------------------------

    def path_of(self, name: str, seed: str = "") -> Path:
        """`<hash>-name`; the hash stands for the inputs (`seed`), so equal names may differ."""
        return self.dir / f"{nix_hash('nixos-example-' + name + seed)}-{name}"

    def add(self, name: str, files: Mapping[str, FileSpec], seed: str = "") -> Path:
        """A store directory holding `files` (relative path -> content); read-only, as Nix leaves it."""
        top = self.path_of(name, seed)
        top.mkdir()
        for rel, content in files.items():
            _write(top / rel, content)
        _seal(top)
        return top

    def add_text(self, name: str, text: str) -> Path:
        """writeText: a store path that is one file."""
        top = self.path_of(name)
        top.write_text(text)
        top.chmod(0o444)
        return top

    def add_script(self, name: str, text: str) -> Path:
        """writeScript: a store path that is one executable file."""
        top = self.path_of(name)
        top.write_text(text)
        top.chmod(0o555)
        return top

    def add_link(self, name: str, target: Path) -> Path:
        """A store path that is itself a symlink (`runCommand "x" {} "ln -s ${target} $out"`)."""
        top = self.path_of(name)
        top.symlink_to(target)
        return top

    def env(self, name: str, paths: Sequence[Path], links: Sequence[str] = ("bin",)) -> Path:
        """buildEnv: real directories for `links` (pathsToLink), one absolute symlink per file."""
        files: dict[str, FileSpec] = {}
        for p in paths:
            for sub in links:
                base = p / sub
                if not base.is_dir():
                    continue
                for dirpath, _dirs, names in os.walk(base):
                    for n in names:
                        full = Path(dirpath, n)
                        files.setdefault(str(full.relative_to(p)), Link(str(full)))
        return self.add(name, files, seed=" ".join(map(str, paths)))

    def once(self, key: str, make) -> Path:  # type: ignore[no-untyped-def]
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    # --- the stand-in packages --------------------------------------------------------------------

    @property
    def busybox(self) -> Path:
        """pkgsStatic.busybox: the static binary, every applet an absolute link to it (so the path
        refers to itself, as the real one does)."""

        def make() -> Path:
            top = self.path_of("busybox-static-1.36.1")
            files: dict[str, FileSpec] = {f"bin/{a}": Link(f"{top}/bin/busybox") for a in BUSYBOX_APPLETS}
            top.mkdir()
            (top / "bin").mkdir()
            shutil.copyfile(BUSYBOX, top / "bin" / "busybox")
            (top / "bin" / "busybox").chmod(0o555)
            for rel, content in files.items():
                _write(top / rel, content)
            _seal(top)
            return top

        return self.once("busybox", make)

    @property
    def sh(self) -> str:
        return f"{self.busybox}/bin/sh"

    @property
    def coreutils(self) -> Path:
        return self.once(
            "coreutils",
            lambda: self.add("coreutils-9.5", {f"bin/{a}": Link(f"{self.busybox}/bin/busybox") for a in COREUTILS}),
        )

    @property
    def bash(self) -> Path:
        """bash: `bin/bash` answers --version and otherwise runs busybox's shell; `bin/sh -> bash`."""
        script = (
            f"#!{self.sh}\n"
            "# stands in for GNU bash: busybox's shell runs what is asked\n"
            'if [ "$1" = --version ]; then echo "GNU bash, version 5.2.37 (busybox stand-in)"; exit 0; fi\n'
            f'exec {self.busybox}/bin/busybox sh "$@"\n'
        )
        return self.once("bash", lambda: self.add("bash-5.2p37", {"bin/bash": Exe(script), "bin/sh": Link("bash")}))

    def hello_named(self, name: str, program: str = "hello") -> Path:
        script = f'#!{self.sh}\necho "{HELLO_OUTPUT}"\n'
        return self.once(f"hello:{name}", lambda: self.add(name, {f"bin/{program}": Exe(script)}))

    @property
    def hello(self) -> Path:
        return self.hello_named("hello-2.12.1")

    @property
    def nix(self) -> Path:
        """nix: one program, the others relative links to it (as in the real package)."""
        script = f'#!{self.sh}\necho "nix (Nix) 2.24.10 (stand-in)"\n'
        files: dict[str, FileSpec] = {"bin/nix": Exe(script)}
        for tool in ("nix-store", "nix-daemon", "nix-build", "nix-env"):
            files[f"bin/{tool}"] = Link("nix")
        return self.once("nix", lambda: self.add("nix-2.24.10", files))

    def text_dir(self, name: str, rel: str, text: str) -> Path:
        """writeTextDir NAME REL TEXT (the text is an input: another text is another store path)."""
        return self.once(f"textdir:{name}:{rel}:{text}", lambda: self.add(name, {rel: text}, seed=rel + text))

    def shadow_setup(self, user: str, uid: int, gid: int | None = None) -> list[Path]:
        """Four writeTextDir store paths: /etc/passwd, group, shadow and gshadow with root and `user`."""
        gid = uid if gid is None else gid
        return [
            self.text_dir("shadow", "etc/shadow", f"root:!x:::::::\n{user}:!:::::::\n"),
            self.text_dir(
                "passwd", "etc/passwd", f"root:x:0:0::/root:{self.bash}/bin/bash\n{user}:x:{uid}:{gid}::/home/{user}:\n"
            ),
            self.text_dir("group", "etc/group", f"root:x:0:\n{user}:x:{gid}:\n"),
            self.text_dir("gshadow", "etc/gshadow", f"root:x::\n{user}:x::\n"),
        ]

    @property
    def ca_certificates(self) -> Path:
        """dockerTools.caCertificates: the bundle under the three names distributions look for."""
        pem = Path("/etc/ssl/certs/ca-certificates.crt")
        data = pem.read_bytes() if pem.is_file() else b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"
        return self.once(
            "cacert",
            lambda: self.add(
                "ca-certificates-3.104",
                {
                    "etc/ssl/certs/ca-bundle.crt": data,
                    "etc/ssl/certs/ca-certificates.crt": Link("ca-bundle.crt"),
                    "etc/pki/tls/certs/ca-bundle.crt": Link("../../../ssl/certs/ca-bundle.crt"),
                },
            ),
        )

    def nginx(self, webroot: Path) -> tuple[Path, Path]:
        """(nginx, its configuration file): `nginx -c CONF` serves CONF's `root` with busybox httpd on
        CONF's port, as CONF's user, in the foreground."""

        def make() -> Path:
            script = (
                f"#!{self.sh}\n"
                '[ "$1" = -c ] || { echo "usage: nginx -c CONF" >&2; exit 2; }\n'
                '. "$2"\n'
                f'exec {self.busybox}/bin/busybox httpd -f -v -p "$listen" -u "$user" -h "$root"\n'
            )
            return self.add("nginx-1.27.3", {"bin/nginx": Exe(script)})

        nginx = self.once("nginx", make)
        conf = self.once(
            "nginx.conf", lambda: self.add_text("nginx.conf", f"user=nginx:nginx\nlisten=80\nroot={webroot}\n")
        )
        return nginx, conf


def _write(path: Path, content: FileSpec) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Link):
        path.symlink_to(content.target)
    elif isinstance(content, Exe):
        path.write_text(content.text)
        path.chmod(0o555)
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(0o444)


def _seal(top: Path) -> None:
    """Directories 0555, as Nix leaves a store path (files were written with their final modes)."""
    for dirpath, _dirs, _names in os.walk(top, topdown=False):
        os.chmod(dirpath, 0o555)
