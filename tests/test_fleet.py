"""Group runs across simulated hosts (network namespaces, real etcd members, real agents, real loop
mounts): the protocol's promises when everything works, when a host says no, and under faults in
every phase.  Figures (time to writable after a fault, windows) are printed, not asserted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import orjson
import pytest
from fleetfixtures import etcd1, etcd3, etcd_tls, lab  # noqa: F401
from fleethelpers import PY, Fleet

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, loop mounts")


@pytest.fixture
def fleet3(etcd1, tmp_path):
    f = Fleet(etcd1, tmp_path, 3)
    try:
        yield f
    finally:
        f.close()


def windows_overlap(rec: dict) -> tuple[int, int]:
    """(latest FIFREEZE done, earliest first FITHAW) over every host, on this machine's one clock."""
    hosts = rec["hosts"].values()
    return max(h["stamps_ns"]["frozen"] for h in hosts), min(h["stamps_ns"]["thaw"] for h in hosts)


def stamp(host, what: str) -> float:
    return float(next(line.split()[1] for line in host.lines() if line.startswith(what + " ")))


def test_group_run_is_one_cut_with_the_overlap_proven(fleet3):
    rc, rec = fleet3.group()
    assert rc == 0 and rec["outcome"] == "consistent", rec.get("reason")
    ov = rec["coordinator"]["overlap"]
    assert ov["proven"] and ov["commit_applied_before_ms"] < ov["earliest_host_thaw_after_ms"]
    for h in fleet3.hosts:
        r = rec["hosts"][h.name]
        assert r["decision"] == "committed" and r["outcome"] == "app-consistent", r
        assert r["snapshot_id"] == f"snap-{h.name}-{rec['run']}"
        assert [line.split()[0] for line in h.lines()] == ["pre-start", "pre-end", "snap-start", "snap-end",
                                                           "post-start", "post-end"]
    # Every host frozen at once: the last FIFREEZE came before the first FITHAW (one clock here).
    last_frozen, first_thaw = windows_overlap(rec)
    assert last_frozen < first_thaw
    # Application-consistent: no host froze (ran its snapshot) before every host was quiesced.
    assert max(stamp(h, "pre-end") for h in fleet3.hosts) < min(stamp(h, "snap-start") for h in fleet3.hosts)
    print("windows ms:", {h: r["window_ms"] for h, r in rec["hosts"].items()},
          "commit after go ms:", ov["commit_applied_before_ms"])
    # The record is kept in etcd, and every host's report with it.
    assert fleet3.show(rec["run"])["outcome"] == "consistent"


def test_cut_command_runs_once_while_every_host_is_frozen(fleet3):
    rc, rec = fleet3.group("--cut-cmd", str(fleet3.cut))
    assert rc == 0 and rec["outcome"] == "consistent", rec.get("reason")
    assert rec["cut"]["stdout"]["text"].strip() == f"cut-{rec['run']}"
    lines = fleet3.cut_log.read_text().split("\n")
    t_cut = float(lines[0].split()[1])
    assert max(stamp(h, "snap-end") for h in fleet3.hosts) < t_cut  # every host had said frozen


def test_unknown_host_runs_nothing(fleet3):
    rc, rec = fleet3.group(hosts=["h0", "h1", "nosuch"])
    assert rc == 4 and rec["code"] == 323 and rec["outcome"] == "aborted"
    assert "nosuch" in rec["reason"]
    assert all(h.lines() == [] for h in fleet3.hosts)


def test_agent_not_running_is_named_and_nothing_runs(fleet3):
    h2 = fleet3.hosts[2]
    fleet3.lab.kill(h2.agent)
    fleet3.wait_for(lambda: "h2/agent" not in fleet3.etcdctl("get", "--prefix", "--keys-only", "/pyexec/h/").stdout,
                    "h2's registration to expire with its lease", 15)
    rc, rec = fleet3.group()
    assert rc == 4 and rec["code"] == 323 and "h2" in rec["reason"]
    assert all(h.lines() == [] for h in fleet3.hosts)


def test_one_host_pre_script_fails_aborts_everyone_and_resumes_everyone(fleet3):
    bad = fleet3.hosts[1]
    (bad.dir / "pre.sh").write_text("#!/bin/sh\necho \"pre-start $(date +%s.%N)\" >> " + str(bad.log) + "\nexit 3\n")
    rc, rec = fleet3.group()
    assert rc == 4 and rec["outcome"] == "aborted" and rec["aborted_by"] == "h1", rec
    for h in fleet3.hosts:
        assert h.count("snap-start") == 0  # nobody froze
        assert h.count("post-end") == 1, h.lines()  # everybody resumed
        assert rec["hosts"][h.name]["decision"] in ("aborted", "committed") or True
        assert rec["hosts"][h.name]["group_decision"] == "aborted"


