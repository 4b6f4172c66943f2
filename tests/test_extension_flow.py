"""`pyexec.pluginhost.PluginHost` driven as the Azure extension drives the reference PluginHost, over realistic
configurations: each test asserts what the extension would report and what the scripts really did.

`extension_backup` below is the PluginHost branch of `daemon()` in the extension's VMBackup/main/handle.py
(Azure/azure-linux-extensions), decision for decision: pre_check → pre_script unless the check found a
problem → the snapshot if `dobackup` → post_script unless the check found a problem → the status.  The
snapshot step freezes a loop mount with pyexec's freeze (the extension's own safefreeze is tested in
test_safefreeze.py) and records what the application's state file said inside the window."""
from __future__ import annotations

import dataclasses
import os
import time
import uuid

import orjson
import pytest
from helpers import kill_with_descendants, needs_root, procs_matching
from test_config_trust import make

from pyexec import scripts, window
from pyexec.azure import pluginhost

pytestmark = needs_root

# ---- the extension's side -------------------------------------------------------------------------

# VMBackup/main/common.py (CommonVariables): run_result values, and the check codes after which
# handle.py does not count pre/post scripts as enabled (PluginhostConfigParsing, PluginConfigParsing,
# PluginhostConfigNotFound, PluginhostConfigPermissionError, PluginConfigNotFound).
SUCCESS, SUCCESS_APPCONSISTENT = 1, 0
NOT_PRE_POST_ENABLED = {304, 305, 313, 314, 316}


@dataclasses.dataclass
class Outcome:
    """What the extension reports, and what the snapshot step saw."""

    status: str            # app-consistent | fs-consistent | failed
    code: int              # the extension error code it reports
    snapshot: dict | None  # {"frozen": bool, "states": {plugin: state file content}}, None if not taken
    check: tuple = ()
    pre: pluginhost.PluginHostResult | None = None
    post: pluginhost.PluginHostResult | None = None


def extension_backup(ph: pluginhost.PluginHost, take_snapshot) -> Outcome:
    """handle.py's daemon(), PluginHost branch, with each decision as it makes it."""
    code, dobackup, fsfreeze_on = ph.pre_check()
    pre_post_enabled = code not in NOT_PRE_POST_ENABLED
    fs_consistent_only = code != 0  # doFsConsistentbackup
    pre = post = pluginhost.PluginHostResult()
    if not fs_consistent_only:
        pre = ph.pre_script()
        dobackup = pre.continueBackup
        if not fsfreeze_on and pre.anyScriptFailed:
            dobackup = False
    snapshot = take_snapshot(fsfreeze_on) if dobackup else None
    if not fs_consistent_only:
        post = ph.post_script()  # no argument, as handle.py calls it
        if not post.continueBackup:
            dobackup = False
        if not fsfreeze_on and post.anyScriptFailed:
            dobackup = False
    run_result = SUCCESS
    if not dobackup:
        if code != 0:
            run_result = code
        else:
            run_result = next((e.errorCode for e in pre.errors + post.errors if e.errorCode != 0), SUCCESS)
    # hutil.SetExtErrorCode keeps the first code it is given (HandlerUtil.py).
    ext_codes = ([code] if pre_post_enabled else []) + [e.errorCode for e in pre.errors + post.errors]
    ext_code = next((c for c in ext_codes if c != 0), None)
    if run_result == SUCCESS and not fs_consistent_only and not (pre.anyScriptFailed or post.anyScriptFailed):
        status, reported = "app-consistent", SUCCESS_APPCONSISTENT
    elif run_result == SUCCESS:
        status, reported = "fs-consistent", ext_code if ext_code is not None else SUCCESS
    else:
        status, reported = "failed", run_result
    return Outcome(status, reported, snapshot, (code, dobackup, fsfreeze_on), pre, post)


# ---- an admin's setup -----------------------------------------------------------------------------

