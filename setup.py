"""Builds the native core once (static library `pxcore`, strict warnings), and links it
into both bindings: the Cython module pyexec._native and the cffi module pyexec._pxcffi."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

STRICT = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]
CORE = ["native/freeze.c", "native/spawn.c", "native/wait.c", "native/kill.c", "native/probe.c"]
# (tests/test_build.py compiles these too, as an older glibc would.)
# Relink a binding whenever the core changes: build_ext only looks at `depends`.
PROGRAMS = {"pyexec-guardian": "native/guardian.c", "pyexec-warden": "native/warden.c"}
DEPENDS = CORE + ["native/pyexec_core.h", *PROGRAMS.values()]



class BuildExt(build_ext):
    """Also builds the thaw guardian and the script warden, plain C programs shipped inside the package."""

    def run(self):
        super().run()
        out_dir = "pyexec" if self.inplace else os.path.join(self.build_lib, "pyexec")
        for name, main in PROGRAMS.items():
            objs = self.compiler.compile([main] + CORE, output_dir=os.path.join(self.build_temp, name),
                                         include_dirs=["native"], extra_postargs=STRICT)
            self.compiler.link_executable(objs, name, output_dir=out_dir)


setup(
    cmdclass={"build_ext": BuildExt},
    libraries=[("pxcore", {"sources": CORE, "include_dirs": ["native"], "cflags": STRICT})],
    ext_modules=cythonize(
        # The .pyx restates the header's declarations for Cython; the C compiler checks every call
        # against the header's real prototypes, and these make a mismatch fail the build.
        [Extension("pyexec._native", ["pyexec/_native.pyx"], include_dirs=["native"], depends=DEPENDS,
                   extra_compile_args=["-Werror=incompatible-pointer-types", "-Werror=int-conversion",
                                       "-Werror=implicit-function-declaration"])],
        compiler_directives={"language_level": "3"},
    ),
    cffi_modules=["native/cffi_build.py:ffibuilder"],
)
