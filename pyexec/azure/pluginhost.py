"""Drop-in for the reference `PluginHost` class: same attribute, methods, result shapes and codes,
over pyexec's check and script runner (event-driven, killing timed-out scripts, re-running retries)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from pyexec import config, errors, host, steps


class Logger(Protocol):
    """The reference's logger interface: what PluginHost calls on the logger it is given."""

    def log(self, msg: str, local: bool, level: str) -> None: ...


class PluginHostError:
    """One plugin's code in a phase (0 when its script succeeded)."""

    def __init__(self, errorCode: int, pluginName: str):
        self.errorCode = errorCode
        self.pluginName = pluginName

    def __str__(self) -> str:
        return f"Plugin :- {self.pluginName} ErrorCode :- {self.errorCode}"


class PluginHostResult:
    """A phase's outcome: one error entry per plugin, whether any failed, whether to go on."""

    def __init__(self) -> None:
        self.errors: list[PluginHostError] = []
        self.anyScriptFailed = False
        self.continueBackup = True
        self.errorCode = 0
        self.fileCode: list[int] = []  # the reference's fields, which its host leaves empty too
        self.filePath: list[str] = []
        self.scripts: list[steps.ScriptResult] = []  # pyexec's detail: tries, exit, output, duration

    def __str__(self) -> str:
        lines = [str(e) for e in self.errors]
        lines += [f"Final Error Code :- {self.errorCode}", f"Any script Failed :- {self.anyScriptFailed}",
                  f"Continue Backup :- {self.continueBackup}"]
        return "\n".join(lines) + "\n"


class _NullLogger:
    def log(self, msg: str, local: bool, level: str) -> None:
        pass


class PluginHost:
    """The reference plugin host's interface: pre_check(), pre_script(), post_script()."""

    def __init__(self, logger: Logger | None = None):
        self.logger: Logger = logger or _NullLogger()
        self.configLocation = config.HOST_CONFIG_PATH
        self.timeoutInSeconds = config.HOST_TIMEOUT_MAX
        self.pluginName: list[str] = []
        self.noOfPlugins = 0
        self.modulesLoaded = False
        self._checked: host.CheckResult | None = None

    def _log(self, msg: str, level: str = "Info") -> None:
        self.logger.log(msg, True, level)

    def pre_check(self) -> tuple[int, bool, bool]:
        """Check configs and scripts: (errorCode, dobackup, fsFreeze_on), as the reference returns them."""
        checked = self._check()
        # As the reference computes it; its caller skips the scripts when the code is not 0 and then
        # snapshots only if dobackup (a problem with continueBackupOnFailure false fails the backup).
        return checked.code, checked.dobackup, checked.fs_freeze

    def _check(self) -> host.CheckResult:
        self.close()
        self._log(f"config file: {self.configLocation}")
        checked = self._checked = host.check(self.configLocation)
        for e in checked.errors:
            self._log(e.describe(), "Error")
        if checked.host is not None:
            self.timeoutInSeconds = checked.host.timeout
        self.pluginName = [p.entry.name for p in checked.plugins]
        self.noOfPlugins = len(checked.plugins)
        self.modulesLoaded = not checked.errors and self.noOfPlugins > 0
        return checked

    def _phase(self, phase: str, env_extra: Mapping[str, str] | None = None) -> PluginHostResult:
        checked = self._checked if self._checked is not None else self._check()
        result = PluginHostResult()
        if not self.modulesLoaded:
            result.errorCode = checked.code
            return result
        self._log(f"Starting {phase}script for all modules.")
        # Only a quiescer's pre-phase asks how many filesystems the freeze takes: discovery is not
        # paid by the scripts-only hosts nor twice per backup.
        quiescing = phase == "pre" and any(p.quiescer for p in checked.plugins)
        result.scripts = host.run_phase(checked, phase, env_extra=env_extra,
                                        filesystems=self._filesystems(checked) if quiescing else 1)
        for r in result.scripts:
            result.errors.append(PluginHostError(r.error_code, r.plugin))
            if not r.ok:
                result.anyScriptFailed = True
                self._log(f"{phase}script of {r.plugin} failed: {r.detail}", "Error")
        result.continueBackup = all(r.continue_backup for r in result.scripts)
        result.errorCode = next((r.error_code for r in result.scripts if not r.ok), 0)
        self._log(f"Finished {phase}script execution from PluginHost side. Continue Backup: {result.continueBackup}")
        return result

    @staticmethod
    def _filesystems(checked: host.CheckResult) -> int:
        """How many filesystems the extension's freeze will take (all but mountsToSkip): a PostgreSQL
        quiescer needs a backup when they are several.  Unknown counts as several."""
        try:
            return len(host.plan_mounts(checked))
        except errors.PyexecError:
            return 2

    def refuse_split(self) -> None:
        """For a caller that runs each phase in a process of its own (the `pluginhost pre` and
        `pluginhost post` commands): PyexecError 319, before anything runs, if a built-in quiescer is
        configured.  Its session (MariaDB's read lock, PostgreSQL's backup) lives in this process:
        a `pre` that exits ends it before the freeze, and a `post` elsewhere has nothing to release.
        The extension itself calls both phases on one object in one process, which holds."""
        checked = self._checked if self._checked is not None else self._check()
        builtin = [p.entry for p in checked.plugins if p.entry.builtin is not None]
        if builtin:
            names = ", ".join(e.name for e in builtin)
            raise errors.PyexecError(
                319, f"plugin(s) {names} quiesce through a database session that cannot outlive this "
                     "process; refused rather than report a quiesce that ends before the freeze",
                builtin[0].config_path)

    def pre_script(self) -> PluginHostResult:
        """Run every plugin's pre-script in parallel."""
        return self._phase("pre")

    def post_script(self, snapshot: str = "unknown") -> PluginHostResult:
        """Run every plugin's post-script in parallel (they see PYEXEC_SNAPSHOT=snapshot; the reference's
        caller passes nothing, so they see `unknown`)."""
        return self._phase("post", {"PYEXEC_SNAPSHOT": snapshot})

    def close(self) -> None:
        """Release the checked script files."""
        if self._checked is not None:
            self._checked.close()
            self._checked = None
