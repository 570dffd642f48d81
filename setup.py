"""The one compiled part: the tar writer's per-entry loop (nsbuild/tar/_fasttar.c).

Optional: without a C compiler or the Python headers the install still succeeds and nsbuild takes its
pure-Python path (the same bytes, slower on trees of many small files)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nsbuild.tar._fasttar",
            ["nsbuild/tar/_fasttar.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11", "-D_GNU_SOURCE"],
            optional=True,
        )
    ]
)
