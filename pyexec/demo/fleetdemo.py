"""`pyexec demo --hosts N [--compare]`: one consistent snapshot of many hosts, shown on a bank.

N simulated hosts (network namespaces), each running a bank branch on its own loop mount and a
`pyexec agent`; one etcd member; `pyexec group run` on a coordinator node takes each round's group
snapshot under load (every branch quiesced, every disk frozen, each image reflinked by its host's
snapshot command).  Every host's snapshot is restored and the bank's invariant checked: the total is
the opening total and every transfer is in both ledgers or in neither.  --compare also copies each
host's image one after the other at the same moment, nothing quiesced or frozen, and checks those
too: the invariant breaks there.  Everything is removed afterwards, on error or Ctrl-C too."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Any

from pyexec.demo import bankcheck, fleetsite, loopfs
from pyexec.demo.etcdserver import EtcdError
from pyexec.demo.netlab import NetLabError
from pyexec.demo.output import emit, last_line, say, write_report

LOAD_S = 1.5  # the bank runs this long before each round, so every round cuts through live traffic


def main(args: argparse.Namespace) -> int:
    """Run the fleet demo; exit 0 only when every group run is consistent and every consistent cut
    keeps the invariant (2: not root).  Output as `pyexec demo`'s: progress on stderr, results on
    stdout, or with --json the report alone on stdout."""
    out = sys.stderr if args.json else sys.stdout
    if os.geteuid() != 0:
        print("pyexec demo: needs root (network namespaces, loop devices, mount, FIFREEZE)", file=sys.stderr)
        emit(args.json, {"hosts": args.hosts, "rounds": [], "ok": False, "error": "needs root"})
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    site = fleetsite.FleetSite(args.hosts, args.dir)
    rounds: list[dict[str, Any]] = []
    ok, error = True, None
    try:
        site.build()
        for rnd in range(1, args.rounds + 1):
            time.sleep(LOAD_S)
            r = one_round(site, rnd, args.compare, out)
            rounds.append(r)
            ok = ok and r["ok"]
        _totals(rounds, args.compare, out)
    except KeyboardInterrupt:
        print("demo: interrupted: cleaning up", file=sys.stderr)
        ok, error = False, "interrupted"
    except (loopfs.LoopFSError, NetLabError, EtcdError, RuntimeError, OSError) as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        ok, error = False, f"failed: {e}"
    finally:
        doc: dict[str, Any] = {"hosts": args.hosts, "lab": site.tag, "sandbox": site.dir, "rounds": rounds, "ok": ok,
                               **({"error": error} if error else {})}
        where: list[str] = []  # the sandbox goes whole: --report PATH keeps the report
        # A second Ctrl-C must not cut the cleanup short: it would leave namespaces and mounts behind.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        say("cleaning up: agents, branches, etcd, namespaces, mounts, loop devices (Ctrl-C waits for it)")
        try:
            site.close()
        except BaseException as e:  # noqa: BLE001 - reported; the demo's verdict is already made
            print(f"demo: cleanup failed: {e!r}", file=sys.stderr)
            doc["ok"] = ok = False
            doc["cleanup_error"] = repr(e)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    if args.report:
        write_report(args.report, doc)
        where.append(args.report)
    emit(args.json, doc)
    result = (f"{args.rounds} group snapshot(s) of {args.hosts} hosts consistent, invariant held in every restore"
              if ok else "NOT verified (see above)")
    last_line(out, result, where)
    return 0 if ok else 1


def one_round(site: fleetsite.FleetSite, rnd: int, compare: bool, out: Any) -> dict[str, Any]:
    """One group run, its restore and check; with compare, the uncoordinated copies too."""
    before = site.stats()
    say(f"round {rnd}: pyexec group run (every branch quiesced → every disk frozen → each image reflinked → "
        "thaw → resume)")
    t0 = time.monotonic()
    status, record, stderr = site.group_run()
    seconds = time.monotonic() - t0
    res: dict[str, Any] = {"round": rnd, "group_exit": status, "group_seconds": round(seconds, 3), "group": record}
    outcome = record.get("outcome") if record else None
    images = _group_images(site, record) if record is not None and outcome == "consistent" else None
    if record is None or outcome != "consistent" or images is None:
        why = "no record" if record is None else f"outcome {outcome}" if outcome != "consistent" else \
            "a host's snapshot id is not its image"
        print(f"round {rnd}: group run NOT consistent ({why}, exit {status})", file=out)
        tail = stderr.strip().splitlines()[-5:]
        if tail:
            print("  " + "\n  ".join(tail), file=out)
        res["ok"] = False
    else:
        say(f"round {rnd}: restoring the {len(images)} group snapshots and checking the ledgers")
        res["check"] = verdict = _check(site, images, f"round{rnd}-group")
        print(f"round {rnd}: group run {record.get('run')} consistent ({seconds:.2f} s); restored: "
              f"{bankcheck.summary(verdict)}", file=out)
        res["ok"] = bool(verdict["invariant_holds"]) and status == 0
        line = _windows(record)
        if line:
            print(f"  {line}", file=out)
    if compare:
        say(f"round {rnd}: uncoordinated copies: each host's image reflinked one after the other, nothing quiesced")
        imgs, spread = site.uncoordinated(f"round{rnd}-uncoordinated")
        v = _check(site, imgs, f"round{rnd}-uncoordinated")
        res["uncoordinated"] = {"seconds_first_to_last": round(spread, 4), "check": v}
        print(f"round {rnd}: uncoordinated copies ({spread * 1000:.0f} ms first to last); restored: "
              f"{bankcheck.summary(v)}", file=out)
    after = site.stats()
    res["transfers_during_round"] = sum(a["sent"] for a in after.values()) - sum(b["sent"] for b in before.values())
    # The post-scripts resumed every branch: each is open and keeps sending.
    res["resumed"] = all(a["open"] for a in after.values())
    res["ok"] = res["ok"] and res["resumed"]
    return res


def _group_images(site: fleetsite.FleetSite, record: dict[str, Any]) -> dict[str, str] | None:
    """Each host's snapshot image as its snapshot command printed it; None unless every host has one
    in the site's snapshot directory."""
    hosts = record.get("hosts")
    if not isinstance(hosts, dict):
        return None
    images = {}
    for name in site.hosts:
        rec = hosts.get(name) or {}
        # The agent's record keeps the command's output as snapshot_id ("snapshot" is its state).
        snap = rec.get("snapshot_id", rec.get("snapshot"))
        if not isinstance(snap, str):
            return None
        snap = snap.strip()
        if os.path.dirname(snap) != site.snaps or not os.path.isfile(snap):
            return None
        images[name] = snap
    return images


