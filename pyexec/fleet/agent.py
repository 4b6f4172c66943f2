"""`pyexec agent`: the long-running service on every host.  Registers the host under its lease,
watches for group runs that name it, and starts one worker process per run (one at a time: a
second run that names the host while it is in one is aborted, by this host).  A worker outlives
its agent (a restarted agent does not end a run); a worker that dies leaves its agent to abort the
run, to thaw once no commit can count the host frozen, and to run the post-scripts the worker
could not."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable

import orjson

from pyexec import host, journal, native, signals, steps, waits
from pyexec.fleet import agentconfig, etcd, protocol, worker

TICK_S = 0.5  # how often the loop looks at its lease and workers when nothing wakes it
AGENT_POLL_S = 2.0  # how often the agent reads the plans, besides watching them
GUARDIAN_GRACE_S = 5.0  # past a dead worker's bounds, how long its guardian may take to thaw and exit


@dataclasses.dataclass
class Job:
    """A worker process: this agent's child, or one it adopted (started by the agent before it)."""

    run: str
    plan: protocol.Plan
    pid: int
    pidfd: int  # readable once the worker has ended
    started_ns: int
    proc: subprocess.Popen[bytes] | None = None  # None: adopted, not this agent's child to reap


class Agent:
    """One host's agent."""

    def __init__(self, cfg: agentconfig.AgentConfig, say: Callable[[str], None]):
        self.cfg = cfg
        self.say = say
        self.client = etcd.Client(cfg.endpoints, cfg.tls)
        self.nat = native.default()
        self.lease: etcd.Lease | None = None
        self.job: Job | None = None
        self.seen: set[tuple[str, int]] = set()
        self.unsent: dict[str, dict[str, object]] = {}  # reports etcd did not take yet, by run
        self.name_taken = False  # said once: another agent holds this host's registration

    def register(self) -> bool:
        """(Re-)register under a new lease, only if no other agent holds the host's name; False if
        one does or etcd did not answer (this agent serves no plan until it is registered)."""
        key = protocol.host_key(self.cfg.prefix, self.cfg.host)
        lease = None
        ok = False
        try:
            # Two agents under one name (a cloned machine's config) would both run its part behind
            # one `ready` and one `frozen` key: the first `frozen` could commit the other unfrozen.
            held, _ = self.client.get(key)
            # This agent's own, on a lease it lost locally that etcd has not expired yet: its to renew.
            mine = bool(held) and self._own(held[0].value)
            if not held or mine:
                lease = etcd.Lease(self.client, protocol.LEASE_TTL_S, protocol.KEEPALIVE_S)
                ok, _ = self.client.txn([etcd.modified_at(key, held[0].mod_revision) if mine else etcd.absent(key)],
                                        [etcd.put_op(key, orjson.dumps(self._me()), lease.id)])
                if not ok:
                    held, _ = self.client.get(key)
        except (etcd.Unreachable, RuntimeError) as e:
            if lease is not None:
                lease.close()
            self.say(f"etcd: cannot register {self.cfg.host}: {e}")
            return False
        if not ok or lease is None:
            if lease is not None:
                lease.close()
            if not self.name_taken:
                holder = held[0].value.decode("utf-8", "replace")[:300] if held else "?"
                self.say(f"{self.cfg.host} is registered by another agent ({holder}): serving nothing until "
                         f"that registration ends (it goes with its agent's lease, {protocol.LEASE_TTL_S}s)")
            self.name_taken = True
            return False
        self.name_taken = False
        self.lease = lease
        self.say(f"registered {self.cfg.host} (lease {lease.id:x})")
        return True

    def _me(self) -> dict[str, object]:
        return {"host": self.cfg.host, "pid": os.getpid(), "node": os.uname().nodename,
                "max_quiesce_s": self.cfg.max_quiesce_s, "max_freeze_s": self.cfg.max_freeze_s}

    def _own(self, value: bytes) -> bool:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            return False
        return isinstance(doc, dict) and doc.get("pid") == os.getpid() and doc.get("node") == os.uname().nodename

    def adopt(self) -> None:
        """The workers an earlier agent of this host left (its restart): one still running is
        watched as this agent's own; one that died since gets what a dead worker gets."""
        for st in worker.read_states():
            try:
                plan = protocol.Plan.loads(str(st["plan"]).encode())
                pid, start, started_ns = int(st["pid"]), int(st["start"]), int(st["started_ns"])
            except (KeyError, TypeError, ValueError):
                continue
            try:
                pidfd = os.pidfd_open(pid) if journal.is_running(pid, start) else -1
            except OSError:
                pidfd = -1
            if pidfd >= 0 and journal.is_running(pid, start) and self.job is None:
                self.say(f"run {plan.run}: adopted its worker (pid {pid}), started by an earlier agent")
                self.job = Job(plan.run, plan, pid, pidfd, started_ns)
                continue
            if pidfd >= 0:
                os.close(pidfd)
            self.finished(Job(plan.run, plan, pid, -1, started_ns))

    def serve(self, cancel: signals.Cancel) -> int:
        """Until a signal: register, watch, start workers, clean up after dead ones."""
        self.adopt()
        # A plan seen late only lengthens the quiesce phase, never a window: the idle agent polls slowly.
        view = etcd.View(self.client, [protocol.plans_prefix(self.cfg.prefix)], 0, poll_s=AGENT_POLL_S)
        try:
            while not cancel.cancelled:
                if self.lease is None or self.lease.lost:
                    if self.lease is not None:
                        self.lease.close(revoke=False)
                    if not self.register():
                        self.lease = None
                view.drain()
                if self.lease is not None:  # registered: the name is this agent's to serve
                    self.plans(view)
                for run, doc in list(self.unsent.items()):
                    self.report(run, doc)
                fds = [view.fd] + ([self.job.pidfd] if self.job else [])
                ready = waits.wait_readable(fds, self.nat.now_ns() + native.ns_from_s(TICK_S), cancel.fd, self.nat)
                if self.job is not None and self.job.pidfd in ready:
                    self.finished(self.job)
                    self.job = None
        finally:
            view.close()
            if self.lease is not None:
                self.lease.close()
        self.say(f"stopped ({cancel.name}); a run in progress goes on in its own process" if self.job
                 else f"stopped ({cancel.name})")
        return 0

    def plans(self, view: etcd.View) -> None:
        """Start a worker for each new plan that names this host."""
        for kv in sorted(view.snapshot().values(), key=lambda kv: kv.create_revision):
            if (kv.key, kv.create_revision) in self.seen:
                continue
            self.seen.add((kv.key, kv.create_revision))
            try:
                plan = protocol.Plan.loads(kv.value)
            except ValueError as e:
                self.say(f"ignored a malformed plan at {kv.key}: {e}")
                continue
            if self.cfg.host not in plan.hosts or kv.key != protocol.run_key(self.cfg.prefix, plan.run, protocol.PLAN):
                continue
            if self.answered(plan.run):
                continue  # an earlier worker of this host (before this agent restarted) has it
            if self.job is not None:
                why = f"{self.cfg.host} is busy with group run {self.job.run}"
                self.say(f"run {plan.run}: busy with run {self.job.run}, aborting it for this host")
                aborted = self.host_abort(plan.run, why)
                self.report(plan.run, {"host": self.cfg.host, "run": plan.run, "outcome": "not run", "code": 0,
                                       "decision": "aborted" if aborted else "none", "group_decision": "aborted"
                                       if aborted else "unknown", "detail": why, "snapshot_id": ""})
                continue
            self.start(plan, kv.create_revision)

    def answered(self, run: str) -> bool:
        """Whether this host has keys in the run already."""
        try:
            kvs, _ = self.client.get(protocol.host_key(self.cfg.prefix, self.cfg.host, run), prefix=True)
        except (etcd.Unreachable, RuntimeError):
            return False
        return bool(kvs)

    def host_abort(self, run: str, why: str) -> bool:
        """Abort the run for this host unless it committed: whether the abort was applied."""
        try:
            return worker.host_abort(self.client, self.cfg.prefix, self.cfg.host, run, why,
                                     time.monotonic() + 3 * self.client.request_s)
        except (etcd.Unreachable, RuntimeError) as e:
            self.say(f"run {run}: could not write the abort: {e}")
            return False

    def start(self, plan: protocol.Plan, revision: int) -> None:
        """A worker for the plan, in its own session: a signal to the agent is not one to the run."""
        self.say(f"run {plan.run}: starting ({len(plan.hosts)} hosts)")
        proc = subprocess.Popen([sys.executable, "-m", "pyexec.fleet.worker", self.cfg.path, str(revision)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, cwd="/")
        assert proc.stdin is not None
        proc.stdin.write(plan.dumps())
        proc.stdin.close()
        self.job = Job(plan.run, plan, proc.pid, os.pidfd_open(proc.pid), self.nat.now_ns(), proc)

    def finished(self, job: Job) -> None:
        """A worker ended: done (its state file gone, or holding the record etcd did not take), or
        dead before its record (then this agent finishes its job, whoever started the worker)."""
        status: object = "?"
        if job.proc is not None:
            status = job.proc.wait()
        if job.pidfd >= 0:
            os.close(job.pidfd)
        st = next((s for s in worker.read_states() if s.get("run") == job.run), None)
        if st is None:
            self.say(f"run {job.run}: done")
            return
        record = st.get("record")
        if isinstance(record, dict):
            self.say(f"run {job.run}: {record.get('decision')}, {record.get('outcome')}")
            self.report(job.run, dict(record, report_written=True))
            os.unlink(worker.state_path(job.run))
            return
        phases = [str(p) for p in st.get("phases", [])]
        self.say(f"run {job.run}: the worker died ({status}) in phase {phases[-1:] or 'start'}")
        p = self.cfg.prefix
        aborted = self.host_abort(job.run, f"the run's worker on {self.cfg.host} died ({status})")
        committed = False
        try:
            committed = bool(self.client.get(protocol.run_key(p, job.run, protocol.COMMITTED))[0])
        except (etcd.Unreachable, RuntimeError):
            pass
        # The worker's guardian holds its window to the deadline (host.run's hold): a thaw before it,
        # in the instant before the abort above was applied, is what a commit could have missed.
        # Wait for the guardian to thaw and exit (bounded), then sweep what it could not thaw.
        bound = min(job.plan.quiesce_s, self.cfg.max_quiesce_s) + min(job.plan.freeze_s, self.cfg.max_freeze_s)
        end = job.started_ns + native.ns_from_s(bound + GUARDIAN_GRACE_S)
        while self.nat.now_ns() < end and any(running and doc.get("pid") == job.pid
                                              for _, doc, running in journal.journals()):
            waits.wait_readable([], min(end, self.nat.now_ns() + native.ns_from_s(TICK_S / 10)), -1, self.nat)
        thawed, _, _ = journal.recover(self.nat)
        post: list[steps.ScriptDict] = []
        # Started pre-scripts get their post-scripts: run again if the worker died while they ran
        # (a post-script killed half way may not have resumed the application).
        if "pre" in phases:
            checked = host.check(self.cfg.host_config)
            try:
                # A built-in quiescer's session ended with the worker: its server released the lock
                # or the backup mode then.  The scripts' post-scripts are this agent's to run.
                checked.plugins = [pc for pc in checked.plugins if pc.quiescer is None]
                if not checked.errors:
                    post = [r.as_dict() for r in host.run_phase(checked, "post", self.nat,
                                                                {"PYEXEC_SNAPSHOT": "failed"})]
            finally:
                checked.close()
        doc: dict[str, object] = {"host": self.cfg.host, "run": job.run, "outcome": "failed", "code": 0,
               "decision": "worker died", "group_decision": "committed" if committed else "aborted" if aborted else "unknown", "ended_on_own_deadline": False, "snapshot_id": "",
               "detail": f"the worker died ({status}); the agent aborted={aborted}, "
                         f"thawed {thawed or 'nothing'}, ran {len(post)} post-script(s)",
               "post": post, "phases_seen": phases}
        self.report(job.run, doc)
        os.unlink(worker.state_path(job.run))

    def report(self, run: str, doc: dict[str, object]) -> None:
        """This host's report of a run it did not (or could not) finish itself."""
        try:
            self.client.put(protocol.host_key(self.cfg.prefix, self.cfg.host, run, protocol.REPORT), orjson.dumps(doc),
                            deadline=time.monotonic() + self.client.request_s)
            self.unsent.pop(run, None)
        except (etcd.Unreachable, RuntimeError) as e:
            if run not in self.unsent:
                self.say(f"run {run}: could not write the report ({e}): trying again every {TICK_S:g}s")
            self.unsent[run] = doc


def main(config_path: str, say: Callable[[str], None]) -> int:
    """`pyexec agent`: load the config, serve until SIGTERM/SIGINT."""
    cfg = agentconfig.load(config_path)
    for w in cfg.warnings:
        say(f"warning: {cfg.path}: {w}")
    with signals.Cancel() as cancel:
        return Agent(cfg, say).serve(cancel)
