"""The bound part of pyexec_core.h, parsed once, and everything the bindings derive from it.

The header is the one declaration of the C API.  At build time (setup.py, before cythonize) this
writes, into the package:

- pyexec/native/_api.py: the #define constants, each struct's layout (field names, struct-module
  codes, offsets and sizes as the x86-64/aarch64 ABI lays fixed-width fields out) and the typing
  Protocol of the cffi `lib`;
- pyexec/_core.pxd: the Cython declarations (cimported by pyexec/_native.pyx), with a table of the
  compiler's sizeof/offsetof of every field, which the Cython binding hands back for the check at load;

and native/cffi_build.py reads the cffi cdef from it.  Both bindings compare the compiler's layout
with _api.py's when they load (pyexec/native/binding.py), so a struct the model misreads fails the
import, not a run.  Only what the header promises is accepted: a field of another type than
fixed-width integers, arrays of them and of structs declared before, stops the build."""
from __future__ import annotations

import dataclasses
import pathlib
import re

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE / "pyexec_core.h"
END_OF_API = "---- end of the bound API"

# Fixed-width C types: (struct module code, size = alignment).
SCALARS = {"int8_t": ("b", 1), "uint8_t": ("B", 1), "int16_t": ("h", 2), "uint16_t": ("H", 2),
           "int32_t": ("i", 4), "uint32_t": ("I", 4), "int64_t": ("q", 8), "uint64_t": ("Q", 8)}


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    count: int  # array length; 1 for a scalar
    offset: int


@dataclasses.dataclass(frozen=True)
class Struct:
    name: str
    size: int
    align: int
    fields: tuple[Field, ...]


@dataclasses.dataclass(frozen=True)
class Param:
    ctype: str  # with any pointer stars and const, arrays turned into pointers
    name: str


@dataclasses.dataclass(frozen=True)
class Function:
    ret: str
    name: str
    params: tuple[Param, ...]


@dataclasses.dataclass(frozen=True)
class Api:
    defines: dict[str, int | str]
    structs: dict[str, Struct]
    functions: tuple[Function, ...]


def bound_part(text: str) -> str:
    """The header up to the comment that says "end of the bound API"."""
    return text[:text.rindex("/*", 0, text.index(END_OF_API))]


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)


def _int(literal: str) -> int:
    return int(re.sub(r"[uUlL]+$", "", literal.strip().strip("()")), 0)


def parse(text: str) -> Api:
    """The defines, structs and prototypes of the header's bound part."""
    text = _strip_comments(bound_part(text))
    defines: dict[str, int | str] = {}
    for name, value in re.findall(r"^\s*#\s*define\s+(\w+)\s+(.+?)\s*$", text, flags=re.MULTILINE):
        if value.startswith('"'):
            defines[name] = value.strip('"')
        elif re.fullmatch(r"\(?-?(0x[0-9a-fA-F]+|\d+)[uUlL]*\)?", value):
            defines[name] = _int(value)
        # (an expression, e.g. a guard's empty define, is left to the compiler)
    text = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    structs: dict[str, Struct] = {}
    for tag, body, name in re.findall(r"typedef\s+struct\s+(\w+)\s*\{(.*?)\}\s*(\w+)\s*;", text, flags=re.DOTALL):
        if tag != name:
            raise ValueError(f"typedef struct {tag} ... {name}: the tag and the name must agree")
        structs[name] = _layout(name, body, defines, structs)
    rest = re.sub(r"typedef\s+struct\s+\w+\s*\{.*?\}\s*\w+\s*;", "", text, flags=re.DOTALL)
    functions = []
    for ret, fname, params in re.findall(r"([A-Za-z_][\w\s\*]*?)\s*\b(\w+)\s*\(([^)]*)\)\s*;", rest):
        functions.append(Function(" ".join(ret.split()), fname, _params(params)))
    return Api(defines, structs, tuple(functions))


