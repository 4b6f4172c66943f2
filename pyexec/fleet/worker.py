"""One host's part in one group run: pyexec's own flow (host.run) with the host's own config, mounts
and snapshot command, between the run's keys in etcd.

Quiesced, it says `ready` and waits for `go`; frozen (its own snapshot command done) it says `frozen`
and waits for the decision.  It thaws on `committed`, `abort`, the loss of the plan (the
coordinator's lease), or its own monotonic deadline, whichever comes first; never on anything else
before the deadline: a host that thawed early without an abort applied first could be counted
frozen by a commit it did not take part in.  Started by the agent (`python -m pyexec.fleet.worker`),
one process per run, so that the agent's death does not end the run and a run's death does not end
the agent."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from pyexec import host, journal, native, scripts, signals, waits
from pyexec.fleet import agentconfig, etcd, protocol
from pyexec.window import Window

COMMITTED, ABORTED, PLAN_LOST, GO, DEADLINE, SIGNALLED = (
    "committed", "aborted", "plan lost", "go", "deadline", "signalled")


class Stop(Exception):
    """The group did not commit: the window thaws (the snapshot failed), the post-scripts run."""


def host_abort(client: etcd.Client, prefix: str, host_name: str, run: str, why: str, deadline: float) -> bool:
    """A host's abort of a run, applied only if the run has not committed (the worker's, or its
    agent's for a worker that died): True if applied, so no commit can follow it; False if the run
    committed first.  etcd.Unreachable or RuntimeError if etcd did not answer."""
    ok, _ = client.txn([etcd.absent(protocol.run_key(prefix, run, protocol.COMMITTED))],
                       [etcd.put_op(protocol.host_key(prefix, host_name, run, protocol.HOST_ABORT),
                                    orjson.dumps({"host": host_name, "why": why}))], deadline)
    return ok


class Worker:
    """The state of one host's run: its bounds, its stamps, its view of the run's keys."""

    def __init__(self, cfg: agentconfig.AgentConfig, plan: protocol.Plan, plan_revision: int,
                 client: etcd.Client, nat: native.Native, say: Callable[[str], None]):
        self.cfg, self.plan, self.client, self.nat, self.say = cfg, plan, client, nat, say
        self.plan_revision = plan_revision
        self.quiesce_s = min(plan.quiesce_s, cfg.max_quiesce_s)
        self.freeze_s = min(plan.freeze_s, cfg.max_freeze_s)
        self.stamps: dict[str, int] = {"start": nat.now_ns()}
        self.decision = ""
        self.snapshot_id = ""
        self.aborted_why = ""
        self.go_revision = 0
        self.notes: list[str] = []
        p, run, h = cfg.prefix, plan.run, cfg.host
        self.k = {leaf: protocol.run_key(p, run, leaf) for leaf in
                  (protocol.PLAN, protocol.GO, protocol.COMMITTED, protocol.ABORT)}
        self.mine = {leaf: protocol.host_key(p, h, run, leaf) for leaf in
                     (protocol.READY, protocol.FROZEN, protocol.HOST_ABORT, protocol.REPORT, protocol.WORKER)}
        self.lease = etcd.Lease(client, protocol.LEASE_TTL_S, protocol.KEEPALIVE_S)
        # Before any pre-script: an agent restarted from now on sees the run taken and starts no second
        # worker (it would find the filesystems locked by this one and abort the group run).
        self.put(protocol.WORKER, {"host": cfg.host, "pid": os.getpid()})
        mine = (self.k[protocol.PLAN], protocol.run_key(p, run))
        self.view = etcd.View(client, list(mine), 0, accept=lambda k: k == mine[0] or k.startswith(mine[1]))

    def state(self) -> str | None:
        """What the run's keys say now: committed, aborted, plan lost, go, or None (nothing yet)."""
        keys = self.view.snapshot()
        if self.k[protocol.COMMITTED] in keys:
            return COMMITTED
        if self.k[protocol.ABORT] in keys:
            return ABORTED
        plan = keys.get(self.k[protocol.PLAN])
        if plan is None or plan.create_revision != self.plan_revision:
            return PLAN_LOST
        go = keys.get(self.k[protocol.GO])
        if go is not None:
            self.go_revision = go.create_revision  # which go this host froze on: said in `frozen`
            return GO
        return None

    def wait(self, until: tuple[str, ...], deadline_ns: int, cancel_fd: int) -> str:
        """Block until the state is one of until, the deadline (DEADLINE), or cancel_fd (SIGNALLED)."""
        while True:
            self.view.drain()
            st = self.state()
            if st in until:
                assert st is not None
                return st
            ready = waits.wait_readable([self.view.fd], deadline_ns, cancel_fd, self.nat)
            if not ready:
                return DEADLINE
            if cancel_fd >= 0 and cancel_fd in ready:
                return SIGNALLED

    def put(self, leaf: str, doc: dict[str, Any], lease: bool = True) -> bool:
        """Put one of this host's keys (bounded); False if etcd did not take it."""
        try:
            self.client.put(self.mine[leaf], orjson.dumps(doc), self.lease.id if lease else 0,
                            time.monotonic() + 2 * self.client.request_s)
            return True
        except (etcd.Unreachable, RuntimeError) as e:
            self.notes.append(f"could not write {leaf}: {e}")
            return False

    def abort(self, why: str) -> bool:
        """This host's abort, applied only if the run has not committed: True if applied (no commit
        can follow it), False if the run committed first or etcd could not be reached."""
        self.aborted_why = self.aborted_why or why
        try:
            return host_abort(self.client, self.cfg.prefix, self.cfg.host, self.plan.run, why,
                              time.monotonic() + 2 * self.client.request_s)
        except (etcd.Unreachable, RuntimeError) as e:
            self.notes.append(f"could not write abort: {e}")
            return False

    def gate(self, ok: bool, cancel: signals.Cancel) -> str | None:
        """Between the pre-phase and the freeze: say ready, wait for go (None) or say why not."""
        self.stamps["quiesced"] = self.nat.now_ns()
        if not ok:
            self.abort(f"the pre-phase failed on {self.cfg.host}")
            self.decision = ABORTED
            return "not frozen: the pre-phase failed on this host, the group run is aborted"
        if not self.put(protocol.READY, {"host": self.cfg.host, "freeze_s": self.freeze_s,
                                         "quiesce_s": self.quiesce_s}):
            self.abort("could not say ready")
            self.decision = ABORTED
            return "not frozen: etcd did not take this host's ready"
        deadline = self.stamps["start"] + native.ns_from_s(self.quiesce_s)
        st = self.wait((GO, COMMITTED, ABORTED, PLAN_LOST), deadline, cancel.fd)
        if st == GO:
            self.stamps["go_seen"] = self.nat.now_ns()
            return None
        if st in (DEADLINE, SIGNALLED):
            why = (f"{self.cfg.host} waited quiesced {self.quiesce_s:g}s (its bound) without a go" if st == DEADLINE
                   else f"{self.cfg.host} was signalled ({cancel.name}) while quiesced")
            self.abort(why)
        self.decision = st
        return f"not frozen: {st} before the go"

    def take(self, win: Window | None, cancel: signals.Cancel) -> None:
        """Inside the window: the host's own snapshot, `frozen`, then wait for the decision."""
        if win is None:
            raise Stop("nothing was frozen (fsFreezeEnabled false or no mount): a group run needs a freeze")
        try:
            with cancel.not_raising():  # a signal is read from cancel.fd where this code can act on it
                self._take(win, cancel)
        except signals.Interrupted:  # from _take, or raised before not_raising() took effect
            with cancel.not_raising():
                self._signalled(win, cancel)

    def _take(self, win: Window, cancel: signals.Cancel) -> None:
        self.stamps["window_start"] = win.start_ns
        self.stamps["frozen"] = win.frozen_ns
        # The guardian thaws at win.deadline_ns; this process thaws a little before, on the same clock.
        deadline = win.deadline_ns - protocol.SELF_THAW_EARLY_NS
        if self.cfg.snapshot_command:
            # No on_stop: a signal must not thaw before the abort is applied (_signalled decides).
            res = scripts.run_command(list(self.cfg.snapshot_command), deadline, cancel.fd, nat=self.nat, env_extra={"PYEXEC_GROUP_RUN": self.plan.run,
                                                               "PYEXEC_HOST": self.cfg.host})
            self.stamps["snapshot_done"] = self.nat.now_ns()
            self.snapshot_id = res.stdout.data.decode("utf-8", "replace").strip()[:512] if res.stdout else ""
            if not res.ok:
                if res.cancelled:
                    raise signals.Interrupted(cancel.first() or signals.CANCELLED)
                # The window is still frozen: the abort goes first.
                self.abort(f"the snapshot command failed on {self.cfg.host}: {res.detail}")
                self.decision = ABORTED
                raise Stop(f"the snapshot command failed: {res.detail}")
        if not self.put(protocol.FROZEN, {"host": self.cfg.host, "snapshot": self.snapshot_id,
                                          "go_revision": self.go_revision}):
            self.abort("could not say frozen")
        self.stamps["said_frozen"] = self.nat.now_ns()
        st = self.wait((COMMITTED, ABORTED, PLAN_LOST), deadline, cancel.fd)
        if st == SIGNALLED:
            raise signals.Interrupted(cancel.first() or signals.CANCELLED)
        self.decision = st
        self.stamps["decided"] = self.nat.now_ns()
        if st != COMMITTED:
            raise Stop("ended on its own deadline, before any decision" if st == DEADLINE else st)

    def _signalled(self, win: Window, cancel: signals.Cancel) -> None:
        """A signal inside the window: thaw at once only if no commit can count this host frozen
        (an abort applied, or the commit already seen); else hold to the deadline, bounded."""
        deadline = win.deadline_ns - protocol.SELF_THAW_EARLY_NS
        if self.abort(f"{self.cfg.host} was signalled ({cancel.name}) while frozen"):
            self.decision = ABORTED
            raise Stop(f"signalled ({cancel.name}): aborted the group run and thawed")
        st = self.wait((COMMITTED, ABORTED, PLAN_LOST), deadline, -1)
        self.decision = st
        self.stamps["decided"] = self.nat.now_ns()
        if st == COMMITTED:
            return
        if st == DEADLINE:
            self.notes.append("signalled inside the window, the abort could not be written: held frozen to the "
                              "local deadline so that no commit could count this host frozen when it was not")
        raise Stop(f"signalled ({cancel.name}); then {st}")

    def record(self, rep: host.RunReport) -> dict[str, Any]:
        """This host's part of the group record: outcome, decision, snapshot id, stamps (own clock and
        offsets from its sight of go)."""
        w = rep.window
        if w is not None and w.mounts:
            self.stamps["thaw"] = min((m.thaw_start_ns for m in w.mounts if m.thaw_start_ns), default=0)
            self.stamps["thawed"] = max((m.thaw_end_ns for m in w.mounts), default=0)
            self.stamps["first_freeze"] = min((m.freeze_start_ns for m in w.mounts if m.freeze_start_ns), default=0)
        go = self.stamps.get("go_seen")
        return {
            "host": self.cfg.host, "run": self.plan.run, "outcome": rep.outcome, "code": rep.code,
            "decision": self.decision or "none", "ended_on_own_deadline": self.decision == DEADLINE,
            "snapshot_id": self.snapshot_id, "snapshot": rep.snapshot, "detail": rep.snapshot_detail,
            "quiesce_s": self.quiesce_s, "freeze_s": self.freeze_s,
            "window_ms": (w.length_ns / 1e6 if w is not None and w.end_ns else None),
            "stamps_ns": dict(self.stamps),
            "from_go_ms": {k: (v - go) / 1e6 for k, v in self.stamps.items() if go and v} if go else {},
            "pre": [r.as_dict() for r in rep.pre], "post": [r.as_dict() for r in rep.post],
            "problems": [e.as_dict() for e in rep.check_errors], "warnings": rep.warnings,
            "notes": self.notes, "interrupted": rep.interrupted,
        }

    def group_decision(self) -> str:
        """The run's decision as etcd has it now (a host that thawed on its deadline learns it late):
        committed, aborted, or unknown (etcd not reached, or neither written)."""
        self.view.refresh(time.monotonic() + 3 * self.client.request_s)
        keys = self.view.snapshot()
        if self.k[protocol.COMMITTED] in keys:
            return COMMITTED
        if self.k[protocol.ABORT] in keys or self.decision == ABORTED:
            return ABORTED
        try:
            kvs, _ = self.client.get(protocol.run_key(self.cfg.prefix, self.plan.run, protocol.COMMITTED),
                                     deadline=time.monotonic() + 2 * self.client.request_s)
        except (etcd.Unreachable, RuntimeError):
            return "unknown"
        return COMMITTED if kvs else "unknown"

    def close(self) -> None:
        """Stop watching; revoke the lease (ready and frozen go with it)."""
        self.view.close()
        self.lease.close()