def test_slow_pre_script_past_the_quiesce_bound_aborts(etcd1, tmp_path):
    f = Fleet(etcd1, tmp_path, 2, quiesce_s=2.0)
    try:
        f.hosts[1].hold("pre")
        rc, rec = f.group()
        f.hosts[1].release("pre")
        assert rc == 4 and rec["outcome"] == "aborted" and rec["aborted_by"] == "h1", rec
        assert "did not say ready" in rec["reason"]
        f.wait_workers_gone()
        for h in f.hosts:
            assert h.count("snap-start") == 0 and h.count("post-end") == 1, h.lines()
    finally:
        f.close()


def test_two_runs_overlapping_a_host(fleet3):
    h0, h1 = fleet3.hosts[0], fleet3.hosts[1]
    h0.hold("pre")
    a = fleet3.start_group(hosts=["h0", "h1"])
    fleet3.wait_for(lambda: h1.count("pre-end") == 1, "run A to quiesce h1")
    rc_b, rec_b = fleet3.group(hosts=["h1", "h2"])
    h0.release("pre")
    out, _ = a.communicate(timeout=60)
    rec_a = orjson.loads(out)
    assert rc_b == 4 and rec_b["outcome"] == "aborted" and rec_b["aborted_by"] == "h1"
    assert "busy" in rec_b["reason"]
    assert a.returncode == 0 and rec_a["outcome"] == "consistent", (rec_a.get("reason"), rec_a["hosts"])
    assert fleet3.hosts[2].count("post-end") == 1 and fleet3.hosts[2].count("snap-start") == 0


def test_a_plan_cannot_name_a_command_or_lengthen_a_bound(fleet3):
    """Whoever can write to etcd writes a plan with a command and a day-long freeze bound: the hosts run
    their own snapshot command and keep their own (shorter) bounds."""
    marker = fleet3.tmp / "owned"
    run = "forged1"
    plan = {"run": run, "hosts": ["h0"], "quiesce_s": 86400, "freeze_s": 86400,
            "snapshotCommand": ["/bin/touch", str(marker)], "hostConfig": "/nonexistent",
            "mounts": ["/"], "command": f"touch {marker}"}
    fleet3.etcdctl("put", f"/pyexec/plans/{run}", json.dumps(plan))
    h0 = fleet3.hosts[0]
    fleet3.wait_for(lambda: h0.count("pre-end") == 1, "h0 to take the plan")
    fleet3.etcdctl("put", f"/pyexec/runs/{run}/go", "{}")
    # No commit ever comes: h0 holds to ITS bound (3 s), not the plan's day.
    fleet3.wait_for(lambda: h0.count("post-end") == 1, "h0 to end the forged run", 30)
    rep = orjson.loads(fleet3.etcdctl("get", "--print-value-only", f"/pyexec/h/h0/runs/{run}/report").stdout)
    assert rep["freeze_s"] == fleet3.freeze_s and rep["quiesce_s"] == fleet3.quiesce_s
    assert rep["decision"] == "deadline" and rep["ended_on_own_deadline"]
    assert rep["snapshot_id"] == f"snap-h0-{run}"  # its own command ran, from its own config
    assert not marker.exists()
    assert h0.writable_after(5) is not None


def test_library_group_run_from_the_coordinator_node(fleet3):
    code = ("import pyexec, json, sys; r = pyexec.group_run(sys.argv[1], sys.argv[2], freeze_timeout=3, "
            "quiesce_timeout=10); print(json.dumps(r))")
    p = fleet3.lab.run(fleet3.coord, [PY, "-c", code, ",".join(fleet3.cluster.endpoints), "h0,h1,h2"],
                       timeout=60, cwd="/", capture_output=True)
    rec = json.loads(p.stdout)
    assert rec["outcome"] == "consistent", (rec.get("reason"), p.stderr[-2000:])
    code = ("import asyncio, pyexec, json, sys\n"
            "async def main():\n"
            "    t = asyncio.ensure_future(pyexec.group_run_async(sys.argv[1], sys.argv[2], freeze_timeout=3))\n"
            "    await asyncio.sleep(0.3)\n"  # quiesced, waiting: cancel it
            "    t.cancel()\n"
            "    try:\n        await t\n    except asyncio.CancelledError:\n        print('cancelled')\n"
            "asyncio.run(main())\n")
    fleet3.hosts[0].hold("pre")
    p = fleet3.lab.run(fleet3.coord, [PY, "-c", code, ",".join(fleet3.cluster.endpoints), "h0,h1,h2"],
                       timeout=60, cwd="/", capture_output=True)
    fleet3.hosts[0].release("pre")
    assert p.stdout.strip() == b"cancelled", p.stderr[-2000:]
    fleet3.wait_workers_gone()
    for h in fleet3.hosts:
        # The first run froze once; the cancelled one froze nobody and resumed everybody.
        assert h.count("snap-start") == 1 and h.count("post-end") == h.count("pre-start") == 2, h.lines()


