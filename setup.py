"""The optional native part of asgi_pprof: the sampled allocation profiler (_memsample).

Everything else is in pyproject.toml. The extension is optional: without a C compiler,
Python headers, or on an interpreter it does not support, the build warns and the
package installs without it (``asgi_pprof.memprofile`` then falls back to tracemalloc).
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _skip_reason() -> str | None:
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} is not CPython"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "the free-threaded build is not supported"
    if os.name != "posix":
        return "only POSIX systems are supported"
    if os.environ.get("ASGI_PPROF_NO_NATIVE") == "1":
        return "ASGI_PPROF_NO_NATIVE=1"
    return None


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the package works without the extension."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all, or any other build failure
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    def _skip(self, exc: BaseException) -> None:
        msg = (
            f"asgi_pprof: building the native memory sampler failed ({exc}); installing "
            "without it: heap and allocs will come from tracemalloc"
        )
        self.warn(msg)
        print(msg, file=sys.stderr)


reason = _skip_reason()
if reason:
    print(f"asgi_pprof: not building the native memory sampler: {reason}", file=sys.stderr)
ext_modules = (
    []
    if reason
    else [
        Extension(
            "asgi_pprof._memsample",
            sources=["asgi_pprof/_memsample.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
