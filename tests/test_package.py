"""The package as a user gets it, off this machine.

`python -m build` gives an sdist and a wheel built from that sdist; `pip install` of the sdist in a
fresh venv (build isolation: the declared build requirements only) compiles both bindings, the
guardian and the warden; the installed console scripts report the one version, check a config and
run a freeze of a loop mount, and the installed package's freeze blocks a writer with either binding.

Needs the package index (the fresh venv fetches the build requirements and the runtime
dependencies) and, for the freezes, root.  Every subprocess runs with cwd="/" and no PYTHONPATH, so
what runs is the installed package, never this source tree."""
from __future__ import annotations

import json
import os
import pathlib
import re
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile

import pytest
from helpers import Writer, needs_root

ROOT = pathlib.Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
PROGRAMS = ("pyexec-guardian", "pyexec-warden")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment (the package index settings, PYEXEC_RUN_DIR) without what would point
    Python at another tree or venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYEXEC_BACKEND"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def run(argv, timeout=120, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd="/", timeout=timeout,
                       env=kw.pop("env", None) or clean_env(), **kw)
    if check:
        assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def tree_modules() -> set[str]:
    """Every Python module of the package in this tree (subpackages too), as paths from the root."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "pyexec").rglob("*.py") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(sdist, wheel) from `python -m build`: the sdist from this tree, the wheel from the sdist.
    Without isolation (the dev venv has the build requirements); the fresh venv below checks that
    the declared ones are enough."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], timeout=600)
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(out.iterdir())
    return sdists[0], wheels[0]


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> pathlib.Path:
    """A fresh venv (no site packages) with the sdist pip-installed, built in pip's isolated env."""
    v = tmp_path_factory.mktemp("venv") / "v"
    run([sys.executable, "-m", "venv", v])
    run([v / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q", dist[0]],
        timeout=900)
    return v


def installed_dir(venv: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(run([venv / "bin" / "python", "-c", ("import os, pyexec; print(os.path.dirname("
                                                             "pyexec.__file__))")]).stdout.strip())


def sdist_members(sdist: pathlib.Path) -> dict[str, tarfile.TarInfo]:
    """The sdist's members by their path inside the project (the pyexec-X.Y.Z/ prefix dropped)."""
    with tarfile.open(sdist) as t:
        return {m.name.split("/", 1)[1]: m for m in t.getmembers() if "/" in m.name}


def test_sdist_holds_every_source_and_nothing_generated(dist):
    sdist, _ = dist
    assert sdist.name == f"pyexec-{VERSION}.tar.gz"
    names = set(sdist_members(sdist))
    need = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "pyexec/_native.pyx", "native/cffi_build.py",
            "pyexec/_native.pyi", "pyexec/py.typed"}
    need |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "native").glob("*.[ch]")}
    need |= tree_modules()
    assert "native/pyexec_core.h" in need and "native/guardian.c" in need and "native/warden.c" in need
    assert not need - names, f"missing from the sdist: {sorted(need - names)}"
    generated = {n for n in names if n.endswith((".so", ".o", ".pyc"))
                 or n in ("pyexec/_native.c", "pyexec/_pxcffi.c", *(f"pyexec/{p}" for p in PROGRAMS))}
    assert not generated, f"build products in the sdist: {sorted(generated)}"


def test_version_is_declared_once(dist):
    """pyproject.toml says it; the metadata, the file names and __version__ follow from it."""
    sdist, wheel = dist
    literal = re.compile(rb"""["']%s["']""" % re.escape(VERSION.encode()))
    with tarfile.open(sdist) as t:
        for m in t.getmembers():
            name = m.name.split("/", 1)[-1]
            if m.isfile() and name != "pyproject.toml" and not name.endswith("PKG-INFO"):
                assert not literal.search(t.extractfile(m).read()), f"{name} spells the version out"
    assert wheel.name.startswith(f"pyexec-{VERSION}-")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"pyexec-{VERSION}.dist-info/METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in meta