# The public sample (MicrosoftAzureBackup/VMSnapshotPluginConfig, VMSnapshotScriptPluginConfig.json),
# as admins download it: they fill in the two locations and leave the rest, `["", ""]` params included.
SAMPLE = {"pluginName": "ScriptRunner", "preScriptLocation": "", "postScriptLocation": "",
          "preScriptParams": ["", ""], "postScriptParams": ["", ""], "preScriptNoOfRetries": 0,
          "postScriptNoOfRetries": 0, "timeoutInSeconds": 30, "continueBackupOnFailure": True,
          "fsFreezeEnabled": True, "ScriptsExecutionPollTimeSeconds": 3}

# Scripts find their helpers next to themselves, through $0.
QUIESCE = '#!/bin/sh\n. "$(dirname "$0")/common.sh"\nquiesce "$@"\n'
RESUME = '#!/bin/sh\n. "$(dirname "$0")/common.sh"\nresume "$@"\n'
COMMON = """# sourced by pre.sh and post.sh
STATE={state}
LOG={log}
quiesce() {{ echo quiesced > "$STATE"; echo "{name} pre $PYEXEC_PHASE args=$# [$1|$2]" >> "$LOG"; }}
resume() {{ echo running > "$STATE"; echo "{name} post $PYEXEC_PHASE $PYEXEC_SNAPSHOT" >> "$LOG"; }}
"""


class Box:
    """A root-only config directory with one subdirectory per plugin (pre.sh, post.sh, common.sh, its
    VMSnapshotScriptPluginConfig.json), a host config, and the applications' state files on a loop mount."""

    def __init__(self, tmp_path, mount):
        self.tmp, self.mount = tmp_path, mount
        self.etc = tmp_path / "azure"
        self.etc.mkdir(mode=0o700)
        self.log = tmp_path / "log"
        self.log.touch()
        self.names: list[str] = []

    def plugin(self, name: str, pre: str | None = QUIESCE, post: str | None = RESUME, pre_mode: int = 0o700,
               **doc) -> str:
        """A plugin directory and its config (the sample with the locations filled, then doc's changes)."""
        d = self.etc / name
        d.mkdir(mode=0o700)
        make(d / "common.sh", COMMON.format(state=self.state_path(name), log=self.log, name=name).encode(), 0o600)
        for fname, text, mode in (("pre.sh", pre, pre_mode), ("post.sh", post, 0o700)):
            if text is not None:
                make(d / fname, text.encode(), mode)
        with open(self.state_path(name), "w") as f:
            f.write("running\n")
        self.names.append(name)
        cfg = {**SAMPLE, "preScriptLocation": str(d / "pre.sh"), "postScriptLocation": str(d / "post.sh"), **doc}
        return make(d / "VMSnapshotScriptPluginConfig.json", orjson.dumps(cfg, option=orjson.OPT_INDENT_2), 0o600)

    def host(self, *configs: str, timeout: int = 1800) -> pluginhost.PluginHost:
        """VMSnapshotPluginHost.conf in the extension's own format, and a PluginHost reading it."""
        lines = ["[pre_post]", f"timeoutInSeconds: {timeout}", f"numberOfPlugins: {len(configs)}"]
        for i, c in enumerate(configs):
            lines += [f"pluginName{i}: ScriptRunner", f"pluginPath{i}: {self.etc}", f"pluginConfigPath{i}: {c}"]
        ph = pluginhost.PluginHost(None)
        ph.configLocation = make(self.etc / "VMSnapshotPluginHost.conf", ("\n".join(lines) + "\n").encode(), 0o600)
        return ph

    def state_path(self, name: str) -> str:
        return os.path.join(self.mount.mountpoint, f"{name}.state")

    def states(self) -> dict:
        """Each application's state file, now."""
        return {n: open(self.state_path(n)).read().strip() for n in self.names}

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def snapshot(self, fsfreeze_on: bool) -> dict:
        """The extension's snapshot step: freeze (if fsFreezeEnabled), read what a snapshot would hold, thaw."""
        if not fsfreeze_on:
            return {"frozen": False, "states": self.states()}
        with window.freeze([self.mount.mountpoint], timeout=20) as w:
            return {"frozen": [m.state for m in w.mounts] == ["frozen"], "states": self.states()}

    def backup(self, ph: pluginhost.PluginHost) -> Outcome:
        try:
            return extension_backup(ph, self.snapshot)
        finally:
            ph.close()