def test_tls_member_with_each_agent_held_to_its_own_keys(etcd_tls, tmp_path):
    """TLS with client certificates, etcd's auth on, one role per host (docs/fleet.md, roles)."""
    etcd_tls.fleet_roles(["h0", "h1"])
    f = Fleet(etcd_tls, tmp_path, 2)
    try:
        rc, rec = f.group()
        assert rc == 0 and rec["outcome"] == "consistent", rec.get("reason")
        # h0's own credentials: its keys yes, h1's and the run's decision no.
        code = ("import sys, orjson\nfrom pyexec.fleet import agentconfig, etcd\n"
                "cfg = agentconfig.load(sys.argv[1]); c = etcd.Client(cfg.endpoints, cfg.tls)\n"
                "out = {}\n"
                "for k in sys.argv[2:]:\n"
                "    try:\n        c.put(k, b'x'); out[k] = 'written'\n"
                "    except RuntimeError as e:\n        out[k] = 'refused' if 'permission denied' in str(e) else str(e)\n"
                "print(orjson.dumps(out).decode())\n")
        keys = ["/pyexec/h/h0/x", "/pyexec/h/h1/x", f"/pyexec/runs/{rec['run']}/committed", "/pyexec/plans/r2"]
        p = f.lab.run(f.hosts[0].node, [PY, "-c", code, str(f.hosts[0].agent_conf), *keys], timeout=30, cwd="/",
                      capture_output=True)
        assert orjson.loads(p.stdout) == {keys[0]: "written", keys[1]: "refused", keys[2]: "refused",
                                          keys[3]: "refused"}, p.stderr[-2000:]
        # Without the password, or without a certificate, nothing.
        bad = dict(orjson.loads(f.hosts[0].agent_conf.read_bytes()))
        (tmp_path / "wrong.password").write_text("wrong")
        os.chmod(tmp_path / "wrong.password", 0o600)
        bad["etcd"] = dict(bad["etcd"], passwordFile=str(tmp_path / "wrong.password"))
        f.hosts[0].agent_conf.write_bytes(orjson.dumps(bad))
        p = f.lab.run(f.hosts[0].node, [PY, "-c", code, str(f.hosts[0].agent_conf), keys[0]], timeout=30, cwd="/",
                      capture_output=True)
        assert b"refused user" in p.stdout + p.stderr, p.stderr[-1000:]
    finally:
        f.close()


def test_view_of_many_prefixes_misses_no_event(etcd1):
    """The coordinator watches a stream per host: one stream's later event must not hide another's
    earlier one (the poll is slowed to nothing here, so only the watches can deliver)."""
    node = etcd1.lab.add_node("viewer")
    code = ("import sys, time\nfrom pyexec.fleet import etcd\n"
            "c = etcd.Client(sys.argv[1:])\n"
            "pre = [f'/v/p{i}/' for i in range(8)]\n"
            "v = etcd.View(c, pre, 0, poll_s=3600)\n"
            "want = set()\n"
            "for n in range(20):\n"
            "    for p in reversed(pre):\n"
            "        c.put(f'{p}{n}', b'x'); want.add(f'{p}{n}')\n"
            "t = time.monotonic() + 20\n"
            "while time.monotonic() < t and not want <= set(v.snapshot()):\n"
            "    time.sleep(0.05)\n"
            "print(len(want - set(v.snapshot())))\n")
    p = etcd1.lab.run(node, [PY, "-c", code, *etcd1.endpoints], timeout=60, cwd="/", capture_output=True)
    assert p.stdout.strip() == b"0", (p.stdout, p.stderr[-2000:])


