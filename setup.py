"""The compiled parts, each optional: the tar writer's per-entry loop (nsbuild/tar/_fasttar.c) and
the layer cache's tree walk (nsbuild/cache/_treestat.c).

Without a C compiler or the Python headers the install still succeeds and nsbuild takes its
pure-Python paths (the same bytes and fingerprints, slower on trees of many small files)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nsbuild.cache._treestat",
            ["nsbuild/cache/_treestat.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11", "-D_GNU_SOURCE", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(
            "nsbuild.tar._fasttar",
            ["nsbuild/tar/_fasttar.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11", "-D_GNU_SOURCE"],
            optional=True,
        )
    ]
)
