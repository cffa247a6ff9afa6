"""Builds the optional C++ extension ``fusion_kernels._cpp`` (csrc/) with pybind11.

The build never makes an install fail: without a compiler, or with
``FUSION_KERNELS_SKIP_CPP_BUILD=1``, the package installs without it and runs on the torch
reference (``--backend cpp`` then explains how to build it). OpenMP is used when the compiler
has it (a tiny program is compiled with ``-fopenmp`` first); without it the kernel builds
single-threaded.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

SKIP_ENV = "FUSION_KERNELS_SKIP_CPP_BUILD"
#: What the kernel is compiled and linked with when the compiler has OpenMP (csrc/ guards its
#: parallel loops on FK_HAS_OPENMP).
OPENMP_COMPILE_ARGS = ["-fopenmp", "-DFK_HAS_OPENMP"]
OPENMP_LINK_ARGS = ["-fopenmp"]
_OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def openmp_args(compiles: Callable[[str, list[str]], bool]) -> tuple[list[str], list[str]]:
    """Compile and link arguments for OpenMP: those above when ``compiles(source, args)`` says a
    tiny OpenMP program builds, none otherwise (a single-threaded kernel)."""
    if compiles(_OPENMP_PROBE, OPENMP_COMPILE_ARGS):
        return list(OPENMP_COMPILE_ARGS), list(OPENMP_LINK_ARGS)
    print("the compiler has no OpenMP: building the C++ kernel single-threaded", file=sys.stderr)
    return [], []


def compiler_builds(compiler) -> Callable[[str, list[str]], bool]:
    """Whether ``compiler`` (a distutils compiler) compiles and links a C++ source with args."""

    def compiles(source: str, args: list[str]) -> bool:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "probe.cpp")
            with open(path, "w") as handle:
                handle.write(source)
            try:
                objects = compiler.compile([path], output_dir=directory, extra_postargs=args)
                compiler.link_executable(
                    objects, "probe", output_dir=directory, extra_postargs=args
                )
            except Exception:  # CompileError, LinkError, or no compiler at all
                return False
        return True

    return compiles


def _extensions():
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        print(f"{SKIP_ENV} set: not building the C++ extension", file=sys.stderr)
        return []
    sources = sorted(glob("csrc/*.cpp"))
    if not sources:
        return []
    try:
        from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
    except ImportError:
        print("pybind11 not installed: not building the C++ extension", file=sys.stderr)
        return []
    # One compiler process per core (FUSION_KERNELS_BUILD_JOBS=N to choose): the sources are
    # independent, and a serial -O3 build of all of them takes minutes.
    ParallelCompile("FUSION_KERNELS_BUILD_JOBS", default=0).install()
    return [
        Pybind11Extension(
            "fusion_kernels._cpp",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            # -ffp-contract=off: no fused multiply-adds, so every product and sum rounds
            # exactly as the SPEC's float32 arithmetic (and the torch reference) does.
            # -fno-trapping-math: the kernel never reads floating-point exception flags, and
            # without it GCC will not turn `keep ? d * s : 0` into a vectorised select.
            # OpenMP's arguments are added once the compiler is known (build_extension).
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"],
        )
    ]


class OptionalBuildExt(build_ext):
    """Build extensions, but warn instead of failing: the package works without them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            print(
                f"warning: C++ extension not built ({exc}); using the torch backend",
                file=sys.stderr,
            )

    def build_extension(self, ext):
        try:
            compile_args, link_args = openmp_args(compiler_builds(self.compiler))
            ext.extra_compile_args = [*ext.extra_compile_args, *compile_args]
            ext.extra_link_args = [*ext.extra_link_args, *link_args]
            super().build_extension(ext)
        except Exception as exc:
            print(
                f"warning: {ext.name} not built ({exc}); using the torch backend", file=sys.stderr
            )


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