@pytest.fixture
def box(tmp_path, mounts):
    return Box(tmp_path, mounts.make("ext4"))


def app_consistent(out: Outcome, box: Box) -> None:
    """The outcome every healthy configuration must give: quiesced in the snapshot, resumed after it."""
    assert (out.status, out.code) == ("app-consistent", 0), out
    assert out.snapshot["frozen"] and set(out.snapshot["states"].values()) == {"quiesced"}
    assert set(box.states().values()) == {"running"}


# ---- configurations ---------------------------------------------------------------------------------

def test_public_sample_config_with_its_empty_params(box):
    out = box.backup(box.host(box.plugin("db")))
    app_consistent(out, box)
    assert out.check == (0, True, True)
    # The sample's ["", ""] reach the scripts as two empty arguments; post sees how it was called.
    assert box.log_lines() == ["db pre pre args=2 [|]", "db post post unknown"]


def test_sh_script_sources_its_sibling_through_dollar0(box):
    out = box.backup(box.host(box.plugin("db", pre='#!/bin/sh\nset -eu\n. "$(dirname "$0")/common.sh"\n'
                                                  'test "$0" = "' + str(box.etc / "db" / "pre.sh") + '"\nquiesce "$@"\n')))
    app_consistent(out, box)


def test_script_without_shebang_and_without_x_bit_runs_as_sh_path(box):
    out = box.backup(box.host(box.plugin("db", pre='. "$(dirname "$0")/common.sh"\nquiesce "$@"\n', pre_mode=0o600)))
    app_consistent(out, box)


def test_bash_with_set_e(box):
    pre = ('#!/bin/bash\nset -euo pipefail\nsource "$(dirname "${BASH_SOURCE[0]}")/common.sh"\n'
           'steps=(flush lock)\nfor s in "${steps[@]}"; do echo "$s"; done\nquiesce "$@"\n')
    out = box.backup(box.host(box.plugin("db", pre=pre)))
    app_consistent(out, box)
    assert out.pre.scripts[0].stdout.data == b"flush\nlock\n"


def test_bash_set_e_stops_at_the_failing_command(box):
    pre = '#!/bin/bash\nset -e\nsource "$(dirname "$0")/common.sh"\nfalse\nquiesce\n'
    out = box.backup(box.host(box.plugin("db", pre=pre)))
    assert (out.status, out.code) == ("fs-consistent", 300)
    assert out.snapshot["states"] == {"db": "running"}, "the quiesce after `false` must not have run"
    assert box.log_lines() == ["db post post unknown"]


def test_script_that_reexecs_itself_through_dollar0(box):
    pre = ('#!/bin/sh\nif [ -z "${REEXEC:-}" ]; then REEXEC=1 exec "$0" again "$@"; fi\n'
           '. "$(dirname "$0")/common.sh"\nquiesce "$@"\n')
    out = box.backup(box.host(box.plugin("db", pre=pre, preScriptParams=["x"])))
    app_consistent(out, box)
    assert box.log_lines()[0] == "db pre pre args=2 [again|x]"


def test_missing_sibling_makes_dash_exit_2_which_fails(box):
    # The case that motivated the fix: dash exits 2 when `.` cannot find its file; that is a failure.
    out = box.backup(box.host(box.plugin("db", pre='#!/bin/sh\n. "$(dirname "$0")/missing.sh"\nquiesce\n')))
    assert (out.status, out.code) == ("fs-consistent", 300)
    assert out.pre.scripts[0].exit_code == 2 and out.pre.anyScriptFailed
    assert out.snapshot == {"frozen": True, "states": {"db": "running"}}


def test_exit_2_is_a_failure(box):
    out = box.backup(box.host(box.plugin("db", pre=QUIESCE + "exit 2\n")))
    assert (out.status, out.code) == ("fs-consistent", 300) and out.pre.errors[0].errorCode == 300
    assert out.snapshot["states"] == {"db": "quiesced"} and box.states() == {"db": "running"}


