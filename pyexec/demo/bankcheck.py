"""The fleet demo's checker: restore every host's snapshot of one cut and check what only a
consistent cut keeps: the total over all ledgers is the opening total, and every transfer id is in
both ledgers (debited by its sender, credited by its receiver, same amount) or in neither.

A snapshot image is restored as a user would: cloned (reflink, the snapshot itself is never
written), loop-attached and mounted, so ext4 replays its journal if the cut left one to replay (an
uncoordinated copy of a live disk does), then the ledger is opened on the clone."""
from __future__ import annotations

import os
import sqlite3
from typing import Any

from pyexec.demo import loopfs
from pyexec.demo.sandbox import reflink

Ledger = dict[str, Any]  # one restored ledger: host, opening, balance, out/in {id: (peer, amount)}, integrity


def read_ledger(db: str) -> Ledger:
    """What one ledger file holds (opened where it is: on a clone, never on the snapshot)."""
    con = sqlite3.connect(db, timeout=30)
    try:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        (balance,) = con.execute("SELECT balance FROM account").fetchone()
        out: dict[str, tuple[str, int]] = {}
        inc: dict[str, tuple[str, int]] = {}
        for tid, d, peer, amount in con.execute("SELECT id, dir, peer, amount FROM transfers"):
            (out if d == "out" else inc)[tid] = (peer, amount)
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()
    return {"host": meta["host"], "opening": int(meta["opening"]), "balance": balance, "out": out, "in": inc,
            "integrity": integrity}


def restore(images: dict[str, str], workdir: str, db_name: str) -> dict[str, Ledger]:
    """Each host's snapshot image (host → image path) restored in workdir (on the same btrfs: the
    clone is a reflink) and its ledger read; every clone unmounted, detached and removed after."""
    os.makedirs(workdir, exist_ok=True)
    ledgers: dict[str, Ledger] = {}
    for host, image in sorted(images.items()):
        clone = os.path.join(workdir, f"restore-{host}.img")
        reflink(image, clone)
        fs = loopfs.LoopFS(clone, os.path.join(workdir, f"restore-{host}"), "ext4", create=False)
        try:
            ledgers[host] = read_ledger(os.path.join(fs.mountpoint, db_name))
        finally:
            fs.close()
    return ledgers


def check(ledgers: dict[str, Ledger]) -> dict[str, Any]:
    """The cut's verdict: totals, the half-done transfers (debited and not credited, credited and not
    debited), mismatched amounts, and whether the invariant holds."""
    opening = sum(led["opening"] for led in ledgers.values())
    total = sum(led["balance"] for led in ledgers.values())
    debits = {tid: (led["host"], peer, amount) for led in ledgers.values() for tid, (peer, amount) in led["out"].items()}
    credits = {tid: (peer, led["host"], amount) for led in ledgers.values() for tid, (peer, amount) in led["in"].items()}
    not_credited = sorted(debits.keys() - credits.keys())
    not_debited = sorted(credits.keys() - debits.keys())
    mismatched = sorted(t for t in debits.keys() & credits.keys() if debits[t] != credits[t])
    # What the half-done transfers alone put the total off by: the check that the ledgers add up.
    explained = sum(credits[t][2] for t in not_debited) - sum(debits[t][2] for t in not_credited)
    integrity_ok = all(led["integrity"] == "ok" for led in ledgers.values())
    holds = total == opening and not not_credited and not not_debited and not mismatched and integrity_ok
    return {
        "hosts": {h: {"balance": led["balance"], "debits": len(led["out"]), "credits": len(led["in"]),
                      "integrity": led["integrity"]} for h, led in sorted(ledgers.items())},
        "opening_total": opening, "total": total, "total_off": total - opening,
        "transfers": len(debits.keys() | credits.keys()), "complete": len(debits.keys() & credits.keys()),
        "half_done": len(not_credited) + len(not_debited),
        "debited_not_credited": len(not_credited), "credited_not_debited": len(not_debited),
        "mismatched": len(mismatched), "half_done_explain_total": explained == total - opening,
        "examples": (not_credited + not_debited)[:3],
        "invariant_holds": holds,
    }


def summary(verdict: dict[str, Any]) -> str:
    """One line: the invariant's verdict and, when broken, by how much."""
    head = (f"total {verdict['total']} (opening {verdict['opening_total']}, off by {verdict['total_off']:+d}), "
            f"{verdict['transfers']} transfers, {verdict['half_done']} half-done "
            f"({verdict['debited_not_credited']} debited not credited, {verdict['credited_not_debited']} credited "
            f"not debited)")
    return head + (" → invariant HOLDS" if verdict["invariant_holds"] else " → invariant BROKEN")
