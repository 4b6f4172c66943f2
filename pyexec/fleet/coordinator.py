"""`pyexec group run` / `pyexec.group_run`: the coordinator of one group run (docs/fleet.md).

It writes the plan on its own lease, waits for every host's `ready`, writes `go`, waits for every
host's `frozen`, runs the cut command if any, and commits by a transaction that holds only if no
abort exists, the plan is still its own and every host's `frozen` still stands.  The commit counts
as consistent only if its answer came back before the earliest moment any host may have thawed on
its own: then every host was frozen at the instant it was applied, whatever the clocks."""
from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from pyexec import errors, limits, native, scripts, signals, waits
from pyexec.fleet import etcd, protocol

CONSISTENT, ABORTED, UNPROVEN = "consistent", "aborted", "unproven"


class RunIdTaken(ValueError):
    """The run id names a run etcd already has (in progress, or decided: its keys are its history)."""
REPORT_WAIT_S = 30.0  # how long the record waits for the hosts' own reports once the decision is made


@dataclasses.dataclass
class GroupOptions:
    """A group run's arguments, checked."""

    endpoints: list[str]
    hosts: list[str]
    cut_cmd: list[str] | None = None
    quiesce_s: float = protocol.DEFAULT_QUIESCE_S
    freeze_s: float = protocol.DEFAULT_FREEZE_S
    tls: etcd.Access = dataclasses.field(default_factory=etcd.Access)
    prefix: str = protocol.PREFIX
    run_id: str = ""
    report_wait_s: float = REPORT_WAIT_S


def options(endpoints: str | Sequence[str], hosts: str | Sequence[str], cut_cmd: str | Sequence[str] | None = None,
            quiesce_timeout: float = protocol.DEFAULT_QUIESCE_S, freeze_timeout: float = protocol.DEFAULT_FREEZE_S,
            cacert: str | None = None, cert: str | None = None, key: str | None = None,
            prefix: str = protocol.PREFIX, run_id: str | None = None,
            report_wait: float = REPORT_WAIT_S, user: str | None = None,
            password_file: str | None = None) -> GroupOptions:
    """The arguments checked; ValueError saying which is wrong (nothing has been sent)."""
    eps = [e.strip() for e in (endpoints.split(",") if isinstance(endpoints, str) else endpoints) if e.strip()]
    if not eps or not all(e.startswith(("http://", "https://")) for e in eps):
        raise ValueError(f"--etcd must be one or more http:// or https:// URLs, comma-separated, not {endpoints!r}")
    names = [h.strip() for h in (hosts.split(",") if isinstance(hosts, str) else hosts)]
    if not names or not all(names):
        raise ValueError(f"--hosts must name one or more hosts, comma-separated, not {hosts!r}")
    for h in names:
        protocol.check_name(h, "a host")
    if len(set(names)) != len(names):
        raise ValueError("--hosts names a host twice")
    if len(names) > protocol.MAX_HOSTS:
        raise ValueError(f"--hosts names {len(names)} hosts; a group run takes at most {protocol.MAX_HOSTS} (its "
                         f"commit is one etcd transaction, at most {protocol.MAX_TXN_OPS} compares by default)")
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together")
    for f in (cacert, cert, key):
        if f is not None and not os.path.isfile(f):
            raise ValueError(f"{f}: no such file")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ValueError(f"the key prefix must start and end with '/', not {prefix!r}")
    if (user is None) != (password_file is None):
        raise ValueError("--user and --password-file go together")
    password = None
    if password_file is not None:
        try:
            with open(password_file, "rb") as pf:
                password = pf.read(4096).decode("utf-8", "replace").strip()
        except OSError as e:
            raise ValueError(f"--password-file {password_file}: {e.strerror}") from None
    freeze = limits.check_timeout(freeze_timeout, "freeze timeout")
    if protocol.commit_budget_ns(freeze) <= 0:
        raise ValueError(f"--freeze-timeout {freeze_timeout!r} leaves no time to commit (the commit must come "
                         f"{(protocol.SELF_THAW_EARLY_NS + protocol.COMMIT_SLACK_NS) / 1e6:g} ms and 0.1 % before the bound)")
    rid = protocol.check_name(run_id, "the run id") if run_id else \
        time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
    return GroupOptions(
        eps, names, scripts.resolve_command(cut_cmd) if cut_cmd else None,
        limits.check_timeout(quiesce_timeout, "quiesce timeout"), freeze,
        etcd.Access(cacert, cert, key, user, password), prefix, rid, limits.check_timeout(report_wait, "report wait", zero_ok=True))


