"""cffi (API mode, out-of-line) build of the native core: pyexec._pxcffi.

The cdef is read from pyexec_core.h itself (its bound part, by native/api_gen.py), so the C API is
declared once.  The C sources are linked in from the `pxcore` static library that setup.py's
build_clib makes, so both bindings run the very same object code."""
import pathlib
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # setuptools runs this file by path, not as a module of a package
import api_gen

ffibuilder = cffi.FFI()
ffibuilder.cdef(api_gen.cdef(api_gen.HEADER.read_text()))
# cffi releases the GIL around every call into lib by default.
ffibuilder.set_source(
    "pyexec._pxcffi", '#include "pyexec_core.h"', include_dirs=[str(HERE)],
    depends=[str(HERE / f) for f in ("freeze.c", "spawn.c", "wait.c", "kill.c", "probe.c", "pyexec_core.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
