"""cffi (API mode, out-of-line) build of the native core: pyexec._pxcffi.

The cdef is read from pyexec_core.h itself (its bound part), so the C API is declared once.  The C
sources are linked in from the `pxcore` static library that setup.py's build_clib makes, so both
bindings run the very same object code."""
import pathlib
import re

import cffi

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "pyexec_core.h"
END_OF_API = "---- end of the bound API"


def cdef_from_header(text: str) -> str:
    """The bound part of the header as a cffi cdef: comments, includes and guards dropped, every
    #define left for the compiler to fill in (`...`), array lengths likewise."""
    text = text[:text.rindex("/*", 0, text.index(END_OF_API))]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*#\s*define\s+(\w+)\s+\S", line)
        if m:
            out.append(f"#define {m.group(1)} ...")
        elif not line.lstrip().startswith("#"):
            out.append(re.sub(r"\[(PX_\w+)\]", "[...]", line))
    return "\n".join(out)


ffibuilder = cffi.FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
# cffi releases the GIL around every call into lib by default.
ffibuilder.set_source(
    "pyexec._pxcffi", '#include "pyexec_core.h"', include_dirs=[str(HERE)],
    depends=[str(HERE / f) for f in ("freeze.c", "spawn.c", "wait.c", "kill.c", "probe.c", "pyexec_core.h")],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
