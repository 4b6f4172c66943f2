"""The `pyexec` command.  Argument handling and printing only (the Azure drop-ins' commands,
`pluginhost` and `safefreeze`, are in pyexec.azure.cli)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

import orjson

from pyexec import __version__, config, errors, journal, kernel, limits
from pyexec.fleet import protocol

MOUNT_HELP = ("mount point to freeze (repeatable); without it every local filesystem that discovery "
              "finds is frozen, as the reference does")


def config_arg(p: argparse.ArgumentParser) -> None:
    # A relative path names a file in the working directory, as every command-line tool reads it.
    p.add_argument("--config", default=config.HOST_CONFIG_PATH, type=os.path.abspath,
                   help="host config (VMSnapshotPluginHost.conf)")


def version_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def print_problems(errs: Iterable[errors.PyexecError], out: TextIO = sys.stdout) -> None:
    """Each error as its code, name, file, problem and recommended action."""
    for e in errs:
        d = e.as_dict()
        print(f"{d['code']}  {d['name']}\n     file:    {d['file'] or '-'}"
              + (f" (key {d['key']})" if d["key"] else "")
              + f"\n     problem: {d['detail'] or d['message']}\n     action:  {d['action']}", file=out)


def cmd_check(args: argparse.Namespace) -> int:
    from pyexec import host
    res = host.check(args.config)
    try:
        try:
            would_freeze = [m.mount_point for m in host.plan_mounts(res, args.mount)]
        except (OSError, errors.PyexecError) as e:
            res.errors.append(e if isinstance(e, errors.PyexecError) else errors.FreezeError(123, str(e)))
            would_freeze = []
        if args.json:
            doc = {"ok": not res.errors, "code": res.code, "problems": [e.as_dict() for e in res.errors],
                   "kernel": kernel.kernel_paths(),
                   "warnings": res.warnings, "would_freeze": would_freeze,
                   "plugins": [p.entry.name for p in res.plugins]}
            sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        else:
            if res.errors:
                print(f"{len(res.errors)} problem(s):")
                print_problems(res.errors)
            else:
                print(f"ok: host config and {len(res.plugins)} plugin(s) are valid and trusted")
            for w in res.warnings:
                print(f"warning: {w}")
            print("would freeze (in order): " + (", ".join(would_freeze) or "nothing"))
            _print_kernel()
    finally:
        res.close()
    return 0 if not res.errors else errors.TABLE[res.code].exit_status


def cmd_run(args: argparse.Namespace) -> int:
    from pyexec import host, report, signals
    # Progress goes to stderr only (never to stdout, even with stderr closed: print(file=None) would).
    progress = (lambda m: None) if args.quiet or sys.stderr is None else (
        lambda m: print(f"pyexec: {m}", file=sys.stderr, flush=True))
    # The scope covers the report too: a signal while it prints does not cut it short.
    with signals.Cancel() as cancel:
        try:
            rep = host.run(args.config, mount_points=args.mount or None, snapshot=args.snapshot_cmd,
                           freeze_timeout=args.freeze_timeout, expedite=not args.no_expedite,
                           presync=not args.no_presync, progress=progress, lock_wait=args.lock_wait,
                           cancel=cancel)
        except (ValueError, TypeError) as e:
            raise errors.PyexecError(11, str(e)) from e
        try:
            if args.json:
                sys.stdout.buffer.write(report.dumps(rep) + b"\n")
            else:
                print(report.summary(rep))
            sys.stdout.flush()
        except (OSError, AttributeError, ValueError):  # stdout closed or full: the run itself is done
            pass
    if rep.interrupted:
        return 128 + signal.Signals[rep.interrupted].value
    return {host.APP: 0, host.FS: 1}.get(rep.outcome, 2)


def _print_kernel() -> None:
    print("kernel paths:")
    for job, path in kernel.kernel_paths().items():
        print(f"  {job + ':':<16} {path}")


def cmd_status(args: argparse.Namespace) -> int:
    found = journal.journals()
    _print_kernel()
    if not found:
        print("pyexec holds nothing frozen")
        return 0
    for _, doc, running in found:
        mounts = ", ".join(f"{p} {st}" for p, st in zip(doc["paths"], doc["states"]))
        print(f"pid {doc['pid']} ({'running' if running else 'dead'}): {mounts}")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    thawed, alive, rcu = journal.recover()
    for pid in alive:
        print(f"pid {pid} is still running: left alone")
    for p in thawed:
        print(f"thawed {p} (left frozen by a dead run)")
    if rcu:
        print(f"put {journal.RCU_EXPEDITED} back to 0 (left at 1 by a dead run)")
    for _, doc, running in journal.journals():  # what recover kept: a mount no longer at its path
        for p, st in zip(doc.get("paths", []), doc["states"]):
            if not running and st in ("frozen", "freezing"):
                print(f"left frozen: {p} is no longer the filesystem the dead run froze (its mount is hidden "
                      "or moved); a later recover thaws it once it is back at that path")
    print(f"recover: {len(thawed)} filesystem(s) thawed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.dir is not None and not os.path.isdir(args.dir):
        raise errors.PyexecError(11, f"--dir {args.dir}: not an existing directory (the sandbox is made inside it)")
    from pyexec.demo import run
    return run.main(args)


def cmd_agent(args: argparse.Namespace) -> int:
    from pyexec.fleet import agent
    return agent.main(args.config, lambda m: print(f"pyexec agent: {m}", file=sys.stderr, flush=True))


def cmd_group_run(args: argparse.Namespace) -> int:
    from pyexec.fleet import coordinator
    try:
        o = coordinator.options(args.etcd, args.hosts, args.cut_cmd, args.quiesce_timeout, args.freeze_timeout,
                                args.cacert, args.cert, args.key, args.prefix or protocol.PREFIX, args.run_id,
                                user=args.user, password_file=args.password_file)
    except (ValueError, TypeError) as e:
        raise errors.PyexecError(11, str(e)) from e
    from pyexec import signals
    say = (lambda m: None) if args.quiet or sys.stderr is None else (
        lambda m: print(f"pyexec group: {m}", file=sys.stderr, flush=True))
    with signals.Cancel() as cancel:
        try:
            rec = coordinator.group_run(o, say, cancel)
        except coordinator.RunIdTaken as e:
            raise errors.PyexecError(11, str(e)) from e
        try:
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(rec, option=orjson.OPT_INDENT_2) + b"\n")
            else:
                print(_group_summary(rec))
            sys.stdout.flush()
        except (OSError, AttributeError, ValueError):
            pass
    if rec["outcome"] == coordinator.CONSISTENT:
        return 0
    if rec.get("interrupted") not in (None, "cancelled"):  # as `pyexec run`: every host thawed and resumed first
        return 128 + signal.Signals[rec["interrupted"]].value
    return errors.TABLE[rec["code"]].exit_status if rec.get("code") else errors.TABLE[324].exit_status


def cmd_group_show(args: argparse.Namespace) -> int:
    from pyexec.fleet import coordinator, etcd
    try:
        o = coordinator.options(args.etcd, args.hosts, None, cacert=args.cacert, cert=args.cert, key=args.key,
                                prefix=args.prefix or protocol.PREFIX, run_id=args.run_id, user=args.user,
                                password_file=args.password_file)
    except (ValueError, TypeError) as e:
        raise errors.PyexecError(11, str(e)) from e
    try:
        rec = coordinator.show(o)
    except etcd.Unreachable as e:
        raise errors.PyexecError(322, str(e)) from e
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(rec, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(_group_summary(rec))
    return 0 if rec["outcome"] == coordinator.CONSISTENT else errors.TABLE[324].exit_status


def _group_summary(rec: dict[str, object]) -> str:
    lines = [f"group run {rec['run']}: {rec['outcome']}" + (f" ({rec['reason']})" if rec.get("reason") else "")]
    hosts = rec.get("hosts")
    if isinstance(hosts, dict):
        for h, r in hosts.items():
            if isinstance(r, dict):
                win = r.get("window_ms")
                lines.append(f"  {h:<16} {r.get('decision', '?'):<10} {r.get('outcome', '?'):<24} "
                             + (f"window {win:.1f} ms " if isinstance(win, (int, float)) else "")
                             + (f"snapshot {r['snapshot_id']}" if r.get("snapshot_id") else ""))
    c = rec.get("coordinator")
    if isinstance(c, dict) and isinstance(c.get("overlap"), dict):
        ov = c["overlap"]
        lines.append(f"  overlap {'proven' if ov.get('proven') else 'NOT proven'}: commit applied within "
                     f"{ov.get('commit_applied_before_ms')} ms of the go; no host could thaw before "
                     f"{ov.get('earliest_host_thaw_after_ms')} ms")
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return n


EPILOG = """\
With --json, stdout is one JSON document and nothing else; progress goes to stderr.

