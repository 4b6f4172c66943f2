"""Builds the native core once (static library `pxcore`, strict warnings), and links it
into both bindings: the Cython module pyexec._native and the cffi module pyexec._pxcffi."""
from Cython.Build import cythonize
from setuptools import Extension, setup

STRICT = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]
CORE = ["native/freeze.c", "native/spawn.c"]
# Relink a binding whenever the core changes: build_ext only looks at `depends`.
DEPENDS = CORE + ["native/pyexec_core.h"]

setup(
    libraries=[("pxcore", {"sources": CORE, "include_dirs": ["native"], "cflags": STRICT})],
    ext_modules=cythonize(
        [Extension("pyexec._native", ["pyexec/_native.pyx"], include_dirs=["native"], depends=DEPENDS)],
        compiler_directives={"language_level": "3"},
    ),
    cffi_modules=["native/cffi_build.py:ffibuilder"],
)
