"""Builds the native core once, as the static library `pxcore` (strict warnings), and links it into
both bindings (the Cython module pyexec._native, the cffi module pyexec._pxcffi) and both programs
(the thaw guardian, the script warden).  First it writes what the bindings derive from the header
(native/api_gen.py: pyexec/native/_api.py, pyexec/_core.pxd)."""
import os
import pathlib
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, "native")
import api_gen

STRICT = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]
CORE = ["native/freeze.c", "native/spawn.c", "native/wait.c", "native/kill.c", "native/probe.c"]
PROGRAMS = {"pyexec-guardian": "native/guardian.c", "pyexec-warden": "native/warden.c"}
# build_ext rebuilds a binding when one of these is newer than it; build_clib checks no header, which
# is why scripts/setup.sh builds from clean.
DEPENDS = CORE + ["native/pyexec_core.h", *PROGRAMS.values()]

api_gen.write(pathlib.Path(__file__).resolve().parent)


class BuildExt(build_ext):
    """Also builds the thaw guardian and the script warden, plain C programs shipped inside the package."""

    def run(self):
        super().run()
        out_dir = "pyexec" if self.inplace else os.path.join(self.build_lib, "pyexec")
        clib = self.get_finalized_command("build_clib").build_clib
        for name, main in PROGRAMS.items():
            objs = self.compiler.compile([main], output_dir=os.path.join(self.build_temp, name),
                                         include_dirs=["native"], extra_postargs=STRICT)
            self.compiler.link_executable(objs, name, output_dir=out_dir, libraries=["pxcore"], library_dirs=[clib])


setup(
    cmdclass={"build_ext": BuildExt},
    libraries=[("pxcore", {"sources": CORE, "include_dirs": ["native"], "cflags": STRICT})],
    ext_modules=cythonize(
        # The Cython declarations are pyexec/_core.pxd, generated from the header above; the C compiler
        # checks every call against the header's real prototypes, and these make a mismatch fail the build.
        [Extension("pyexec._native", ["pyexec/_native.pyx"], include_dirs=["native"], depends=DEPENDS,
                   extra_compile_args=["-Werror=incompatible-pointer-types", "-Werror=int-conversion",
                                       "-Werror=implicit-function-declaration"])],
        compiler_directives={"language_level": "3"},
    ),
    cffi_modules=["native/cffi_build.py:ffibuilder"],
)