exit status:
  0      run: app-consistent; check: no problem; demo: verified; status, recover
  1      run: file-system-consistent (the snapshot was taken, but a script or the check
         failed); demo: not verified
  2      run: failed, no snapshot; a usage error (11 InvalidParameter), a config, trust or script
         problem found by check; demo: not root, or a database server or driver is missing
  3      check: a mount cannot be frozen or opened (121 FsFreezeFailed, 123 UnableToOpenMount)
  4      group run: no consistent cut (324 GroupAborted, 322 EtcdUnreachable,
         323 GroupHostNotRegistered); every host thawed and resumed
  128+N  run: cut short by signal N (130: SIGINT), after the post-scripts ran
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyexec", description="Application-consistent snapshots with a minimal freeze window.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    version_arg(ap)
    sub = ap.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND")
    c = sub.add_parser("check", help="validate the configs and scripts, show the freeze order; run nothing")
    config_arg(c)
    c.add_argument("--mount", action="append", help="mount point to check the freeze order of (repeatable)")
    c.add_argument("--json", action="store_true", help="one JSON document on stdout")
    c.set_defaults(fn=cmd_check)
    r = sub.add_parser("run", help="check, pre-scripts, freeze + snapshot + thaw, post-scripts: the outcome")
    config_arg(r)
    r.add_argument("--mount", action="append", help=MOUNT_HELP)
    r.add_argument("--snapshot-cmd", help="command run inside the freeze window (shell quoting rules; a bare "
                   "name is looked up on PATH; killed with its process tree at the freeze bound)")
    r.add_argument("--freeze-timeout", default=limits.DEFAULT_RUN_FREEZE_TIMEOUT, help="bound of the freeze window, seconds in (0, 86400]")
    r.add_argument("--lock-wait", default=0.0,
                   help="seconds to wait for another run holding one of the filesystems (default 0)")
    r.add_argument("--no-expedite", action="store_true", help="do not set rcu_expedited around FIFREEZE")
    r.add_argument("--no-presync", action="store_true", help="do not syncfs before the window")
    r.add_argument("--json", action="store_true", help="the report as one JSON document on stdout")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")
    r.set_defaults(fn=cmd_run)
    sub.add_parser("status", help="what pyexec runs hold frozen now, and the kernel paths in use").set_defaults(fn=cmd_status)
    sub.add_parser("recover", help="thaw what a crashed run left frozen (a live run's are left alone)").set_defaults(fn=cmd_recover)
    a = sub.add_parser("agent", help="the service on every host of group runs (pyexec[fleet]; docs/fleet.md)")
    a.add_argument("--config", default=protocol.AGENT_CONFIG_PATH, type=os.path.abspath,
                   help=f"the agent config (default {protocol.AGENT_CONFIG_PATH})")
    a.set_defaults(fn=cmd_agent)
    g = sub.add_parser("group", help="one consistent snapshot of many hosts, through etcd (pyexec[fleet])")
    gsub = g.add_subparsers(dest="group_cmd", required=True, metavar="COMMAND")
    gr = gsub.add_parser("run", help="coordinate one group run: every host quiesced, then frozen at once")
    gr.add_argument("--etcd", required=True, help="etcd endpoints: URLs, comma-separated")
    gr.add_argument("--hosts", required=True, help="the hosts, comma-separated (each runs `pyexec agent`)")
    gr.add_argument("--cut-cmd", help="command run once here while every host is frozen (shell quoting rules)")
    gr.add_argument("--quiesce-timeout", default=protocol.DEFAULT_QUIESCE_S, help="seconds to wait for every host to be quiesced")
    gr.add_argument("--freeze-timeout", default=protocol.DEFAULT_FREEZE_S, help="each host's freeze bound, seconds (a host's own "
                    "config may make it shorter)")
    gr.add_argument("--cacert", help="CA file of the etcd members' certificates")
    gr.add_argument("--cert", help="this client's certificate (with --key)")
    gr.add_argument("--key", help="this client's key")
    gr.add_argument("--user", help="etcd user (with etcd's auth on; docs/fleet.md, roles)")
    gr.add_argument("--password-file", help="file holding the etcd user's password")
    gr.add_argument("--prefix", help="etcd key prefix (default /pyexec/)")
    gr.add_argument("--run-id", help="the run's id (default: time and random)")
    gr.add_argument("--json", action="store_true", help="the record as one JSON document on stdout")
    gr.add_argument("--quiet", action="store_true", help="no progress on stderr")
    gr.set_defaults(fn=cmd_group_run)
    gs = gsub.add_parser("show", help="a group run as etcd keeps it (its record, or what its keys say)")
    gs.add_argument("--etcd", required=True, help="etcd endpoints: URLs, comma-separated")
    gs.add_argument("--hosts", required=True, help="the run's hosts, comma-separated")
    gs.add_argument("--run-id", required=True, help="the run's id")
    for opt in ("--cacert", "--cert", "--key", "--prefix", "--user", "--password-file"):
        gs.add_argument(opt)
    gs.add_argument("--json", action="store_true", help="one JSON document on stdout")
    gs.set_defaults(fn=cmd_group_show)
    d = sub.add_parser("demo", help="snapshot a live database (SQLite, PostgreSQL or MariaDB) on loop mounts, "
                       "restore and verify it (root)")
    d.add_argument("--db", choices=("sqlite", "postgresql", "mariadb"), default="sqlite",
                   help="the application: SQLite (default), or a PostgreSQL / MariaDB server under load quiesced "
                        "by pyexec's built-in quiescer and restored on a second server")
    d.add_argument("--hosts", type=_positive, default=None, metavar="N",
                   help="N simulated hosts (network namespaces) moving money between their SQLite ledgers, "
                        "snapshotted together by `pyexec group run` through etcd, restored and checked")
    d.add_argument("--compare", action="store_true",
                   help="--db postgresql|mariadb: each round twice, quiesced and not, side by side; --hosts: also "
                        "uncoordinated per-host copies at the same moments")
    d.add_argument("--rounds", type=_positive, default=None, help="rounds (default 1; 3 with --hosts)")
    d.add_argument("--keep", action="store_true", help="leave the sandbox for inspection")
    d.add_argument("--json", action="store_true", help="the report on stdout, alone (progress on stderr)")
    d.add_argument("--no-quiesce", action="store_true", help="run without the pre-script, to compare")
    d.add_argument("--dir", default=None, help="where to build the sandbox (default: a new temp dir)")
    d.add_argument("--report", default=None, type=os.path.abspath, metavar="PATH",
                   help="also write the JSON report to PATH (the sandbox's copy goes with it unless --keep)")
    d.set_defaults(fn=cmd_demo, usage_error=d.error)  # exits 2 with the demo's usage
    return ap


