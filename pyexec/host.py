"""The plugin host's flow, as the reference runs it: check → pre-scripts → freeze,
snapshot, thaw → post-scripts, and the outcome.  Orchestration only."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os

from pyexec import config, errors, freeze, mounts, native, scripts, trust

APP = "app-consistent"
FS = "file-system-consistent"
FAILED = "failed"


@dataclasses.dataclass
class PluginCheck:
    """One plugin as the check found it; scripts are open, checked files."""

    entry: config.PluginEntry
    config: config.PluginConfig | None = None
    pre: trust.TrustedFile | None = None
    post: trust.TrustedFile | None = None


@dataclasses.dataclass
class CheckResult:
    """Everything `check` found: configs, open scripts, every problem, warnings."""

    host: config.HostConfig | None
    plugins: list[PluginCheck]
    errors: list[errors.PyexecError]
    warnings: list[str]

    @property
    def code(self) -> int:
        return self.errors[0].code if self.errors else 0

    @property
    def fs_freeze(self) -> bool:
        return all(p.config.fs_freeze for p in self.plugins if p.config)

    @property
    def dobackup(self) -> bool:
        """The reference's pre_check `dobackup`: False when a plugin whose config loaded says
        continueBackupOnFailure false (its caller then takes no snapshot if the check found a problem)."""
        return all(p.config.continue_on_failure for p in self.plugins if p.config)

    def close(self) -> None:
        for p in self.plugins:
            for f in (p.pre, p.post):
                if f:
                    f.close()


def _load(path: str, kind: trust.Kind, parse, errs: list):
    try:
        with trust.open_trusted(path, kind) as f:
            return parse(f.read(), path)
    except config.Problems as p:
        errs.extend(p.errors)
    except errors.PyexecError as e:
        errs.append(e)
    return None


def check(host_path: str = config.HOST_CONFIG_PATH) -> CheckResult:
    """Validate the host config, every plugin config and every script; run nothing."""
    errs: list[errors.PyexecError] = []
    host = _load(host_path, trust.HOST, config.parse_host, errs)
    res = CheckResult(host, [], errs, list(host.warnings) if host else [])
    if host is None:
        return res
    for entry in host.plugins:
        pc = PluginCheck(entry)
        res.plugins.append(pc)
        pc.config = _load(entry.config_path, trust.PLUGIN,
                          lambda data, p: config.parse_plugin(data, p, host.timeout), errs)
        if pc.config is None:
            continue
        res.warnings.extend(f"{entry.config_path}: {w}" for w in pc.config.warnings)
        for attr, path, kind in (("pre", pc.config.pre_script, trust.PRE), ("post", pc.config.post_script, trust.POST)):
            try:
                setattr(pc, attr, trust.open_trusted(path, kind))
            except errors.PyexecError as e:
                errs.append(e)
    return res


@dataclasses.dataclass
class RunReport:
    """One run: outcome, reported code, check problems, scripts, window, snapshot."""

    outcome: str = FAILED
    code: int = 0
    check_errors: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    pre: list = dataclasses.field(default_factory=list)
    post: list = dataclasses.field(default_factory=list)
    window: freeze.Window | None = None
    snapshot: str = "skipped"  # taken | skipped | failed
    snapshot_detail: str = ""
    mounts: list = dataclasses.field(default_factory=list)
    phases_ns: dict = dataclasses.field(default_factory=dict)


def run_phase(checked: CheckResult, phase: str, nat=None, env_extra=None) -> list[scripts.ScriptResult]:
    """Run every plugin's pre- or post-script in parallel; one result per plugin, in config order."""
    nat = nat or native.default()
    jobs = []
    for pc in checked.plugins:
        c = pc.config
        script = pc.pre if phase == "pre" else pc.post
        params = c.pre_params if phase == "pre" else c.post_params
        retries = c.pre_retries if phase == "pre" else c.post_retries
        jobs.append(dict(script=script, params=params, phase=phase, timeout_s=c.timeout, retries=retries,
                         continue_on_failure=c.continue_on_failure, plugin=pc.entry.name, host_limit=c.host_limit,
                         env_extra=env_extra, nat=nat))
    if len(jobs) <= 1:  # no thread to start for the common single plugin
        return [scripts.run_script(**job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as ex:
        futs = [ex.submit(scripts.run_script, **job) for job in jobs]
        return [f.result() for f in futs]


def _snapshot(action, window, nat, timeout_s: float) -> tuple[str, str]:
    if action is None:
        return "taken", "no snapshot action: the window only froze and thawed"
    if callable(action):
        try:
            action(window)
        except Exception as e:  # the caller's action failing is an outcome, not a crash
            return "failed", f"{type(e).__name__}: {e}"
        return "taken", ""
    proc = nat.spawn(list(action), scripts.base_env(), path=action[0])
    try:
        st = nat.wait(proc, nat.now_ns() + int(timeout_s * 1e9))
        if st is None:
            nat.kill_tree(proc, 100_000_000, 1_000_000_000)
            return "failed", f"snapshot command timed out after {timeout_s:g}s"
    finally:
        proc.close()
    if st.code != 0:
        return "failed", f"snapshot command exited {st.code if st.code >= 0 else 'by signal %d' % st.signal}"
    return "taken", ""


def run(host_path: str = config.HOST_CONFIG_PATH, mount_points=None, snapshot=None, freeze_timeout: float = 60.0,
        expedite: bool = True, presync: bool = True, nat: native.Native | None = None,
        progress=lambda msg: None) -> RunReport:
    """The whole flow; never raises for bad input: problems become the report's code."""
    nat = nat or native.default()
    rep = RunReport()
    t = nat.now_ns()
    progress("check: host config, plugin configs, scripts")
    checked = check(host_path)
    rep.phases_ns["check"] = nat.now_ns() - t
    rep.check_errors = [e.as_dict() for e in checked.errors]
    rep.warnings = checked.warnings
    try:
        if mount_points is None:
            skip = checked.host.mounts_to_skip if checked.host else ()
            mount_points = [m.mount_point for m in mounts.discover(skip=skip)]
        rep.mounts = list(mount_points)
        scripts_ok = not checked.errors
        go_on = True
        if scripts_ok:
            progress(f"pre-scripts: {len(checked.plugins)} plugin(s) in parallel")
            t = nat.now_ns()
            rep.pre = run_phase(checked, "pre", nat)
            rep.phases_ns["pre"] = nat.now_ns() - t
            failed = [r for r in rep.pre if not r.ok]
            if failed:
                go_on = all(r.continue_backup for r in failed) and checked.fs_freeze
        do_freeze = checked.fs_freeze if checked.plugins else True
        if go_on:
            t = nat.now_ns()
            if do_freeze and mount_points:
                progress(f"freeze: {len(mount_points)} filesystem(s), snapshot, thaw")
                try:
                    with freeze.freeze(mount_points, timeout=freeze_timeout, expedite=expedite,
                                       presync=presync, backend=nat) as win:
                        rep.snapshot, rep.snapshot_detail = _snapshot(snapshot, win, nat, freeze_timeout)
                    rep.window = win
                    if win.error is not None:
                        rep.check_errors.append(win.error.as_dict())
                except errors.FreezeError as e:
                    rep.snapshot, rep.snapshot_detail = "failed", e.describe()
                    rep.check_errors.append(e.as_dict())
            else:
                progress("snapshot without freeze (fsFreezeEnabled is false)")
                rep.snapshot, rep.snapshot_detail = _snapshot(snapshot, None, nat, freeze_timeout)
            rep.phases_ns["freeze+snapshot"] = nat.now_ns() - t
        if scripts_ok:
            progress("post-scripts")
            t = nat.now_ns()
            rep.post = run_phase(checked, "post", nat, {"PYEXEC_SNAPSHOT": rep.snapshot})
            rep.phases_ns["post"] = nat.now_ns() - t
    finally:
        checked.close()
    codes = [checked.code] + [r.error_code for r in rep.pre] + [r.error_code for r in rep.post]
    freeze_codes = [e["code"] for e in rep.check_errors if e["code"] in (121, 122, 123)]
    rep.code = next((c for c in codes + freeze_codes if c), 0)
    if rep.snapshot != "taken":
        rep.outcome = FAILED
    elif rep.code == 0:
        rep.outcome = APP
    else:
        rep.outcome = FS
    return rep