def _layout(name: str, body: str, defines: dict[str, int | str], known: dict[str, Struct]) -> Struct:
    fields = []
    offset, align = 0, 1
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        m = re.fullmatch(r"(\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?", " ".join(decl.split()))
        if not m:
            raise ValueError(f"{name}: cannot lay out {decl!r}")
        ctype, fname, length = m.groups()
        count = 1 if length is None else (int(length) if length.isdigit() else defines[length])
        if not isinstance(count, int):
            raise ValueError(f"{name}.{fname}: array length {length} is not an integer")  # noqa: TRY004 - a bad header, not a bad argument
        if ctype in SCALARS:
            size = falign = SCALARS[ctype][1]
        elif ctype in known:
            size, falign = known[ctype].size, known[ctype].align
        else:
            raise ValueError(f"{name}.{fname}: {ctype} is not a fixed-width type (the header's promise)")
        offset = -(-offset // falign) * falign
        fields.append(Field(fname, ctype, count, offset))
        offset += size * count
        align = max(align, falign)
    return Struct(name, -(-offset // align) * align, align, tuple(fields))


def _params(text: str) -> tuple[Param, ...]:
    text = " ".join(text.split())
    if text in ("", "void"):
        return ()
    out = []
    for p in text.split(","):
        p = p.strip()
        array = p.endswith("[]")
        p = p[:-2].strip() if array else p
        m = re.fullmatch(r"(.*?)(\w+)", p)
        if not m:
            raise ValueError(f"cannot read parameter {p!r}")
        ctype = m.group(1).strip() + (" *" if array else "")
        out.append(Param(" ".join(ctype.replace("*", " * ").split()).replace("* *", "**"), m.group(2)))
    return tuple(out)


def cdef(text: str) -> str:
    """The bound part of the header as a cffi cdef: comments, includes and guards dropped, every
    #define left for the compiler to fill in (`...`), array lengths likewise."""
    text = _strip_comments(bound_part(text))
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*#\s*define\s+(\w+)\s+\S", line)
        if m:
            out.append(f"#define {m.group(1)} ...")
        elif not line.lstrip().startswith("#"):
            out.append(re.sub(r"\[(PX_\w+)\]", "[...]", line))
    return "\n".join(out)


# ---- pyexec/native/_api.py ----

def _py_type(ctype: str, api: Api) -> str:
    """A parameter's Python type as the cffi binding passes it."""
    if "*" not in ctype:
        return "int"
    return "bytes | CData" if ctype.replace("const", "").split() == ["char", "*"] else "CData"


def python_module(api: Api) -> str:
    """The text of pyexec/native/_api.py."""
    out = ['"""native/pyexec_core.h as Python sees it.  Generated by native/api_gen.py at build time: do not edit."""',
           "from __future__ import annotations", "",
           "from typing import NamedTuple, Protocol", "", "",
           "class Field(NamedTuple):",
           '    """One field of a C struct: a struct-module code (or a struct name), its offset, its length (1: a scalar)."""', "",
           "    name: str", "    code: str", "    offset: int", "    length: int", "", "",
           "class Layout(NamedTuple):",
           '    """A C struct as the ABI lays it out."""', "",
           "    name: str", "    size: int", "    fields: tuple[Field, ...]", "", ""]
    for name, value in api.defines.items():
        out.append(f"{name} = {value!r}")
    out += ["", ""]
    for s in api.structs.values():
        fields = ", ".join(f"Field({f.name!r}, {(SCALARS[f.ctype][0] if f.ctype in SCALARS else f.ctype)!r}, "
                           f"{f.offset}, {f.count})" for f in s.fields)
        out.append(f"{s.name.upper()} = Layout({s.name!r}, {s.size}, ({fields},))")
    out.append("LAYOUTS = {" + ", ".join(f"{s.name!r}: {s.name.upper()}" for s in api.structs.values()) + "}")
    out += ["", "",
            "class CData(Protocol):", '    """An opaque cffi pointer or array."""', "", "",
            "class Lib(Protocol):", '    """The compiled cffi library: the header\'s functions and constants."""', ""]
    for name, value in api.defines.items():
        out.append(f"    {name}: {type(value).__name__}")
    out.append("")
    for f in api.functions:
        params = "".join(f", {p.name}: {_py_type(p.ctype, api)}" for p in f.params)
        ret = "None" if f.ret == "void" else "int"
        out.append(f"    def {f.name}(self{params}) -> {ret}: ...")
    return "\n".join(out) + "\n"


# ---- pyexec/_core.pxd ----

def _pyx_type(ctype: str) -> str:
    return ctype.replace(" *", "*").replace("*", " *").replace("* *", "**").strip()


def cython_pxd(api: Api) -> str:
    """The text of pyexec/_core.pxd: the header's declarations, and the compiler's layout table."""
    scalars = sorted(SCALARS)
    out = ["# native/pyexec_core.h for Cython.  Generated by native/api_gen.py at build time: do not edit.",
           f"from libc.stdint cimport {', '.join(scalars)}", "",
           'cdef extern from "pyexec_core.h" nogil:']
    for name, value in api.defines.items():
        if isinstance(value, int):
            out.append(f"    enum: {name}")
        else:
            out.append(f"    const char *{name}")
    for s in api.structs.values():
        out.append(f"    ctypedef struct {s.name}:")
        for f in s.fields:
            out.append(f"        {f.ctype} {f.name}" + (f"[{f.count}]" if f.count != 1 else ""))
    for f in api.functions:
        params = ", ".join(f"{_pyx_type(p.ctype)} {p.name}" for p in f.params)
        out.append(f"    {f.ret} {f.name}({params})")
    # sizeof and every field's offsetof as the C compiler sees them, in _api.py's order.
    entries = []
    for s in api.structs.values():
        entries.append(f"sizeof({s.name})")
        entries += [f"offsetof({s.name}, {f.name})" for f in s.fields]
    out += ["", "cdef extern from *:", '    """', "    #include <stddef.h>",
            f"    static const long px_layout_table[] = {{{', '.join(entries)}}};", '    """',
            f"    const long px_layout_table[{len(entries)}]", "", "",
            "cdef inline dict px_layout():",
            '    """Each struct\'s sizeof and its fields\' offsetof, as this module was compiled."""',
            "    return {"]
    i = 0
    for s in api.structs.values():
        n = len(s.fields) + 1
        out.append(f"        {s.name!r}: tuple([px_layout_table[i] for i in range({i}, {i + n})]),")
        i += n
    out.append("    }")
    return "\n".join(out) + "\n"


def write(root: pathlib.Path, header: pathlib.Path = HEADER) -> None:
    """Write pyexec/native/_api.py and pyexec/_core.pxd under root from the header (only if changed,
    so that a rebuild without a change to the header recompiles nothing)."""
    api = parse(header.read_text())
    for path, text in ((root / "pyexec" / "native" / "_api.py", python_module(api)),
                       (root / "pyexec" / "_core.pxd", cython_pxd(api))):
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


if __name__ == "__main__":
    write(HERE.parent)