def _demo_usage(args: argparse.Namespace) -> None:
    """The demo's combinations of options that make no demo: exits 2 with its usage."""
    if args.hosts is not None:
        if args.hosts < 2:
            args.usage_error("--hosts: at least 2 (a transfer goes from one host to another)")
        if args.db != "sqlite" or args.no_quiesce:
            args.usage_error("--hosts runs the bank on SQLite, quiesced: leave out --db and --no-quiesce")
        if args.keep:
            args.usage_error("--hosts removes every namespace, process and mount it made: leave out --keep "
                             "(--report PATH keeps the report)")
    elif args.compare and args.db == "sqlite":
        args.usage_error("--compare needs --db postgresql or --db mariadb, or --hosts N")
    if args.compare and args.no_quiesce:
        args.usage_error("--compare runs both modes: leave out --no-quiesce")
    if args.rounds is None:
        args.rounds = 3 if args.hosts else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`pyexec`."""
    args = build_parser().parse_args(argv)
    if args.cmd == "demo":
        _demo_usage(args)
    try:
        status: int = args.fn(args)
        return status
    except errors.PyexecError as e:
        print_problems([e], out=sys.stderr)
        if getattr(args, "json", False):  # --json: still exactly one document on stdout
            sys.stdout.buffer.write(orjson.dumps({"outcome": "failed", "code": e.code, "error": e.entry.name,
                                                  "problems": [e.as_dict()]}, option=orjson.OPT_INDENT_2) + b"\n")
        return e.entry.exit_status
    except KeyboardInterrupt:
        print("pyexec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
