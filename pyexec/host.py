"""The plugin host's flow, as the reference runs it: check → pre-scripts → freeze,
snapshot, thaw → post-scripts, and the outcome.  Orchestration only."""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from pyexec import (
    config,
    dbconfig,
    errors,
    journal,
    limits,
    locks,
    mounts,
    native,
    quiesce,
    scripts,
    signals,
    steps,
    trust,
    window,
)

APP = "app-consistent"
FS = "file-system-consistent"
FAILED = "failed"
# The snapshot inside the window: nothing, a callable given the window (None when nothing is frozen),
# or a command (a string split with shell rules, or an argv).
Snapshot = Callable[[window.Window | None], object] | str | bytes | Sequence[scripts.CommandArg] | None
_Action = Callable[[window.Window | None], object] | list[str] | None  # a Snapshot, its command resolved
_T = TypeVar("_T")


@dataclasses.dataclass
class PluginCheck:
    """One plugin as the check found it; scripts are open, checked files."""

    entry: config.PluginEntry
    config: config.PluginConfig | dbconfig.DatabaseConfig | None = None
    pre: trust.TrustedFile | None = None
    post: trust.TrustedFile | None = None
    quiescer: quiesce.Quiescer | None = None  # a built-in plugin (entry.builtin) that passed the check


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
        """Close the checked scripts, and end any database session still open."""
        for p in self.plugins:
            for f in (p.pre, p.post):
                if f:
                    f.close()
            if p.quiescer:
                p.quiescer.close()


def _load(path: str, kind: trust.Kind, parse: Callable[[bytes, str], _T],
          errs: list[errors.PyexecError]) -> _T | None:
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
        engine = entry.builtin
        if engine is not None:
            db = pc.config = _load(entry.config_path, trust.PLUGIN,
                                   functools.partial(dbconfig.parse_database, engine=engine, host_timeout=host.timeout), errs)
            if db is not None:
                res.warnings.extend(f"{entry.config_path}: {w}" for w in db.warnings)
                pc.quiescer = quiesce.prepare(entry, db, errs)
            continue
        sc = pc.config = _load(entry.config_path, trust.PLUGIN,
                               lambda data, p: config.parse_plugin(data, p, host.timeout), errs)
        if sc is None:
            continue
        res.warnings.extend(f"{entry.config_path}: {w}" for w in sc.warnings)
        for attr, path, kind in (("pre", sc.pre_script, trust.PRE), ("post", sc.post_script, trust.POST)):
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
    check_errors: list[errors.PyexecError] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    pre: list[steps.ScriptResult] = dataclasses.field(default_factory=list)
    post: list[steps.ScriptResult] = dataclasses.field(default_factory=list)
    window: window.Window | None = None
    snapshot: str = "skipped"  # taken | skipped | failed
    snapshot_detail: str = ""
    snapshot_run: steps.ScriptResult | None = None  # the snapshot command's result, if one ran
    mounts: list[str] = dataclasses.field(default_factory=list)
    phases_ns: dict[str, int] = dataclasses.field(default_factory=dict)
    interrupted: str | None = None  # what cut the run short: a signal's name (SIGINT, …) or "cancelled"