def test_failing_pre_script_falls_back_and_still_resumes(box):
    out = box.backup(box.host(box.plugin("db", pre=QUIESCE + "exit 1\n")))
    assert (out.status, out.code) == ("fs-consistent", 300) and out.snapshot["frozen"]
    assert box.states() == {"db": "running"} and box.log_lines()[-1] == "db post post unknown"


def test_hanging_pre_script_is_killed_at_its_timeout(box):
    pidfile = box.tmp / "pid"
    out = box.backup(box.host(box.plugin("db", pre=f"#!/bin/sh\necho $$ > {pidfile}\nsleep 60\n",
                                         timeoutInSeconds=1)))
    assert (out.status, out.code) == ("fs-consistent", 308)
    assert not os.path.exists(f"/proc/{pidfile.read_text().strip()}"), "the hung script still runs"
    assert box.log_lines() == ["db post post unknown"]


def test_host_timeout_is_the_limit_that_expires(box):
    out = box.backup(box.host(box.plugin("db", pre="#!/bin/sh\nsleep 60\n"), timeout=1))
    assert (out.status, out.code) == ("fs-consistent", 310)
    assert "plugin host" in out.pre.scripts[0].detail


def test_chatty_script_past_64_kib_does_not_deadlock(box):
    pre = "#!/bin/sh\nhead -c 1000000 /dev/zero | tr '\\0' x\n" + QUIESCE.split("\n", 1)[1]
    out = box.backup(box.host(box.plugin("db", pre=pre)))
    app_consistent(out, box)
    assert out.pre.scripts[0].stdout.total == 1_000_000


def test_continue_false_and_failing_pre_script_fails_without_snapshot(box):
    out = box.backup(box.host(box.plugin("db", pre=QUIESCE + "exit 1\n", continueBackupOnFailure=False)))
    assert (out.status, out.code, out.snapshot) == ("failed", 300, None)
    assert out.check == (0, False, True)
    assert box.states() == {"db": "running"}, "the post-script runs even when the backup fails"


def test_continue_false_and_missing_pre_script_fails_the_backup(box):
    box.plugin("db", pre=None, continueBackupOnFailure=False)
    out = box.backup(box.host(str(box.etc / "db" / "VMSnapshotScriptPluginConfig.json")))
    assert out.check == (302, False, True)
    assert (out.status, out.code, out.snapshot) == ("failed", 302, None)
    assert box.log_lines() == [], "no script runs after a check problem"


def test_continue_true_and_missing_pre_script_is_fs_consistent(box):
    out = box.backup(box.host(box.plugin("db", pre=None)))
    assert out.check == (302, True, True)
    assert (out.status, out.code) == ("fs-consistent", 302) and out.snapshot["frozen"]
    assert box.log_lines() == []


def test_fs_freeze_disabled(box):
    out = box.backup(box.host(box.plugin("db", fsFreezeEnabled=False)))
    assert (out.status, out.code) == ("app-consistent", 0) and out.check == (0, True, False)
    assert out.snapshot == {"frozen": False, "states": {"db": "quiesced"}}


def test_fs_freeze_disabled_and_failing_pre_script_fails(box):
    out = box.backup(box.host(box.plugin("db", pre=QUIESCE + "exit 1\n", fsFreezeEnabled=False)))
    assert (out.status, out.code, out.snapshot) == ("failed", 300, None)
    assert box.states() == {"db": "running"}


def test_no_plugins(box):
    ph = box.host()
    out = box.backup(ph)
    # The reference's answer: nothing checked wrong, nothing ran, nothing failed.
    assert out.check == (0, True, True) and out.pre.errors == [] and out.post.errors == []
    assert (out.status, out.code) == ("app-consistent", 0) and out.snapshot["frozen"]
    assert box.log_lines() == []


def test_three_plugins(box):
    out = box.backup(box.host(*(box.plugin(n) for n in ("db", "cache", "queue"))))
    app_consistent(out, box)
    assert [e.pluginName for e in out.pre.errors] == ["ScriptRunner"] * 3
    assert sorted(box.log_lines()) == sorted([f"{n} pre pre args=2 [|]" for n in ("db", "cache", "queue")]
                                             + [f"{n} post post unknown" for n in ("db", "cache", "queue")])


