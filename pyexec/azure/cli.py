"""The Azure drop-ins' commands: `pluginhost` (the reference host's verbs) and `safefreeze` (the
reference freeze helper).  Argument handling and printing only."""
from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import orjson

from pyexec import errors
from pyexec.cli import MOUNT_HELP, config_arg, main, print_problems, version_arg


def cmd_phase(args: argparse.Namespace) -> int:
    """`pluginhost pre|post`: one phase through the reference-shaped API (scripts only: 319 for a
    built-in quiescer, whose session would end with this process)."""
    from pyexec.azure import pluginhost
    ph = pluginhost.PluginHost(_StderrLogger() if not args.json else None)
    ph.configLocation = args.config
    try:
        code, dobackup, fs_freeze = ph.pre_check()
        ph.refuse_split()  # this process ends after one phase: no quiescer's session can span two
        res = ph.pre_script() if args.verb == "pre" else ph.post_script(args.snapshot)
    finally:
        ph.close()
    if args.json:
        doc = {"verb": args.verb, "checkErrorCode": code, "dobackup": dobackup, "fsFreeze_on": fs_freeze,
               "errorCode": res.errorCode, "anyScriptFailed": res.anyScriptFailed,
               "continueBackup": res.continueBackup,
               "errors": [{"errorCode": e.errorCode, "pluginName": e.pluginName} for e in res.errors],
               "scripts": [r.as_dict() for r in res.scripts]}
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(str(res), end="")
    if code and not res.scripts:
        return errors.TABLE[code].exit_status
    if not res.anyScriptFailed:
        return 0
    return 1 if res.continueBackup else 2


class _StderrLogger:
    """The reference's logger interface, printing to stderr."""

    def log(self, msg: str, local: bool = True, level: str = "Info") -> None:
        print(f"pluginhost: {level}: {msg}", file=sys.stderr)


def pluginhost_main(argv: Sequence[str] | None = None) -> int:
    """`pluginhost [--config PATH] {check,pre,post,run} [--json]`: the reference host's verbs."""
    ap = argparse.ArgumentParser(prog="pluginhost", description="The reference plugin host's verbs, over pyexec.")
    version_arg(ap)
    config_arg(ap)
    ap.add_argument("verb", choices=["check", "pre", "post", "run"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--snapshot", choices=["taken", "skipped", "failed", "unknown"], default="unknown",
                    help="post: what became of the snapshot (the post-scripts see PYEXEC_SNAPSHOT)")
    ap.add_argument("--mount", action="append", help="run: " + MOUNT_HELP)
    a = ap.parse_args(argv)
    if a.verb in ("pre", "post"):
        try:
            return cmd_phase(a)
        except errors.PyexecError as e:
            print_problems([e], out=sys.stderr)
            return e.entry.exit_status
    if a.mount and a.verb != "run":
        ap.error("--mount applies to run only")
    mounts = [arg for m in (a.mount or []) for arg in ("--mount", m)] if a.verb == "run" else []
    return main([a.verb, "--config", a.config, *mounts] + (["--json"] if a.json else []))


def safefreeze_main(argv: list[str] | None = None) -> int:
    """`safefreeze TIMEOUT_SECONDS MOUNT...`: the reference freeze helper, event-driven and guarded.

    Everything goes to stdout, as the reference prints it: its caller logs the helper's stdout."""
    from pyexec.azure import safefreeze
    # The caller's thaw request can cross our timeout: a SIGUSR1 after the window must not kill us,
    # the caller reads the exit status.  (While it waits, safefreeze.run takes SIGUSR1 as the thaw request.)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    argv = sys.argv[1:] if argv is None else argv
    try:
        timeout, paths = safefreeze.parse_args(argv)
    except ValueError as err:
        print(f"safefreeze: {err}\n{safefreeze.USAGE}")
        return safefreeze.EXIT_FAILED
    print(f"safefreeze: freezing {' '.join(paths)} for at most {timeout:g}s", flush=True)
    res = safefreeze.run(timeout, paths)
    for line in res.lines:
        print(line)
    if res.status != safefreeze.EXIT_THAWED:
        print(f"safefreeze: failed: {res.reason}")
    return res.status