def run_phase(checked: CheckResult, phase: str, nat: native.Native | None = None,
              env_extra: Mapping[str, str] | None = None, cancel_fd: int = -1,
              filesystems: int = 1) -> list[steps.ScriptResult]:
    """Run every plugin's pre- or post-script (a built-in's quiesce or release) in parallel; one result
    per plugin, in config order.  filesystems: how many the window freezes (PostgreSQL's backup mode).
    For a check without problems only: ValueError, before anything runs, for a plugin that failed it."""
    nat = nat or native.default()
    base = scripts.base_env()
    snapshot = (env_extra or {}).get("PYEXEC_SNAPSHOT", "unknown")
    jobs: list[Callable[[], steps.ScriptResult]] = []
    for pc in checked.plugins:
        c = pc.config
        if pc.quiescer is not None:
            jobs.append(functools.partial(pc.quiescer.pre, filesystems, cancel_fd, nat) if phase == "pre"
                        else functools.partial(pc.quiescer.post, snapshot, nat))
            continue
        script = pc.pre if phase == "pre" else pc.post
        if not isinstance(c, config.PluginConfig) or script is None:
            raise ValueError(f"plugin {pc.entry.name} did not pass the check: its scripts cannot run")
        params = c.pre_params if phase == "pre" else c.post_params
        retries = c.pre_retries if phase == "pre" else c.post_retries
        jobs.append(functools.partial(
            scripts.run_script, script=script, params=params, phase=phase, timeout_s=c.timeout, retries=retries,
            continue_on_failure=c.continue_on_failure, plugin=pc.entry.name, host_limit=c.host_limit,
            env_extra=env_extra, nat=nat, cancel_fd=cancel_fd, base=base))
    if len(jobs) <= 1:  # no thread to start for the common single plugin
        return [job() for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as ex:
        futs = [ex.submit(job) for job in jobs]
        return [f.result() for f in futs]


def plan_mounts(checked: CheckResult, mount_points: Iterable[limits.Path] | None = None) -> list[mounts.Mount]:
    """What a run freezes, in order: mount_points if given, else discovery minus mountsToSkip.
    `check` and `run` both choose with this; ValueError/TypeError for a bad list (an empty one
    included, as freeze() says: a run without a freeze is fsFreezeEnabled false)."""
    if mount_points is not None:
        return mounts.plan(limits.check_paths(mount_points))
    skip = checked.host.mounts_to_skip if checked.host else ()
    return mounts.discover(skip=skip)


def _snapshot(action: _Action, win: window.Window | None, cancel: signals.Cancel, nat: native.Native,
              timeout_s: float, rep: RunReport) -> BaseException | None:
    """Take the snapshot: None, a callable(window) or an argv.  Its failures become the report's
    snapshot state; returns a BaseException to re-raise once the post-scripts have run."""
    if action is None:
        rep.snapshot, rep.snapshot_detail = "taken", "no snapshot action: the window only froze and thawed"
        return None
    if callable(action):
        try:
            with cancel.raising():  # a signal interrupts the caller's action like a script's
                action(win)
        except signals.Interrupted as e:
            rep.snapshot, rep.snapshot_detail = "failed", f"interrupted by {e.name} in the snapshot action"
        except KeyboardInterrupt:
            rep.snapshot, rep.snapshot_detail = "failed", "interrupted: KeyboardInterrupt in the snapshot action"
            rep.interrupted = rep.interrupted or "SIGINT"
        except Exception as e:  # noqa: BLE001 - the caller's action failing is an outcome, not a crash
            rep.snapshot, rep.snapshot_detail = "failed", f"{type(e).__name__}: {e}"
        except BaseException as e:  # noqa: BLE001 - SystemExit, CancelledError…: resume the application first
            rep.snapshot, rep.snapshot_detail = "failed", f"{type(e).__name__} in the snapshot action"
            return e
        else:
            rep.snapshot = "taken"
        return None
    deadline = win.deadline_ns if win is not None else nat.now_ns() + native.ns_from_s(timeout_s)
    res = rep.snapshot_run = scripts.run_command(action, deadline, cancel.fd,
                                                 on_stop=win.thaw_now if win is not None else None, nat=nat)
    rep.snapshot, rep.snapshot_detail = ("taken", "") if res.ok else ("failed", res.detail)
    if res.timed_out and win is not None:
        # The command's deadline is the window's bound: whichever of its on_stop thaw and the guardian
        # came first, the window outlived its bound (122), as when the guardian alone thaws it.
        raise window.Timeout(f"the snapshot command was still running at the {win.timeout_s:g}s bound: it was "
                             "killed and the filesystems thawed", win)
    return None


def run(host_path: str = config.HOST_CONFIG_PATH, mount_points: Iterable[limits.Path] | None = None,
        snapshot: Snapshot = None, freeze_timeout: float = limits.DEFAULT_RUN_FREEZE_TIMEOUT, expedite: bool = True, presync: bool = True,
        nat: native.Native | None = None, progress: Callable[[str], object] = lambda msg: None,
        lock_wait: float = limits.DEFAULT_LOCK_WAIT, cancel: signals.Cancel | None = None,
        gate: Callable[[bool], str | None] | None = None, hold: bool = False) -> RunReport:
    """The whole flow.  Raises ValueError/TypeError for a bad argument (freeze_timeout, snapshot
    command, mount list) before anything runs; every other problem becomes the report's code.

    Every plugin whose pre-script started gets its post-script, exactly once, whatever happens
    after: a failed snapshot or freeze, an exception, SIGINT/SIGTERM/SIGHUP (recorded in
    `interrupted`; in the main thread they cancel what runs instead of interrupting Python).
    An exception that is not an outcome is re-raised once the post-scripts have run.

    gate (a group run's host): called once the pre-phase is over and before the freeze, with whether
    everything so far went well; a string it returns is why the run does not freeze (as a failure).
    hold (a group run's host too): this process's death inside the window does not thaw before the bound."""
    nat = nat or native.default()
    freeze_timeout = limits.check_timeout(freeze_timeout, "freeze_timeout")
    lock_wait = limits.check_timeout(lock_wait, "lock_wait", zero_ok=True)
    if mount_points is not None:
        mount_points = limits.check_paths(mount_points)
    action: _Action = snapshot if snapshot is None or callable(snapshot) else scripts.resolve_command(snapshot)
    say = _quiet(progress)
    operators = scripts.shell_operators(action) if isinstance(action, list) else []
    reraise: BaseException | None = None
    with contextlib.ExitStack() as stack:
        if cancel is None:
            cancel = stack.enter_context(signals.Cancel())
        rep = RunReport()
        t = nat.now_ns()
        say("check: host config, plugin configs, scripts")
        checked = check(host_path)
        stack.callback(checked.close)
        rep.phases_ns["check"] = nat.now_ns() - t
        rep.check_errors = list(checked.errors)
        rep.warnings = list(checked.warnings)
        if operators:
            rep.warnings.append(f"the snapshot command has {' '.join(operators)} as arguments: no shell runs it "
                                "(use sh -c '…' for a shell command line)")
        do_freeze = checked.fs_freeze if checked.plugins else True
        held: locks.Held | None = None
        try:
            plan = plan_mounts(checked, mount_points)
            rep.mounts = [m.mount_point for m in plan]
            if do_freeze and plan:
                # Before any pre-script: a run must not quiesce what it then cannot freeze.
                say(f"lock: {len(plan)} filesystem(s)")
                held = stack.enter_context(locks.hold(None, lock_wait, planned=plan, cancel_fd=cancel.fd))
        except errors.FreezeError as e:
            rep.check_errors.append(e)
            rep.snapshot, rep.snapshot_detail = "failed", e.describe()
            return _finish(rep, checked, cancel)
        pre_started = False
        try:
            go_on = not cancel.cancelled
            if checked.errors and not checked.dobackup:
                # As the extension's handle.py: a check problem with continueBackupOnFailure false
                # means no snapshot at all.
                go_on = False
                rep.snapshot_detail = "not taken: the check failed and continueBackupOnFailure is false"
            if go_on and not checked.errors and checked.plugins:
                say(f"pre-scripts: {len(checked.plugins)} plugin(s) in parallel")
                t = nat.now_ns()
                pre_started = True
                rep.pre = run_phase(checked, "pre", nat, cancel_fd=cancel.fd,
                                    filesystems=len(plan) if do_freeze else 0)
                rep.phases_ns["pre"] = nat.now_ns() - t
                failed = [r for r in rep.pre if not r.ok]
                if failed:
                    go_on = all(r.continue_backup for r in failed) and checked.fs_freeze
            if gate is not None and not cancel.cancelled:
                ok = go_on and not checked.errors and all(r.ok for r in rep.pre)
                why = gate(ok)
                if why is not None:
                    go_on = False
                    rep.snapshot, rep.snapshot_detail = "failed", why
            if cancel.cancelled:
                rep.snapshot, rep.snapshot_detail = "failed", "interrupted before the snapshot"
            elif go_on:
                t = nat.now_ns()
                reraise = _window(rep, held, action, freeze_timeout, expedite, presync, nat, cancel, say, hold)
                rep.phases_ns["freeze+snapshot"] = nat.now_ns() - t
        except BaseException as e:  # noqa: BLE001 - the post-scripts first, then it goes on up
            reraise = e
            if rep.snapshot != "taken":
                rep.snapshot, rep.snapshot_detail = "failed", f"{type(e).__name__}: {e}"
        finally:
            if pre_started:  # resume the application, even when signalled (a second signal included)
                say("post-scripts")
                t = nat.now_ns()
                rep.post = run_phase(checked, "post", nat, {"PYEXEC_SNAPSHOT": rep.snapshot})
                rep.phases_ns["post"] = nat.now_ns() - t
        _finish(rep, checked, cancel)
    if reraise is not None:
        raise reraise
    return rep


def _quiet(progress: Callable[[str], object]) -> Callable[[str], None]:
    """progress that cannot fail: a closed stderr or a caller's bug must not cost a post-script."""
    def say(msg: str) -> None:
        try:
            progress(msg)
        except Exception:  # noqa: BLE001, S110 - progress is best effort, the post-scripts are not
            pass
    return say


def _window(rep: RunReport, held: locks.Held | None, snapshot: _Action, timeout: float, expedite: bool,
            presync: bool, nat: native.Native, cancel: signals.Cancel,
            progress: Callable[[str], None], hold: bool = False) -> BaseException | None:
    """Freeze (if held says what), take the snapshot, thaw; the outcome goes into rep.  Returns a
    BaseException of the snapshot action to re-raise after the post-scripts."""
    if held is None:
        progress("snapshot without freeze (fsFreezeEnabled is false, or nothing to freeze)")
        return _snapshot(snapshot, None, cancel, nat, timeout, rep)
    progress(f"freeze: {len(held.mounts)} filesystem(s), snapshot, thaw")
    reraise = None
    try:
        with window.freeze(held, timeout=timeout, expedite=expedite, presync=presync, backend=nat, hold=hold) as win:
            rep.window = win
            if win.page == "memory":
                rep.warnings.append(f"the run directory {journal.RUN_DIR} is not on tmpfs: the journal page was kept "
                                    "in memory, so a kill of both pyexec and its guardian inside the window leaves "
                                    "recover to thaw every filesystem of the run (docs/architecture.md, journal)")
            reraise = _snapshot(snapshot, win, cancel, nat, timeout, rep)
    except errors.FreezeError as e:
        if isinstance(e, window.Timeout):
            rep.window = e.window
        rep.check_errors.append(e)
        # Frozen past the bound (122), never frozen, or thawed early: the snapshot is not consistent.
        rep.snapshot, rep.snapshot_detail = "failed", e.describe()
    return reraise


def _finish(rep: RunReport, checked: CheckResult, cancel: signals.Cancel) -> RunReport:
    """The reported code (the first problem's) and the outcome: app-consistent only when plugins
    quiesced the application and every step succeeded."""
    rep.interrupted = cancel.name or rep.interrupted
    codes = [checked.code] + [r.error_code for r in rep.pre] + [r.error_code for r in rep.post]
    codes += [e.code for e in rep.check_errors if isinstance(e, errors.FreezeError)]
    rep.code = next((c for c in codes if c), 0)
    if rep.snapshot != "taken":
        rep.outcome = FAILED
    elif rep.code == 0 and rep.pre:
        rep.outcome = APP
    elif rep.code == 0:  # no plugin quiesced anything: the freeze alone makes it file-system consistent
        rep.outcome = FS
        rep.warnings.append("no plugin is configured: nothing was quiesced, the snapshot is file-system consistent")
    else:
        rep.outcome = FS
    return rep