def test_wheel_holds_both_bindings_and_both_programs(dist):
    _, wheel = dist
    with zipfile.ZipFile(wheel) as z:
        infos = {i.filename: i for i in z.infolist()}
    names = set(infos)
    assert any(re.fullmatch(r"pyexec/_native\.cpython-[^/]*\.so", n) for n in names), sorted(names)
    assert any(re.fullmatch(r"pyexec/_pxcffi\.[^/]*so", n) for n in names), sorted(names)
    for prog in PROGRAMS:
        mode = infos[f"pyexec/{prog}"].external_attr >> 16
        assert stat.S_ISREG(mode) and mode & 0o111 == 0o111, f"{prog} is not executable in the wheel: {oct(mode)}"
    assert not tree_modules() - names, f"modules missing from the wheel: {sorted(tree_modules() - names)}"
    assert {"pyexec/py.typed", "pyexec/_native.pyi"} <= names, "typing information missing from the wheel"
    assert not [n for n in names if n.endswith((".pyx", ".c", ".h"))], "build sources in the wheel"


def test_installed_package_runs_from_the_venv(venv):
    """Both bindings import, the programs are executable, the build needed no Cython at run time,
    and every console script reports the one version."""
    pkg = installed_dir(venv)
    assert pkg.is_relative_to(venv), f"imported {pkg}, not the installed package"
    py = venv / "bin" / "python"
    probe = ("import importlib.metadata as md, importlib.util as u, pyexec, pyexec._native, pyexec._pxcffi;"
             "print(md.version('pyexec'), pyexec.__version__, u.find_spec('Cython') is None)")
    assert run([py, "-c", probe]).stdout.split() == [VERSION, VERSION, "True"]
    for prog in PROGRAMS:
        assert os.access(pkg / prog, os.X_OK), f"{prog} is not installed executable"
    for script in ("pyexec", "pluginhost"):
        assert run([venv / "bin" / script, "--version"]).stdout.strip() == f"{script} {VERSION}"
    assert os.access(venv / "bin" / "safefreeze", os.X_OK)  # the reference's CLI: it has no --version


def make(path: pathlib.Path, data: bytes, mode: int = 0o700) -> str:
    path.write_bytes(data)
    os.chown(path, 0, 0)
    os.chmod(path, mode)
    return str(path)


def write_setup(d: pathlib.Path, pre: bytes, pre_params: list[str]) -> str:
    """A trusted host config with one plugin (as tests/test_config_trust.py's write_setup)."""
    d.mkdir(mode=0o700)
    plugin = {"pluginName": "ScriptRunner", "preScriptLocation": make(d / "pre.sh", pre),
              "postScriptLocation": make(d / "post.sh", b"#!/bin/sh\necho post\n"),
              "preScriptParams": pre_params, "postScriptParams": [], "preScriptNoOfRetries": 0,
              "postScriptNoOfRetries": 0, "timeoutInSeconds": 30, "continueBackupOnFailure": True,
              "fsFreezeEnabled": True}
    pj = make(d / "plugin.json", json.dumps(plugin).encode(), mode=0o600)
    host = (f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\npluginName0 = ScriptRunner0\n"
            f"pluginPath0 = {d}\npluginConfigPath0 = {pj}\n")
    return make(d / "host.conf", host.encode(), mode=0o600)


# The pre-script notes the wardens running (by their executable) while it runs in its cgroup.
PRE = b"""#!%s
import json, os, sys
wardens = []
for d in os.listdir("/proc"):
    try:
        exe = os.readlink(f"/proc/{d}/exe")
    except OSError:
        continue
    if os.path.basename(exe) == "pyexec-warden":
        wardens.append(exe)
with open(sys.argv[1], "w") as f:
    json.dump({"cgroup": open("/proc/self/cgroup").read(), "wardens": wardens}, f)
print("pre")
"""
# The snapshot command: how many writes the writer completed in 0.3 s inside the window.
SNAPSHOT = """
import mmap, struct, sys, time
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)
c0 = struct.unpack_from("=Q", m)[0]
time.sleep(0.3)
with open(sys.argv[2], "w") as f:
    f.write(str(struct.unpack_from("=Q", m)[0] - c0))
"""


def resumes(w: Writer, within_s: float = 10.0) -> bool:
    c0, deadline = w.count(), time.monotonic() + within_s
    while time.monotonic() < deadline:
        if w.count() > c0 + 1:
            return True
        time.sleep(0.01)
    return False