def run(cfg: agentconfig.AgentConfig, plan: protocol.Plan, plan_revision: int,
        say: Callable[[str], None] = lambda m: None, phase: Callable[[str], None] = lambda p: None) -> dict[str, Any]:
    """One host's part in a group run, start to end (post-scripts included); its record, also put
    under the host's report key.  phase("pre") before any pre-script starts, phase("post") before
    the post-scripts: what the agent needs to finish the job of a worker that died."""
    nat = native.default()
    client = etcd.Client(cfg.endpoints, cfg.tls)
    w = Worker(cfg, plan, plan_revision, client, nat, say)

    def progress(m: str) -> None:
        for p in ("pre", "post"):
            if m.startswith(p + "-scripts"):
                w.stamps[f"{p}_start"] = nat.now_ns()
                phase(p)
        say(f"{cfg.host} {plan.run}: {m}")
    try:
        with signals.Cancel() as cancel:
            rep = host.run(cfg.host_config, list(cfg.mounts) or None,
                           snapshot=lambda win: w.take(win, cancel), freeze_timeout=w.freeze_s,
                           cancel=cancel, gate=lambda ok: w.gate(ok, cancel), hold=True,
                           progress=lambda m: progress(m))
            w.stamps["post_end"] = nat.now_ns()
            if not w.decision:  # stopped before the gate (a check problem, a signal): make sure no go follows
                w.abort(f"{cfg.host} was signalled ({rep.interrupted}) before it was quiesced" if rep.interrupted
                        else f"{cfg.host} stopped before it was quiesced: {rep.snapshot_detail or rep.outcome}")
                w.decision = ABORTED
            doc = w.record(rep)
            doc["group_decision"] = w.group_decision()
            if w.decision == DEADLINE and doc["group_decision"] == COMMITTED:
                w.notes.append("the group committed while this host was frozen (it said frozen first): its "
                               "snapshot is part of the consistent cut, though this host saw the commit late")
            # Not written (etcd out of reach): the agent tries again, as long as it runs.
            doc["report_written"] = w.put(protocol.REPORT, doc, lease=False)
            return doc
    finally:
        w.close()


