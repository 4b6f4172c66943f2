"""Config parsing, trust checks on real files with real owners and modes, and `pyexec check`.

CORPUS maps each bad input to the table code it must produce (at least 40 cases)."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys

import orjson
import pytest
from helpers import needs_root
from hypothesis import given, settings
from hypothesis import strategies as st

from pyexec import config, errors, trust

GOOD_PLUGIN = {"pluginName": "ScriptRunner", "preScriptLocation": "/x/pre.sh", "postScriptLocation": "/x/post.sh",
               "preScriptParams": ["a", "b c"], "postScriptParams": [], "preScriptNoOfRetries": 1,
               "postScriptNoOfRetries": 0, "timeoutInSeconds": 30, "continueBackupOnFailure": True,
               "fsFreezeEnabled": True}


def plugin(**changes) -> bytes:
    doc = {**GOOD_PLUGIN, **changes}
    return orjson.dumps({k: v for k, v in doc.items() if v is not ...})


PLUGIN_CORPUS = [
    (b"", "empty"), (b"{", "truncated"), (b"[]", "array top level"), (b"null", "null"), (b'"x"', "string"),
    (b"\xff\xfe{}", "not utf-8"), (b'{"a": NaN}', "NaN"), (b'{"a": Infinity}', "Infinity"),
    (b'{"a": 1e999}', "huge float"), (b'{"a": 123456789012345678901234567890}', "huge int"),
    (b"[" * 5000 + b"]" * 5000, "deep nesting"),
    (b'{"preScriptLocation": "/a", "preScriptLocation": "/b", "postScriptLocation": "/c"}', "duplicate key"),
    (plugin(preScriptLocation=...), "missing pre"), (plugin(postScriptLocation=...), "missing post"),
    (plugin(preScriptLocation=""), "empty pre"), (plugin(preScriptLocation="rel/pre.sh"), "relative pre"),
    (plugin(preScriptLocation=5), "numeric pre"), (plugin(timeoutInSeconds="30"), "string timeout"),
    (plugin(timeoutInSeconds=0), "zero timeout"), (plugin(timeoutInSeconds=-1), "negative timeout"),
    (plugin(timeoutInSeconds=1.5), "fractional timeout"), (plugin(timeoutInSeconds=True), "bool timeout"),
    (plugin(preScriptNoOfRetries=-1), "negative retries"), (plugin(preScriptNoOfRetries=1.5), "fractional retries"),
    (plugin(postScriptNoOfRetries="2"), "string retries"), (plugin(postScriptNoOfRetries=10**6), "huge retries"),
    (plugin(continueBackupOnFailure="false"), "string bool"), (plugin(fsFreezeEnabled=1), "int bool"),
    (plugin(preScriptParams="a b"), "params not a list"), (plugin(preScriptParams=["a", 1]), "non-string param"),
    (plugin(postScriptParams={"a": 1}), "params an object"), (plugin(pluginName=3), "numeric name"),
    (plugin(ScriptsExecutionPollTimeSeconds="3"), "string poll time"),
]
HOST_CORPUS = [
    (b"", "empty"), (b"timeoutInSeconds = 5\n", "no section"), (b"[other]\nx=1\n", "wrong section"),
    (b"[pre_post]\nnumberOfPlugins = two\n", "bad number"), (b"[pre_post]\nnumberOfPlugins = -1\n", "negative"),
    (b"[pre_post]\ntimeoutInSeconds = 1.5\nnumberOfPlugins = 0\n", "fractional timeout"),
    (b"[pre_post]\nnumberOfPlugins = 2\npluginName0 = a\npluginPath0 = /x\npluginConfigPath0 = /x/a.json\n",
     "more plugins than listed"),
    (b"[pre_post]\nnumberOfPlugins = 1\npluginName0 = a\n", "missing keys"),
    (b"[pre_post]\n[pre_post]\n", "duplicate section"), (b"[pre_post]\na=1\na=2\n", "duplicate option"),
    (b"no section header at all", "garbage"), (b"\xff\xfe[pre_post]", "not utf-8"),
]


@pytest.mark.parametrize("data,why", PLUGIN_CORPUS, ids=[w for _, w in PLUGIN_CORPUS])
def test_bad_plugin_config_is_305(data, why):
    with pytest.raises(config.Problems) as ei:
        config.parse_plugin(data, "/x/p.json")
    assert ei.value.errors and all(e.code == 305 for e in ei.value.errors)


@pytest.mark.parametrize("data,why", HOST_CORPUS, ids=[w for _, w in HOST_CORPUS])
def test_bad_host_config_is_304(data, why):
    with pytest.raises(config.Problems) as ei:
        config.parse_host(data, "/x/h.conf")
    assert ei.value.errors and all(e.code == 304 for e in ei.value.errors)


def test_every_bad_key_reported_not_only_first():
    with pytest.raises(config.Problems) as ei:
        config.parse_plugin(plugin(timeoutInSeconds="30", fsFreezeEnabled="yes", preScriptParams=3), "/x/p.json")
    assert sorted(e.key for e in ei.value.errors) == ["fsFreezeEnabled", "preScriptParams", "timeoutInSeconds"]


def test_defaults_clamp_and_warnings():
    c = config.parse_plugin(orjson.dumps({"preScriptLocation": "/a", "postScriptLocation": "/b", "zzz": 1,
                                          "timeoutInSeconds": 5000}), "/p", host_timeout=1800)
    assert (c.pre_params, c.pre_retries, c.continue_on_failure, c.fs_freeze) == ((), 0, True, True)
    assert c.timeout == 1800 and any("zzz" in w for w in c.warnings)
    assert config.parse_plugin(orjson.dumps({"preScriptLocation": "/a", "postScriptLocation": "/b"}), "/p").timeout == 30
    h = config.parse_host(b"[pre_post]\ntimeoutInSeconds = 99999\nnumberOfPlugins = 1\npluginName0 = ScriptRunner\n"
                          b"pluginPath0 = /etc/azure\npluginConfigPath0 = /etc/azure/VMSnapshotScriptPluginConfig.json\n")
    assert h.timeout == 1800 and len(h.plugins) == 1


def test_no_plugins_is_valid_with_a_warning():
    # As the reference: numberOfPlugins 0 loads nothing, runs nothing, and fails nothing.
    h = config.parse_host(b"[pre_post]\ntimeoutInSeconds: 1800\nnumberOfPlugins: 0\n", "/x/h.conf")
    assert h.plugins == () and any("no plugins configured" in w for w in h.warnings)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_give_config_or_table_error(data):
    for parse, code in ((config.parse_plugin, 305), (config.parse_host, 304)):
        try:
            parse(data, "/fuzz")
        except config.Problems as p:
            # Only the file's own "incorrect" code: a parser knows nothing of trust or scripts.
            assert p.errors and all(isinstance(e, errors.ConfigError) and e.code == code for e in p.errors)


# ---- trust, on real files --------------------------------------------------------------

def nobody() -> int:
    return pwd.getpwnam("nobody").pw_uid


def make(path, data=b"#!/bin/sh\nexit 0\n", mode=0o700, uid=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, uid, 0)  # before chmod: chown clears setuid/setgid bits
    os.chmod(path, mode)
    return str(path)


@needs_root
@pytest.mark.parametrize("kind,mode,uid,code", [
    (trust.PRE, 0o700, 0, None), (trust.PRE, 0o600, 0, None), (trust.PRE, 0o750, 0, 306),
    (trust.PRE, 0o707, 0, 306), (trust.PRE, 0o4700, 0, 306), (trust.PRE, 0o700, "nobody", 306),
    (trust.POST, 0o777, 0, 307), (trust.POST, 0o700, "nobody", 307),
    (trust.PLUGIN, 0o600, 0, None), (trust.PLUGIN, 0o400, 0, None), (trust.PLUGIN, 0o700, 0, 317),
    (trust.PLUGIN, 0o644, 0, 317), (trust.PLUGIN, 0o600, "nobody", 318),
    (trust.HOST, 0o644, 0, None), (trust.HOST, 0o600, 0, None), (trust.HOST, 0o664, 0, 314),
    (trust.HOST, 0o646, 0, 314), (trust.HOST, 0o644, "nobody", 315),
])
def test_file_modes_and_owners(tmp_path, kind, mode, uid, code):
    p = make(tmp_path / "d" / "f", mode=mode, uid=nobody() if uid == "nobody" else uid)
    if code is None:
        with trust.open_trusted(p, kind) as f:
            assert os.fstat(f.fd).st_ino == os.stat(p).st_ino
    else:
        with pytest.raises(errors.PyexecError) as ei:
            trust.open_trusted(p, kind)
        assert ei.value.code == code


@needs_root
def test_paths_symlinks_and_parents(tmp_path):
    d = tmp_path / "d"
    good = make(d / "pre.sh")
    with pytest.raises(errors.ScriptError) as ei:
        trust.open_trusted(str(d / "missing"), trust.PRE)
    assert ei.value.code == 302
    with pytest.raises(errors.ScriptError) as ei:
        trust.open_trusted(str(d), trust.POST)  # a directory
    assert ei.value.code == 303
    # A root-owned symlink to a root file is followed; one owned by another user is not.
    os.symlink(good, d / "link")
    trust.open_trusted(str(d / "link"), trust.PRE).close()
    os.symlink(good, d / "userlink")
    os.lchown(d / "userlink", nobody(), 0)
    with pytest.raises(errors.TrustError) as ei:
        trust.open_trusted(str(d / "userlink"), trust.PRE)
    assert ei.value.code == 306
    # A root symlink to a file owned by someone else fails on the target.
    other = make(tmp_path / "o" / "x", uid=nobody())
    os.symlink(other, d / "to-other")
    with pytest.raises(errors.TrustError):
        trust.open_trusted(str(d / "to-other"), trust.PRE)
    # A parent directory writable by others (not sticky), or owned by another user.
    os.chmod(d, 0o777)
    with pytest.raises(errors.TrustError) as ei:
        trust.open_trusted(good, trust.PRE)
    assert ei.value.code == 306 and "directory" in ei.value.detail
    os.chmod(d, 0o1777)  # sticky: fine, the file is root's
    trust.open_trusted(good, trust.PRE).close()
    os.chmod(d, 0o755)
    os.chown(d, nobody(), 0)
    with pytest.raises(errors.TrustError) as ei:
        trust.open_trusted(good, trust.PLUGIN)
    assert ei.value.code == 318


@needs_root
def test_fifo_and_oversize_configs(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(errors.ConfigError) as ei:  # must not block opening it
        trust.open_trusted(str(fifo), trust.PLUGIN)
    assert ei.value.code == 305
    big = make(tmp_path / "big.conf", data=b"#" * (config.MAX_CONFIG_BYTES + 1), mode=0o600)
    with pytest.raises(errors.ConfigError) as ei:
        trust.open_trusted(big, trust.HOST)
    assert ei.value.code == 304


@needs_root
def test_checked_file_is_the_file_that_is_read(tmp_path):
    p = make(tmp_path / "s.sh", data=b"#!/bin/sh\necho original\n")
    f = trust.open_trusted(p, trust.PRE)
    try:
        # Swap another file in over the path after the check: the open fd still reads the checked one.
        make(tmp_path / "evil", data=b"#!/bin/sh\necho evil\n")
        os.rename(tmp_path / "evil", p)
        assert b"original" in f.read()
    finally:
        f.close()


def write_setup(tmp_path, plugin_doc=None, pre=b"#!/bin/sh\necho pre\n", post=b"#!/bin/sh\necho post\n",
                host_extra=b"", plugins=1):
    d = tmp_path / "etc"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o700)
    pre_p = make(d / "pre.sh", pre)
    post_p = make(d / "post.sh", post)
    doc = {**GOOD_PLUGIN, "preScriptLocation": pre_p, "postScriptLocation": post_p, "preScriptNoOfRetries": 0,
           **(plugin_doc or {})}
    pj = make(d / "plugin.json", orjson.dumps(doc), mode=0o600)
    lines = [b"[pre_post]", b"timeoutInSeconds = 60", b"numberOfPlugins = %d" % plugins]
    for i in range(plugins):
        lines += [b"pluginName%d = ScriptRunner%d" % (i, i), b"pluginPath%d = %s" % (i, str(d).encode()),
                  b"pluginConfigPath%d = %s" % (i, pj.encode())]
    return make(d / "host.conf", b"\n".join(lines) + b"\n" + host_extra, mode=0o600)


@needs_root
def test_check_command_reports_every_problem_and_exit_status(tmp_path):
    hc = write_setup(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "pyexec.cli", "check", "--config", hc, "--json"],
                        capture_output=True, cwd="/")
    doc = orjson.loads(ok.stdout)
    assert ok.returncode == 0 and doc["ok"] and doc["problems"] == [] and ok.stderr == b""
    os.chmod(tmp_path / "etc" / "pre.sh", 0o755)
    os.chmod(tmp_path / "etc" / "post.sh", 0o777)
    bad = subprocess.run([sys.executable, "-m", "pyexec.cli", "check", "--config", hc, "--json"],
                         capture_output=True, cwd="/")
    doc = orjson.loads(bad.stdout)
    assert bad.returncode != 0 and [p["code"] for p in doc["problems"]] == [306, 307]
    assert b"Traceback" not in bad.stderr
    text = subprocess.run([sys.executable, "-m", "pyexec.cli", "check", "--config", str(tmp_path / "nope")],
                          capture_output=True, cwd="/", text=True)
    assert text.returncode != 0 and "313" in text.stdout and "Traceback" not in text.stderr