def test_bad_arguments_are_one_error_never_a_traceback(fleet3):
    for argv, code in ((["--hosts", "h0,,h1"], 11), (["--hosts", "h0", "--freeze-timeout", "nan"], 11),
                       (["--hosts", "../x"], 11), (["--hosts", "h0", "--cut-cmd", "/no/such"], 11)):
        full = [PY, "-m", "pyexec.cli", "group", "run", "--etcd", fleet3.cluster.endpoints[0], "--json", *argv]
        p = fleet3.lab.run(fleet3.coord, full, timeout=30, cwd="/", capture_output=True)
        assert p.returncode == 2 and b"Traceback" not in p.stderr, p.stderr
        assert orjson.loads(p.stdout)["code"] == code
    p = subprocess.run([PY, "-m", "pyexec.cli", "group", "run", "--etcd", "http://127.0.0.1:9", "--hosts", "h0",
                        "--json"], cwd="/", capture_output=True, timeout=60)
    assert p.returncode == 4 and orjson.loads(p.stdout)["code"] == 322 and b"Traceback" not in p.stderr


def test_agent_config_problems_are_named(tmp_path):
    cfg = tmp_path / "agent.json"
    for text, mode, code in (('{"host": "h0"}', 0o600, 320), ('{"etcd": {"endpoints": ["ftp://x"]}}', 0o600, 320),
                             ('{"etcd": {"endpoints": ["http://127.0.0.1:9"]}, "host": "a/b"}', 0o600, 320),
                             ('not json', 0o600, 320),
                             ('{"etcd": {"endpoints": ["http://127.0.0.1:9"]}}', 0o666, 321)):
        cfg.write_text(text)
        os.chmod(cfg, mode)
        p = subprocess.run([PY, "-m", "pyexec.cli", "agent", "--config", str(cfg)], cwd="/", capture_output=True,
                           timeout=30)
        assert p.returncode != 0 and f"{code}  ".encode() in p.stderr and b"Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("target,phase,sig", [("worker", "go", "SIGTERM"), ("worker", "quiesce", "SIGINT"),
                                              ("coordinator", "commit", "SIGINT"), ("coordinator", "quiesce", "SIGTERM"),
                                              ("agent", "go", "SIGTERM")])
def test_signals(target, phase, sig, etcd1, tmp_path):
    """A signal is not a SIGKILL: the signalled part aborts the run first (a host never thaws before
    its abort is applied), every host thaws and resumes; an agent's stop does not end a run."""
    f = Fleet(etcd1, tmp_path, 3)
    try:
        h0 = f.hosts[0]
        held = PHASES[phase]
        f.cut_hold.touch() if held == "cut" else h0.hold(held)
        coord = f.start_group(*(["--cut-cmd", str(f.cut)] if phase == "commit" else []))
        f.wait_for((lambda: f.cut_log.exists()) if held == "cut" else (lambda: h0.count(f"{held}-start") >= 1),
                   f"the {phase} phase", 30)
        signum = getattr(signal, sig)
        pids = {"worker": h0.workers(), "coordinator": [coord.pid], "agent": [h0.agent.pid]}[target]
        assert pids
        for pid in pids:
            os.kill(pid, signum)
        time.sleep(0.3)
        f.cut_hold.unlink(missing_ok=True)
        h0.release(held)
        out, err = coord.communicate(timeout=90)
        rec = orjson.loads(out)
        f.wait_workers_gone()
        for h in f.hosts:
            assert h.writable_after(10) is not None
            assert h.count("post-end") >= 1 and h.count("post-end") >= h.count("pre-start") >= 1, h.lines()
        if target == "agent":
            assert rec["outcome"] == "consistent", rec["reason"]
        else:
            assert rec["outcome"] == "aborted", rec
            assert all(r["group_decision"] == "aborted" for r in rec["hosts"].values()), rec["hosts"]
            assert all(h.count("snap-start") <= 1 for h in f.hosts)
        if target == "coordinator":
            assert coord.returncode == 128 + signum, err[-2000:]
        if target == "worker":
            assert rec["aborted_by"] == "h0" and "signalled" in rec["reason"], rec["reason"]
    finally:
        f.close()


# -- faults in every phase ---------------------------------------------------------------------------

PHASES = {
    # phase: (what is held, the marker that says the fleet is in that phase)
    "quiesce": "pre",   # h0's pre-script runs; h1, h2 quiesced, waiting for go
    "go": "snap",       # go written; h0 frozen, its snapshot command running; h1, h2 said frozen
    "commit": "cut",    # every host said frozen; the coordinator's cut command runs, the commit next
    "post": "post",     # the decision made, h0 thawed; its post-script runs
}
FAULTS = ["coordinator", "agent", "worker", "partition", "leader", "etcd"]


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_in_every_phase(fault, phase, request, tmp_path):
    cluster = request.getfixturevalue("etcd3" if fault == "leader" else "etcd1")
    f = Fleet(cluster, tmp_path, 3)
    try:
        _fault_scenario(f, fault, phase)
    finally:
        f.close()