class _Run:
    """One group run's keys and what the coordinator saw of them."""

    def __init__(self, o: GroupOptions, client: etcd.Client, nat: native.Native, say: Callable[[str], None]):
        self.o, self.client, self.nat, self.say = o, client, nat, say
        self.k = {leaf: protocol.run_key(o.prefix, o.run_id, leaf) for leaf in
                  (protocol.PLAN, protocol.GO, protocol.COMMITTED, protocol.ABORT, protocol.RECORD)}
        self.rec: dict[str, Any] = {"run": o.run_id, "outcome": ABORTED, "reason": "", "aborted_by": None,
                                    "code": 0, "error": None, "hosts": {},
                                    "plan": {"hosts": o.hosts, "quiesce_s": o.quiesce_s, "freeze_s": o.freeze_s,
                                             "cut_cmd": shlex.join(o.cut_cmd) if o.cut_cmd else None},
                                    "coordinator": {}, "cut": None}
        self.view: etcd.View | None = None
        self.lease: etcd.Lease | None = None

    def host_leaf(self, h: str, leaf: str) -> str:
        return protocol.host_key(self.o.prefix, h, self.o.run_id, leaf)

    def keys(self) -> dict[str, etcd.KV]:
        assert self.view is not None
        return self.view.snapshot()

    def host_aborts(self, keys: dict[str, etcd.KV]) -> list[tuple[str, str]]:
        """(host, why) of every host that aborted."""
        out = []
        for h in self.o.hosts:
            kv = keys.get(self.host_leaf(h, protocol.HOST_ABORT))
            if kv is not None:
                try:
                    why = str(orjson.loads(kv.value).get("why", ""))
                except (orjson.JSONDecodeError, AttributeError):
                    why = "(unreadable)"
                out.append((h, why))
        return out

    def wait_all(self, leaf: str, deadline_ns: int, cancel_fd: int) -> tuple[bool, str]:
        """Until every host has leaf: (True, ""), or (False, why) at an abort, the deadline, a signal,
        or the loss of this run's own lease."""
        assert self.view is not None and self.lease is not None
        while True:
            self.view.drain()
            keys = self.keys()
            aborts = self.host_aborts(keys)
            if aborts:
                self.rec["aborted_by"] = aborts[0][0]
                return False, f"{aborts[0][0]} aborted: {aborts[0][1]}"
            missing = [h for h in self.o.hosts if self.host_leaf(h, leaf) not in keys]
            if not missing:
                return True, ""
            if self.lease.lost or self.k[protocol.PLAN] not in keys:
                return False, "the coordinator's lease was lost (etcd unreachable for longer than its TTL)"
            ready = waits.wait_readable([self.view.fd], deadline_ns, cancel_fd, self.nat)
            if not ready:
                self.rec["aborted_by"] = missing[0]
                return False, f"{', '.join(missing)} did not say {leaf} in time"
            if cancel_fd in ready:
                return False, "the coordinator was interrupted"

    def abort(self, why: str) -> bool | None:
        """The coordinator's abort, unless the run committed (bounded; a failure leaves the hosts their
        own deadlines and the loss of the plan): True if applied, False if the run had committed,
        None if etcd did not answer."""
        self.rec["reason"] = self.rec["reason"] or why
        try:
            ok, _ = self.client.txn([etcd.absent(self.k[protocol.COMMITTED])],
                                    [etcd.put_op(self.k[protocol.ABORT], orjson.dumps({"by": "coordinator", "why": why}))],
                                    time.monotonic() + 3 * self.client.request_s)
            return ok
        except (etcd.Unreachable, RuntimeError) as e:
            self.rec["coordinator"]["abort_error"] = str(e)
            return None


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def group_run(o: GroupOptions, say: Callable[[str], None] = lambda m: None,
              cancel: signals.Cancel | None = None, nat: native.Native | None = None) -> dict[str, Any]:
    """One group run start to end: the record (also kept in etcd under runs/<id>/record).  RunIdTaken
    (a ValueError) if etcd has a run of that id already: nothing was run."""
    nat = nat or native.default()
    client = etcd.Client(o.endpoints, o.tls)
    r = _Run(o, client, nat, say)
    c: dict[str, Any] = r.rec["coordinator"]
    cancel_fd = cancel.fd if cancel is not None else -1
    try:
        agents = []
        for h in o.hosts:
            agents.append(h if client.get(protocol.host_key(o.prefix, h))[0] else None)
        missing = [h for h, a in zip(o.hosts, agents) if a is None]
    except etcd.Unreachable as e:
        err = errors.PyexecError(322, f"{', '.join(o.endpoints)}: {e}")
        r.rec.update(outcome="failed", reason=err.detail, code=322, error=err.as_dict())
        return r.rec
    if missing:
        err = errors.PyexecError(323, f"no agent registered for {', '.join(missing)}: nothing was run")
        r.rec.update(reason=err.detail, code=323, error=err.as_dict(), aborted_by=missing[0])
        return r.rec
    try:
        rec = _run(r, o, client, nat, cancel_fd, c, say)
        rec["interrupted"] = cancel.name if cancel is not None else None
        return rec
    except etcd.Unreachable as e:
        # No decision could be written: every host thaws on the loss of the plan or its own deadline.
        err = errors.PyexecError(322, f"etcd stopped answering during the run: {e}")
        r.rec.update(outcome="failed", reason=err.detail, code=322, error=err.as_dict())
        return r.rec
    finally:
        if r.view is not None:
            r.view.close()
        if r.lease is not None:
            r.lease.close()  # the plan and the go go with it


