"""The C API is declared once, in native/pyexec_core.h: what Python reads by (pyexec/native/_api.py) is
the generator's reading of that header, and each binding refuses to load where the compiler laid a
struct out otherwise."""
from __future__ import annotations

import importlib.util
import pathlib
import re
import sys
import types

import pytest

from pyexec import native
from pyexec.native import _api, binding

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADER = (ROOT / "native" / "pyexec_core.h").read_text()


def api_gen() -> types.ModuleType:
    """native/api_gen.py, the build's reader of the header (not part of the package)."""
    if "api_gen" not in sys.modules:
        spec = importlib.util.spec_from_file_location("api_gen", ROOT / "native" / "api_gen.py")
        assert spec is not None and spec.loader is not None
        mod = sys.modules["api_gen"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["api_gen"]


def layouts_of(header: str) -> dict[str, _api.Layout]:
    """The LAYOUTS a build from this header text would write into _api.py."""
    ns: dict[str, object] = {}
    exec(api_gen().python_module(api_gen().parse(header)), ns)  # noqa: S102 - the generated module is what is under test
    return ns["LAYOUTS"]  # type: ignore[return-value]


def test_the_installed_api_is_this_headers():
    assert pathlib.Path(_api.__file__).read_text() == api_gen().python_module(api_gen().parse(HEADER))


def test_each_binding_reports_the_headers_layout(nat):
    compiled = nat.mod.layout()
    assert set(compiled) == set(_api.LAYOUTS) and {"px_set", "px_mount", "px_capture", "px_status"} <= set(compiled)
    for name, lay in _api.LAYOUTS.items():
        assert compiled[name] == (lay.size, *(f.offset for f in lay.fields)), name
    binding.check_layout(nat.name, compiled)


@pytest.mark.parametrize("change", [
    ("int32_t state;", "int64_t state;"),             # a field widened
    ("int32_t signal; /*", "int64_t signal; /*"),     # a padding the model must place
    ("uint32_t eof;", "uint32_t eof;\n    uint32_t extra;"),  # a field added
])
def test_a_layout_the_compiler_did_not_make_fails_the_load(nat, change):
    """As if the Python side had been generated from another header than the one compiled."""
    old, new = change
    assert old in HEADER
    other = layouts_of(HEADER.replace(old, new, 1))
    with pytest.raises(ImportError, match="laid out as"):
        binding.check_layout(nat.name, nat.mod.layout(), other)


def test_the_generator_refuses_what_the_header_promises_never_to_hold():
    bad = re.sub(r"int32_t pid;", "long pid;", HEADER, count=1)
    with pytest.raises(ValueError, match="not a fixed-width type"):
        api_gen().parse(bad)


def test_a_short_or_foreign_page_is_no_freeze_set():
    """A journal file made but not yet written (empty, or cut short) is not a freeze set: ValueError,
    which status and recover treat as such, never a struct.error from the decoder."""
    size = native.default().set_size
    for buf in (b"", b"\0" * 16, b"\0" * (size - 1), b"\0" * size):
        with pytest.raises(ValueError):
            native.read_set(buf)