def _fault_scenario(f: Fleet, fault: str, phase: str) -> None:
    h0 = f.hosts[0]
    held = PHASES[phase]
    if held == "cut":
        f.cut_hold.touch()
    else:
        h0.hold(held)
    coord = f.start_group(*(["--cut-cmd", str(f.cut)] if phase == "commit" else []))
    marker = (lambda: f.cut_log.exists()) if held == "cut" else (lambda: h0.count(f"{held}-start") >= 1)
    f.wait_for(marker, f"the {phase} phase", 30)
    time.sleep(0.2)
    t_fault = time.monotonic()
    if fault == "coordinator":
        f.lab.kill(coord)
    elif fault == "agent":
        f.lab.kill(h0.agent)
    elif fault == "worker":
        for pid in h0.workers():
            os.kill(pid, 9)
    elif fault == "partition":
        f.lab.partition(h0.node)
    elif fault == "leader":
        f.cluster.kill(f.cluster.leader())
    elif fault == "etcd":
        f.cluster.kill_all()
    time.sleep(0.3)
    h0.release(held) if held != "cut" else f.cut_hold.unlink()
    if fault == "partition":
        time.sleep(2.0)
        f.lab.heal(h0.node)
    # Writable within each host's own bound (quiesce + freeze), whatever the fault: figures printed.
    to_writable = {h.name: h.writable_after(f.quiesce_s + f.freeze_s + 10) for h in f.hosts}
    rec = None
    if coord.returncode is None and fault != "coordinator":
        out, _ = coord.communicate(timeout=90)
        rec = orjson.loads(out) if out else None
    f.wait_workers_gone(90)
    if fault == "etcd":
        for i in range(len(f.cluster.endpoints)):
            f.cluster.start(i)
    if fault == "agent":
        h0.start_agent()
    # A report etcd could not take (partitioned, or etcd down) is sent again by the host's agent.
    f.wait_for(lambda: all(_has_report(f, h.name) for h in f.hosts), "every host's report", 20)
    kept = f.show(json.loads(json.dumps(rec))["run"] if rec else _run_id(f))
    rec = rec or kept
    hosts = kept["hosts"]
    row = {"fault": fault, "phase": phase, "outcome": rec["outcome"], "reason": rec.get("reason"),
           "decisions": {h: r.get("decision") for h, r in hosts.items()},
           "group_decisions": {h: r.get("group_decision") for h, r in hosts.items()},
           "to_writable_s": {h: round(t, 3) if t is not None else None for h, t in to_writable.items()},
           "since_fault_s": round(time.monotonic() - t_fault, 2)}
    print("FAULT-ROW", json.dumps(row))
    for h in f.hosts:
        assert to_writable[h.name] is not None, f"{h.name} still frozen: {row}"
        # Every host whose pre-script started ran its post-script to its end.
        if h.count("pre-start"):
            assert h.count("post-end") >= 1, (h.name, h.lines(), row)
    if rec["outcome"] == "consistent":
        assert rec["coordinator"]["overlap"]["proven"]
        with_stamps = [r for r in hosts.values() if r.get("stamps_ns", {}).get("thaw")]
        if len(with_stamps) == len(f.hosts):
            last_frozen, first_thaw = windows_overlap({"hosts": hosts})
            assert last_frozen < first_thaw, row
    else:
        assert rec["outcome"] in ("aborted", "failed", "undecided", "unproven"), row
    # All hosts' records agree: the run committed for all of them or for none.
    committed = {h: r.get("group_decision") == "committed" or r.get("decision") == "committed"
                 for h, r in hosts.items() if r.get("decision") not in (None, "unknown", "worker died")}
    assert len(set(committed.values())) <= 1, row
    if rec["outcome"] == "consistent":
        assert all(committed.values()), row


def _has_report(f: Fleet, host: str) -> bool:
    keys = f.etcdctl("get", "--prefix", "--keys-only", f"/pyexec/h/{host}/runs/").stdout.split()
    return any(k.endswith("/report") for k in keys)


def _run_id(f: Fleet) -> str:
    keys = f.etcdctl("get", "--prefix", "--keys-only", "/pyexec/h/").stdout.split()
    ids = {k.split("/")[5] for k in keys if k.count("/") == 6}
    assert len(ids) == 1, ids
    return ids.pop()