def test_three_plugins_one_failing_with_continue_false(box):
    cfgs = [box.plugin("db"), box.plugin("cache"),
            box.plugin("queue", pre=QUIESCE + "exit 1\n", continueBackupOnFailure=False)]
    out = box.backup(box.host(*cfgs))
    assert (out.status, out.code, out.snapshot) == ("failed", 300, None)
    assert [e.errorCode for e in out.pre.errors] == [0, 0, 300]
    assert box.states() == {"db": "running", "cache": "running", "queue": "running"}


def test_tool_only_on_the_callers_path_and_the_environment(box, monkeypatch):
    tools = box.tmp / "opt" / "bin"
    make(tools / "appctl", f'#!/bin/sh\necho "$1" > {box.state_path("db")}\n'.encode(), 0o755)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("NOT_PASSED", "1")
    envfile = box.tmp / "env"
    pre = f"#!/bin/sh\nenv > {envfile}\nappctl quiesced\n"
    out = box.backup(box.host(box.plugin("db", pre=pre, post="#!/bin/sh\nappctl running\n")))
    app_consistent(out, box)
    env = dict(line.split("=", 1) for line in envfile.read_text().splitlines() if "=" in line)
    env.pop("PWD", None)  # sh sets it
    env.pop("SHLVL", None)
    assert env == {"PATH": f"{tools}:/usr/bin:/bin", "HOME": "/root", "USER": "root", "LOGNAME": "root",
                   "SHELL": env["SHELL"], "LANG": "C.UTF-8", "LC_TIME": "C", "TZ": "UTC", "PYEXEC_PHASE": "pre"}


def test_no_path_in_the_callers_environment_gives_systemds_default(box, monkeypatch):
    monkeypatch.delenv("PATH")
    out = box.backup(box.host(box.plugin("db", pre=f'#!/bin/sh\necho "$PATH" > {box.tmp / "path"}\n'
                                                   + QUIESCE.split("\n", 1)[1])))
    app_consistent(out, box)
    assert (box.tmp / "path").read_text().strip() == scripts.DEFAULT_PATH


def test_post_script_restarts_the_application_in_the_background(box):
    mark = f"app-{uuid.uuid4().hex[:8]}"
    pidfile = box.tmp / f"{mark}.pid"  # the daemon says it runs (counting processes by argv races its fork)
    post = RESUME + f"nohup sh -c 'echo $$ > {pidfile}; sleep 300; :' {mark} >/dev/null 2>&1 &\n"
    ph = box.host(box.plugin("db", post=post))
    try:
        t0 = time.monotonic()
        out = box.backup(ph)
        took = time.monotonic() - t0
        app_consistent(out, box)
        # The phase ended with the post-script's own exit, while the daemon (300 s) still ran: not held
        # open until the daemon ended, nor cut short by the 30 s timeout (which would kill it too).
        (post,) = out.post.scripts
        assert post.exit_code == 0 and not post.timed_out, post.as_dict()
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.01)
        pid = int(pidfile.read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert mark.encode() in f.read(), "the restarted application is not running"
        print(f"backup with a daemon-starting post-script: {took:.2f}s")
    finally:
        kill_with_descendants(procs_matching(lambda argv: mark.encode() in argv))



def test_daemon_restarted_by_pluginhost_post_outlives_the_host(tmp_path):
    """`pluginhost post` as a caller runs it: the application its post-script starts in the
    background is still running seconds after the host process has exited."""
    import subprocess
    import sys

    from test_config_trust import write_setup
    mark = f"app-{uuid.uuid4().hex[:8]}"
    hc = write_setup(tmp_path, post=f"#!/bin/sh\nnohup sh -c 'sleep 300; :' {mark} >/dev/null 2>&1 &\n".encode())
    prog = os.path.join(os.path.dirname(sys.executable), "pluginhost")
    try:
        res = subprocess.run([prog, "--config", hc, "post"], capture_output=True, cwd="/", timeout=60)
        assert res.returncode == 0, res.stderr
        time.sleep(3)
        assert len(procs_matching(lambda argv: mark.encode() in argv)) == 1, "the warden killed the daemon"
    finally:
        kill_with_descendants(procs_matching(lambda argv: mark.encode() in argv))