def state_path(run_id: str) -> str:
    """Where a run's worker keeps its state on this host, for whichever agent outlives it."""
    return os.path.join(journal.RUN_DIR, f"fleet-{run_id}.worker")


def write_state(run_id: str, doc: dict[str, Any]) -> None:
    """The worker's state, replaced whole (a reader never sees half of it)."""
    os.makedirs(journal.RUN_DIR, mode=0o700, exist_ok=True)
    path = state_path(run_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, orjson.dumps(doc))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_states() -> list[dict[str, Any]]:
    """Every run's worker state on this host: its pid and start time, plan, phases, and its record
    if etcd did not take it."""
    out = []
    try:
        names = os.listdir(journal.RUN_DIR)
    except OSError:
        return []
    for name in sorted(names):
        if name.startswith("fleet-") and name.endswith(".worker"):
            try:
                with open(os.path.join(journal.RUN_DIR, name), "rb") as f:
                    doc = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("run"), str):
                out.append(doc)
    return out


def main() -> int:
    """`python -m pyexec.fleet.worker CONFIG PLAN_REVISION` with the plan on stdin (the agent's).

    Its state (pid, phases; its record if etcd did not take it) is kept in the run directory, so
    that an agent started after the one that started it (restarted) can finish its job if it dies;
    the file goes once the record is in etcd."""
    cfg = agentconfig.load(sys.argv[1])
    revision = int(sys.argv[2])
    data = sys.stdin.buffer.read()
    plan = protocol.Plan.loads(data)
    state: dict[str, Any] = {"run": plan.run, "pid": os.getpid(), "start": journal.start_time(os.getpid()),
                             "plan": data.decode(), "revision": revision, "phases": [],
                             "started_ns": native.default().now_ns()}
    write_state(plan.run, state)

    def say(m: str) -> None:
        try:
            print(f"pyexec-worker: {m}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # the agent that started it is gone: its stderr with it

    def phase(p: str) -> None:
        state["phases"].append(p)
        write_state(plan.run, state)
    doc = run(cfg, plan, revision, say, phase)
    if doc.get("report_written"):
        os.unlink(state_path(plan.run))
    else:
        write_state(plan.run, dict(state, record=doc))
    os._exit(0)  # the etcd threads are daemons, blocked in reads: do not wait for them


if __name__ == "__main__":
    sys.exit(main())
