"""The compiled part of the layer cache: its tree walk (nsbuild/cache/_treestat.c).

Optional: without a C compiler or the Python headers the install still succeeds and nsbuild takes its
pure-Python path (the same fingerprints, slower on large trees)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nsbuild.cache._treestat",
            ["nsbuild/cache/_treestat.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11", "-D_GNU_SOURCE", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
