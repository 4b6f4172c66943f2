"""Arrows point down: every import of every pyexec module, checked against the layer table of
docs/architecture.md (its one source), and no import cycle anywhere in the package.

Imports are read from the source (ast), wherever they sit: at module level, inside a function (the
usual way to dodge a cycle), or under `if TYPE_CHECKING:`.  Nothing is imported to find them."""
from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pyexec"
DOC = ROOT / "docs" / "architecture.md"


def modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name: Python sources and the Cython binding."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.pyx")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The pyexec modules `name` imports (a `from pkg import mod` names mod, not pkg)."""
    if path.suffix == ".pyx":  # Cython: only its Python-level imports matter here
        text = "\n".join(line for line in path.read_text().splitlines()
                         if re.match(r"\s*(from\s+pyexec\S*\s+import|import\s+pyexec)", line))
    else:
        text = path.read_text()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(text)):
        # A name that is no module here is a compiled one (the cffi core) or another project's.
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import x`: the module pkg.x if there is one, else a name defined by pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def layer_table() -> list[list[str]]:
    """The layer table's rows, top first: each a list of the module patterns its first cell names."""
    text = DOC.read_text()
    section = text[text.index("## Layers"):]
    section = section[:section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            rows.append(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return rows


def row_of(name: str, rows: list[list[str]]) -> list[int]:
    """The rows whose patterns cover module `name` (`x.py`, `x.pyx`, `pkg/` for a package and its modules)."""
    rel = name.removeprefix("pyexec").lstrip(".").replace(".", "/")
    hits = []
    for i, patterns in enumerate(rows):
        for pat in patterns:
            if pat.endswith("/") and (rel == pat[:-1] or rel.startswith(pat)) or rel in (pat.removesuffix(".py"), pat.removesuffix(".pyx")) or (rel == "" and pat == "__init__.py"):
                hits.append(i)
    return hits


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_one_row():
    rows = layer_table()
    assert len(rows) > 10, "the layer table was not found in docs/architecture.md"
    placed = {name: row_of(name, rows) for name in modules()}
    assert {n: r for n, r in placed.items() if len(set(r)) != 1} == {}


def test_imports_point_down():
    rows = layer_table()
    up = []
    for name, targets in graph().items():
        (mine,) = set(row_of(name, rows))
        for t in sorted(targets):
            (theirs,) = set(row_of(t, rows))
            if theirs < mine:
                up.append(f"{name} imports {t} (row {theirs + 1} is above row {mine + 1})")
    assert up == []


def test_no_import_cycle():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan: a strongly connected component of more than one module is a cycle
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checker_sees_what_it_must(tmp_path):
    """The reader finds a function-level import, a TYPE_CHECKING import and a relative one."""
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pyexec.window import Window\n"
                   "def f():\n    from pyexec import errors\n    from . import limits\n    import pyexec.mounts\n")
    known = {"pyexec", "pyexec.window", "pyexec.errors", "pyexec.limits", "pyexec.mounts", "pyexec.m"}
    assert imports("pyexec.m", src, known) == {"pyexec.window", "pyexec.errors", "pyexec.limits", "pyexec.mounts"}
