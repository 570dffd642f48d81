"""nsbuild: build Docker/OCI images without root, without a daemon and without Nix."""

__version__ = "0.1.0"