@needs_root
def test_installed_console_scripts_check_and_run_a_freeze(venv, mounts, tmp_path):
    """`pyexec check` and `pyexec run --mount` of the installed package: its scripts run in the
    installed warden's cgroup, the snapshot runs while a writer is blocked, all thawed after."""
    mounts.rearm()
    m = mounts.make("ext4")
    py = venv / "bin" / "python"
    seen = tmp_path / "pre.json"
    hc = write_setup(tmp_path / "etc", PRE % str(py).encode(), [str(seen)])
    pyexec = venv / "bin" / "pyexec"
    check = json.loads(run([pyexec, "check", "--config", hc, "--mount", m.mountpoint, "--json"]).stdout)
    assert check["ok"] and check["problems"] == [] and check["plugins"] == ["ScriptRunner0"], check
    assert check["would_freeze"] == [m.mountpoint]

    w = Writer(os.path.join(m.mountpoint, "f"), tmp_path / "counter")
    mounts.writers.append(w.proc)
    snap, delta = make(tmp_path / "snap.py", SNAPSHOT.encode()), tmp_path / "delta"
    mounts.rearm()
    r = run([pyexec, "run", "--config", hc, "--mount", m.mountpoint, "--freeze-timeout", "20", "--json",
             "--snapshot-cmd", f"{py} {snap} {tmp_path / 'counter'} {delta}"], timeout=60, check=False)
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["outcome"] == "app-consistent", r.stdout + r.stderr
    assert rep["window"]["guardian"] == "idle" and [x["state"] for x in rep["window"]["mounts"]] == ["thawed"]
    assert [s["exit_code"] for s in rep["pre"] + rep["post"]] == [0, 0]
    assert int(delta.read_text()) <= 1, "the writer wrote inside the window"
    assert resumes(w), "the writer did not resume after the run"
    if not check["kernel"]["cgroup join"].startswith("none"):
        pre = json.loads(seen.read_text())
        assert str(installed_dir(venv) / "pyexec-warden") in pre["wardens"], pre
        assert "/pyexec/" in pre["cgroup"], pre


# The installed package's freeze, whichever name it is reached by: pyexec.freeze(...) (the public
# API) or pyexec.freeze.freeze(...) (the module's context manager).
FREEZE = """
import importlib, json, sys
import pyexec
fz = getattr(pyexec, "freeze", None)
if not callable(fz):
    fz = importlib.import_module("pyexec.freeze").freeze
with fz([sys.argv[1]], timeout=20) as win:
    print("frozen", flush=True)
    sys.stdin.readline()
print(json.dumps({"backend": win.backend, "guardian": win.guardian, "states": [m.state for m in win.mounts],
                  "error": str(win.error) if win.error else None}), flush=True)
"""


def procs_by_exe(exe: pathlib.Path) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/exe") == str(exe):
                out.append(int(d))
        except OSError:
            continue
    return out


@needs_root
def test_installed_freeze_blocks_a_writer_with_each_binding(venv, mounts):
    m = mounts.make("ext4")
    w = mounts.writer(os.path.join(m.mountpoint, "f"))
    guardian = installed_dir(venv) / "pyexec-guardian"
    for backend in ("cython", "cffi"):
        mounts.rearm()
        p = subprocess.Popen([str(venv / "bin" / "python"), "-c", FREEZE, m.mountpoint], cwd="/", text=True,
                             env=clean_env(PYEXEC_BACKEND=backend), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert p.stdout.readline() == "frozen\n", p.communicate(timeout=30)
            c0 = w.count()
            time.sleep(0.3)
            blocked = w.count() - c0
            guardians = procs_by_exe(guardian)
            out, err = p.communicate("\n", timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, err
        assert blocked <= 1, f"{backend}: the writer wrote {blocked} times inside the window"
        assert guardians, f"{backend}: the installed guardian was not running in the window"
        doc = json.loads(out)
        assert doc == {"backend": backend, "guardian": "idle", "states": ["thawed"], "error": None}, doc
        assert resumes(w), f"{backend}: the writer did not resume after the thaw"