def _windows(record: dict[str, Any]) -> str:
    """Each host's freeze window, and how far apart the hosts began to freeze and were frozen, from the
    group record ("" if the record lacks them)."""
    hosts = record.get("hosts") or {}
    windows = {h: r.get("window_ms") for h, r in sorted(hosts.items()) if isinstance(r, dict)}
    if not windows or not all(isinstance(w, (int, float)) for w in windows.values()):
        return ""
    text = "freeze windows: " + ", ".join(f"{h} {w:.1f} ms" for h, w in windows.items())
    # Every simulated host reads the one CLOCK_MONOTONIC of this machine: their stamps compare.
    for stamp, what in (("first_freeze", "FIFREEZE started"), ("frozen", "frozen")):
        at = [r.get("stamps_ns", {}).get(stamp) for r in hosts.values() if isinstance(r, dict)]
        if at and all(isinstance(t, int) and t > 0 for t in at):
            text += f"; {what} on every host within {(max(at) - min(at)) / 1e6:.2f} ms"
    return text


def _check(site: fleetsite.FleetSite, images: dict[str, str], tag: str) -> dict[str, Any]:
    """Restore the images, check the invariant, delete the images."""
    try:
        return bankcheck.check(bankcheck.restore(images, os.path.join(site.outer.mountpoint, "restore", tag),
                                                 fleetsite.DB))
    finally:
        for img in images.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(img)


def _totals(rounds: list[dict[str, Any]], compare: bool, out: Any) -> None:
    checked = [r["check"] for r in rounds if "check" in r]
    print(f"group snapshots: {sum(1 for r in rounds if r['ok'])}/{len(rounds)} consistent with the invariant held "
          f"(half-done transfers: {sum(v['half_done'] for v in checked)}, total off: "
          f"{sum(abs(v['total_off']) for v in checked)})", file=out)
    if compare:
        unc = [r["uncoordinated"]["check"] for r in rounds]
        print(f"uncoordinated copies: invariant broken in {sum(not v['invariant_holds'] for v in unc)}/{len(unc)} "
              f"(half-done transfers: {sum(v['half_done'] for v in unc)}, total off by "
              f"{', '.join(format(v['total_off'], '+d') for v in unc)})", file=out)
