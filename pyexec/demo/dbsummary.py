"""The database demo's output: a round's summary lines, and the quiesced and unquiesced rounds side by
side (--compare)."""
from __future__ import annotations

from typing import Any


def _kib(n: int | None) -> str:
    if n is None:
        return "none"
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def round_summary(d: dict[str, Any]) -> str:
    """A round of the report as the lines the demo prints."""
    rep = d["report"]
    lines = [f"round {d['round']} ({d['mode']}): outcome {rep['outcome']}"
             + (f", freeze window {rep['window']['length_ns'] / 1e6:.1f} ms" if rep.get("window") else "")]
    for ph in ("pre", "post"):
        for s in rep.get(ph) or []:
            facts = ", ".join(f"{k}={v}" for k, v in s.get("facts", {}).items())
            lines.append(f"  {ph} {s['plugin']}: {'ok' if s['error_code'] == 0 else 'error ' + str(s['error_code'])}"
                         f" in {s['duration_ns'] / 1e6:.1f} ms" + (f"; {facts}" if facts else ""))
    ld = d["load"]
    lines.append(f"  load: {ld['kind']}: {ld['transactions']} transactions, {ld['tps']} tps; "
                 f"{ld['in_flight_across_window']} open across the window (client view)")
    rs = d.get("restore", {})
    if "startup" in rs:
        s = rs["startup"]
        lines.append(f"  restore: server started in {s['seconds']:.2f} s, crash recovery "
                     f"{'replayed ' + _kib(s['redo_bytes']) if s['recovered'] else 'not needed'}"
                     + (f" ({s['redo_start']} → {s['redo_end']})" if s.get("redo_start") else ""))
    if "ledger" in rs:
        lg = rs["ledger"]
        lines.append(f"  ledger: {lg['rows_written']} rows written, {lg['rows_restored']} restored; "
                     f"{lg['acked_before_log_freeze']} acked before the log disk's freeze "
                     f"({lg['missing_acked_before_log_freeze']} missing), {lg['present_sent_after_log_frozen']} of "
                     f"{lg['sent_after_log_frozen']} sent after it froze present, "
                     f"{lg['in_flight']} in flight at it ({lg['in_flight_present']} present)")
        if "committed_while_locked" in lg:
            waited = ", ".join(f"#{w['seq']} waited {w['waited_ms']} ms" for w in lg["waited_for_the_lock"]) or "none"
            lines.append(f"  read lock held {lg['lock_held_ms']} ms: {lg['committed_while_locked']} rows committed "
                         f"under it; restored = the {lg['acked_before_release']} rows acked before it; "
                         f"waited for the lock: {waited}")
    if "pg_amcheck" in rs:
        p = rs["pgbench"]
        lines.append(f"  pg_amcheck exit {rs['pg_amcheck']['exit_code']}; pgbench sums: accounts {p['sum_abalance']}, "
                     f"tellers {p['sum_tbalance']}, branches {p['sum_bbalance']}, history {p['sum_delta']}")
    if "backup_label" in rs:
        lines.append(f"  backup_label (for a non-atomic snapshot; not used by the crash-recovery restore): "
                     f"{rs['backup_label']}, START WAL LOCATION {rs['backup_label_start_wal_location']}")
    lr = d.get("label_restore")
    if lr is not None:
        if "startup" in lr and "ledger" in lr:
            s, lg = lr["startup"], lr["ledger"]
            lines.append(f"  label restore: consistent at LSN {s['consistent_at']} (the stop LSN {lr['backup_stop_lsn']}), "
                         f"started in {s['seconds']:.2f} s, {s['restored_files']} WAL files from the archive, "
                         f"rows {lg['rows_restored']} ({lg['acked_before_freeze']} acked before the freeze, "
                         f"{lg['acked_before_release']} before the release): "
                         + ("VERIFIED" if lr["verified"] else "FAILED"))
        else:
            lines.append(f"  label restore FAILED: {lr.get('start_error', '?').splitlines()[0]}")
    if "check_table" in rs:
        c = rs["check_table"]
        lines.append(f"  CHECK TABLE: {c['ok']}/{c['tables']} OK; balances {rs['balances']['sum_bal']} = "
                     f"history {rs['balances']['sum_delta']}; restored gtid_binlog_pos {rs['gtid_binlog_pos']}"
                     + (f" (at the quiesce: {rs['gtid_at_quiesce']})" if "gtid_at_quiesce" in rs else ""))
    if "start_error" in rs:
        lines.append(f"  restore FAILED: {rs['start_error'].splitlines()[0]}")
    failed = [k for k, ok in d["checks"].items() if not ok]
    kind = "application-consistent" if d["mode"] == "quiesced" else "crash-consistent (file-system-consistent)"
    lines.append(f"  → {kind} checks: {len(d['checks']) - len(failed)}/{len(d['checks'])} passed"
                 + (": VERIFIED" if d["verified"] else "; FAILED: " + "; ".join(failed)))
    return "\n".join(lines)


def compare(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first quiesced and unquiesced rounds' figures side by side (None without both)."""
    q = next((r for r in rounds if r["mode"] == "quiesced"), None)
    u = next((r for r in rounds if r["mode"] == "unquiesced"), None)
    if q is None or u is None:
        return None

    def col(r: dict[str, Any]) -> dict[str, Any]:
        s = r.get("restore", {}).get("startup", {})
        lg = r.get("restore", {}).get("ledger", {})
        return {"outcome": r["report"]["outcome"], "redo_bytes": s.get("redo_bytes"),
                "redo_range": f"{s.get('redo_start')} → {s.get('redo_end')}" if s.get("redo_start") else "-",
                "recovery_seconds": s.get("seconds"), "redo_seconds": s.get("redo_seconds"),
                "ledger_in_flight": lg.get("in_flight"), "ledger_in_flight_present": lg.get("in_flight_present"),
                "load_in_flight": r["load"].get("in_flight_across_window"),
                "window_ms": r["report"]["window"]["length_ns"] / 1e6 if r["report"].get("window") else None,
                "verified": r["verified"]}
    return {"quiesced": col(q), "unquiesced": col(u)}


def compare_table(c: dict[str, Any]) -> str:
    """compare's result as a table of text."""
    q, u = c["quiesced"], c["unquiesced"]

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    rows = [("outcome", q["outcome"], u["outcome"]),
            ("WAL/redo replayed at restore", _kib(q["redo_bytes"]), _kib(u["redo_bytes"])),
            ("  from → to", q["redo_range"], u["redo_range"]),
            ("redo time (the engine's figure)", secs(q["redo_seconds"]), secs(u["redo_seconds"])),
            ("restore: start incl. recovery", secs(q["recovery_seconds"]), secs(u["recovery_seconds"])),
            ("ledger rows in flight (present)", f"{q['ledger_in_flight']} ({q['ledger_in_flight_present']})",
             f"{u['ledger_in_flight']} ({u['ledger_in_flight_present']})"),
            ("load transactions across window", str(q["load_in_flight"]), str(u["load_in_flight"])),
            ("freeze window", f"{q['window_ms']:.1f} ms" if q["window_ms"] else "-",
             f"{u['window_ms']:.1f} ms" if u["window_ms"] else "-"),
            ("verified (what the mode promises)", str(q["verified"]), str(u["verified"]))]
    w = max(len(r[0]) for r in rows) + 2
    out = [f"{'':<{w}}{'quiesced':<26}unquiesced"]
    out += [f"{a:<{w}}{b:<26}{c2}" for a, b, c2 in rows]
    return "\n".join(out)