def _run(r: _Run, o: GroupOptions, client: etcd.Client, nat: native.Native, cancel_fd: int,
         c: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    r.lease = etcd.Lease(client, protocol.LEASE_TTL_S, protocol.KEEPALIVE_S)
    plan = protocol.Plan(o.run_id, tuple(o.hosts), o.quiesce_s, o.freeze_s, os.uname().nodename)
    # Nothing under runs/<id>/ either: a run decided earlier keeps its decision, record and reports
    # (the hosts' agents would not answer its id again, and its record would be written over).
    ok, rev = client.txn([etcd.absent(r.k[protocol.PLAN]), etcd.none_under(protocol.run_key(o.prefix, o.run_id))],
                         [etcd.put_op(r.k[protocol.PLAN], plan.dumps(), r.lease.id)])
    if not ok:
        raise RunIdTaken(f"run id {o.run_id} is taken: a run with that id is in progress or kept in etcd "
                         f"(`pyexec group show --run-id {o.run_id}`)")
    plan_rev = rev
    t_start = nat.now_ns()
    say(f"run {o.run_id}: plan for {len(o.hosts)} host(s); waiting for every host to be quiesced "
        f"(at most {o.quiesce_s:g}s)")
    host_prefixes = [protocol.host_key(o.prefix, h, o.run_id) for h in o.hosts]
    run_prefix = protocol.run_key(o.prefix, o.run_id)
    r.view = etcd.View(client, [r.k[protocol.PLAN], run_prefix] + host_prefixes, 0,
                       accept=lambda k: k == r.k[protocol.PLAN] or k.startswith((run_prefix, *host_prefixes)))
    ok, why = r.wait_all(protocol.READY, t_start + native.ns_from_s(o.quiesce_s), cancel_fd)
    c["all_ready_ms"] = _ms(nat.now_ns() - t_start)
    if not ok:
        r.abort(why)
        return _finish(r, o, client, nat, say)
    keys = r.keys()
    bounds = {}
    for h in o.hosts:
        try:
            # A host's bound as its ready says, never above the plan's (a host takes the shorter).
            bounds[h] = min(o.freeze_s, limits.check_timeout(
                orjson.loads(keys[r.host_leaf(h, protocol.READY)].value)["freeze_s"], "freeze_s"))
        except (KeyError, ValueError, TypeError, orjson.JSONDecodeError):
            # Unknown, it cannot be proven frozen: a guess could be longer than the bound it took.
            r.rec["aborted_by"] = h
            r.abort(f"{h}'s ready has no valid freeze bound")
            return _finish(r, o, client, nat, say)
    earliest = min(bounds.values())
    budget = protocol.commit_budget_ns(earliest)
    c["freeze_bounds_s"] = bounds
    c["commit_budget_ms"] = _ms(budget)
    if budget <= 0:  # a host's own bound leaves no time to commit: freeze nobody for nothing
        r.rec["aborted_by"] = min(bounds, key=lambda h: bounds[h])
        r.abort(f"{r.rec['aborted_by']}'s freeze bound ({earliest:g}s) leaves no time to commit")
        return _finish(r, o, client, nat, say)
    # T0: taken before the go is sent, so every host's bound starts after it.
    t0 = nat.now_ns()
    # No go but its own: a host that froze on a go written before T0 (by whoever can write the run's
    # keys) started its bound before T0, and the budget would not prove it frozen at the commit.
    ok, go_rev = _put_once(client, [etcd.absent(r.k[protocol.ABORT]), etcd.created_at(r.k[protocol.PLAN], plan_rev),
                                    etcd.absent(r.k[protocol.GO]), etcd.absent(r.k[protocol.COMMITTED])],
                           r.k[protocol.GO], {}, r.lease.id)
    c["go_sent_ms"] = _ms(t0 - t_start)
    if not ok:
        r.abort("the plan was lost, the run aborted, or a go or commit this coordinator did not write stood "
                "before its go")
        return _finish(r, o, client, nat, say)
    say(f"run {o.run_id}: go; waiting for every host to be frozen")
    ok, why = r.wait_all(protocol.FROZEN, t0 + budget, cancel_fd)
    c["all_frozen_ms"] = _ms(nat.now_ns() - t0)
    if ok:
        # Each host says which go it froze on: one written and deleted before T0 by someone else
        # passed the go's transaction unseen, and a host that froze on it started its bound before T0.
        keys = r.keys()
        for h in o.hosts:
            try:
                seen = orjson.loads(keys[r.host_leaf(h, protocol.FROZEN)].value)["go_revision"]
            except (KeyError, TypeError, orjson.JSONDecodeError):
                seen = None
            if seen != go_rev:
                r.rec["aborted_by"] = h
                ok, why = False, f"{h} froze on a go this coordinator did not write (revision {seen}, not {go_rev})"
                break
    if not ok:
        r.abort(why)
        return _finish(r, o, client, nat, say)
    if o.cut_cmd:
        say(f"run {o.run_id}: every host frozen; the cut command")
        res = scripts.run_command(o.cut_cmd, t0 + budget, cancel_fd, nat=nat,
                                  env_extra={"PYEXEC_GROUP_RUN": o.run_id, "PYEXEC_HOSTS": ",".join(o.hosts)})
        r.rec["cut"] = res.as_dict()
        c["cut_done_ms"] = _ms(nat.now_ns() - t0)
        if not res.ok:
            r.abort(f"the cut command failed: {res.detail}")
            return _finish(r, o, client, nat, say)
    t1 = nat.now_ns()
    if t1 - t0 >= budget:
        r.abort("no time left to commit within the earliest host's bound")
        return _finish(r, o, client, nat, say)
    # absent(COMMITTED): a host that thawed on a commit this coordinator did not write is not frozen now.
    compare = [etcd.absent(r.k[protocol.ABORT]), etcd.absent(r.k[protocol.COMMITTED]),
               etcd.created_at(r.k[protocol.PLAN], plan_rev)]
    compare += [etcd.absent(r.host_leaf(h, protocol.HOST_ABORT)) for h in o.hosts]
    compare += [etcd.present(r.host_leaf(h, protocol.FROZEN)) for h in o.hosts]
    try:
        committed, _ = _put_once(client, compare, r.k[protocol.COMMITTED], {"by": "coordinator"}, 0,
                                 time.monotonic() + (t0 + budget - t1) / 1e9)
    except (etcd.Unreachable, RuntimeError) as e:
        committed = False
        # Applied or not, unknown: the hosts learn it from etcd; the record cannot claim consistency.
        c["commit_error"] = str(e)
    t2 = nat.now_ns()
    c.update(commit_sent_ms=_ms(t1 - t0), commit_answered_ms=_ms(t2 - t0))
    if committed:
        proven = t2 - t0 < budget
        c["overlap"] = {"proven": proven, "commit_applied_before_ms": _ms(t2 - t0),
                        "earliest_host_thaw_after_ms": _ms(budget),
                        "why": "every host said frozen before the commit; none may thaw before the commit "
                               "(no abort, plan held) or before its own bound, which started after the go"}
        r.rec["outcome"] = CONSISTENT if proven else UNPROVEN
        if not proven:
            r.rec["reason"] = "committed, but the commit's answer came after the earliest host's bound"
        say(f"run {o.run_id}: committed {_ms(t2 - t0)} ms after the go")
        try:  # the proof first, before the hosts' reports: a coordinator that dies now has said it
            client.put(r.k[protocol.RECORD], orjson.dumps(r.rec), deadline=time.monotonic() + 2 * client.request_s)
        except (etcd.Unreachable, RuntimeError) as e:
            c["record_error"] = str(e)
    elif "commit_error" in c:
        # The commit's answer was lost: applied or not, the abort's transaction tells.
        applied = r.abort(f"the commit's answer was lost ({c['commit_error']})")
        if applied is False:
            r.rec.update(outcome=UNPROVEN, reason="committed, but its answer was lost: the overlap is not proven")
        elif applied is None:
            err = errors.PyexecError(322, f"the commit's result is unknown: etcd stopped answering "
                                     f"({c['commit_error']}); every host thaws on its own deadline")
            r.rec.update(outcome="failed", reason=err.detail, code=322, error=err.as_dict())
    elif r.abort("the commit's conditions did not hold (an abort, a host's frozen key gone, or the plan "
                 "lost)") is False:
        r.rec.update(outcome=UNPROVEN, reason="a commit this coordinator did not write stands: the overlap is not "
                                              "proven")
    return _finish(r, o, client, nat, say)


def _put_once(client: etcd.Client, compare: list[dict[str, Any]], key: str, doc: dict[str, Any], lease: int,
              deadline: float | None = None) -> tuple[bool, int]:
    """Put key by a transaction whose compares include its absence: (applied, its create revision).
    A request sent again (to the next endpoint, after one that applied it failed to answer) finds
    the key there: the token in its value tells this put from anyone else's."""
    token = secrets.token_hex(8)
    ok, rev = client.txn(compare, [etcd.put_op(key, orjson.dumps(dict(doc, token=token)), lease)], deadline)
    if ok:
        return True, rev
    kvs, _ = client.get(key, deadline=deadline)
    if kvs and (_json_object(kvs[0].value) or {}).get("token") == token:
        return True, kvs[0].create_revision
    return False, 0


def _finish(r: _Run, o: GroupOptions, client: etcd.Client, nat: native.Native,
            say: Callable[[str], None]) -> dict[str, Any]:
    """Wait (bounded) for every host's own report, then the record: printed and kept in etcd."""
    assert r.view is not None
    deadline = nat.now_ns() + native.ns_from_s(o.report_wait_s)
    say(f"run {o.run_id}: waiting for the hosts' reports")
    reachable = r.view.refresh(time.monotonic() + 2 * client.request_s)
    while reachable:
        r.view.drain()
        keys = r.keys()
        if all(r.host_leaf(h, protocol.REPORT) in keys for h in o.hosts):
            break
        if not waits.wait_readable([r.view.fd], deadline, -1, nat):
            break
    keys = r.keys()
    if r.rec["outcome"] == ABORTED:
        aborts = r.host_aborts(keys)
        if aborts and r.rec["aborted_by"] is None:
            r.rec["aborted_by"] = aborts[0][0]
        if r.rec["aborted_by"] is None:
            r.rec["aborted_by"] = "coordinator"
        err = errors.PyexecError(324, r.rec["reason"])
        r.rec.update(code=324, error=err.as_dict())
    for h in o.hosts:
        kv = keys.get(r.host_leaf(h, protocol.REPORT))
        try:
            r.rec["hosts"][h] = orjson.loads(kv.value) if kv else {"host": h, "outcome": "no report",
                                                                    "decision": "unknown"}
        except orjson.JSONDecodeError:
            r.rec["hosts"][h] = {"host": h, "outcome": "unreadable report"}
    try:
        client.put(r.k[protocol.RECORD], orjson.dumps(r.rec))
    except (etcd.Unreachable, RuntimeError) as e:
        r.rec["coordinator"]["record_error"] = str(e)
    return r.rec


def show(o: GroupOptions) -> dict[str, Any]:
    """A group run as etcd keeps it: its record if its coordinator wrote one; else what the keys say
    (a coordinator that died: `unproven` if it committed, since only it knew when the commit came
    back; `aborted` if an abort stands; `in progress` while its plan stands; `undecided` otherwise),
    with every host's own report.  PyexecError 11 if etcd has no trace of the run."""
    client = etcd.Client(o.endpoints, o.tls)
    kvs, _ = client.get(protocol.run_key(o.prefix, o.run_id), prefix=True)
    keys = {kv.key: kv for kv in kvs}
    rec_kv = keys.get(protocol.run_key(o.prefix, o.run_id, protocol.RECORD))
    plan_hosts: list[str] = list(o.hosts)
    reports: dict[str, Any] = {}
    aborts = []
    for h in plan_hosts:
        hk, _ = client.get(protocol.host_key(o.prefix, h, o.run_id), prefix=True)
        for kv in hk:
            leaf = kv.key.rsplit("/", 1)[1]
            if leaf == protocol.REPORT:
                # As the host's role wrote it: anything, JSON or not.
                reports[h] = _json_object(kv.value) or {"host": h, "outcome": "unreadable report"}
            elif leaf == protocol.HOST_ABORT:
                aborts.append(h)
    hosts = {h: reports.get(h, {"host": h, "outcome": "no report", "decision": "unknown"}) for h in plan_hosts}
    in_progress = bool(client.get(protocol.run_key(o.prefix, o.run_id, protocol.PLAN))[0])
    if not (keys or in_progress or reports or aborts):
        raise errors.PyexecError(11, f"no group run {o.run_id} in etcd under {o.prefix} (for hosts "
                                     f"{', '.join(plan_hosts)})")
    rec = _json_object(rec_kv.value) if rec_kv is not None else None
    if rec is not None:  # the coordinator's own word (written at the decision, again with the reports)
        kept = rec.get("hosts")
        kept = kept if isinstance(kept, dict) else {}
        rec["hosts"] = {h: kept.get(h) or hosts[h] for h in plan_hosts}
        return rec
    if protocol.run_key(o.prefix, o.run_id, protocol.COMMITTED) in keys:
        outcome, reason = UNPROVEN, "committed, but the coordinator wrote no record: the overlap is not proven"
    elif protocol.run_key(o.prefix, o.run_id, protocol.ABORT) in keys or aborts:
        outcome, reason = ABORTED, f"aborted by {', '.join(aborts) or 'the coordinator'}"
    elif in_progress:  # its plan stands: its coordinator's lease is alive, the hosts may be frozen now
        outcome, reason = "in progress", "not decided yet: the run's plan stands (its coordinator is alive)"
    else:
        outcome, reason = "undecided", "neither committed nor aborted: every host thawed on the loss of the plan or its own deadline"
    return {"run": o.run_id, "outcome": outcome, "reason": reason, "aborted_by": aborts[0] if aborts else None,
            "hosts": hosts, "coordinator": {"record": "missing"}}


def _json_object(data: bytes) -> dict[str, Any] | None:
    """data as a JSON object, or None (not JSON, or not an object)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None
