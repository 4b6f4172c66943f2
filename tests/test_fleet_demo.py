"""The fleet demo's application and its checker on real ledgers (branches on loop mounts, moving
money over TCP), and `pyexec demo --hosts 4 --compare` end to end."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import needs_btrfs, needs_root, procs_matching

from pyexec.demo import bank, bankcheck
from pyexec.demo.sandbox import reflink

DB = "ledger.db"
OPENING = 100_000


class Branches:
    """Bank branches on loopback (one 127.x.y.z address per test), each on its own ext4 mount inside
    one outer btrfs, so a snapshot is a reflink of an image."""

    def __init__(self, mounts, n: int):
        self.outer = mounts.make("btrfs", 256)
        self.fs = {f"h{i}": mounts.make("ext4", 64, image_dir=self.outer.mountpoint) for i in range(1, n + 1)}
        self.dir = self.outer.mountpoint
        ip = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
        addr = {h: f"{ip}:{24200 + i}" for i, h in enumerate(self.fs)}
        self.procs: list[subprocess.Popen[bytes]] = []
        for h, fs in self.fs.items():
            argv = [sys.executable, "-m", "pyexec.demo.bank", "serve", "--host", h, "--db", os.path.join(fs.mountpoint, DB),
                    "--listen", addr[h], "--ctl", self.sock(h), "--balance", str(OPENING)]
            argv += [a for p in self.fs if p != h for a in ("--peer", f"{p}={addr[p]}")]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd="/")
            self.procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"

    def sock(self, h: str) -> str:
        return os.path.join(self.dir, f"{h}.sock")

    def stats(self, h: str) -> dict:
        reply = bank.ctl("stats", self.sock(h))
        return json.loads(reply.split(" ", 1)[1])

    def snap(self, h: str, tag: str) -> str:
        dst = os.path.join(self.dir, f"{tag}-{h}.img")
        reflink(self.fs[h].image, dst)
        return dst

    def wait_sent(self, h: str, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.stats(h)["sent"] < n:
            assert time.monotonic() < deadline, f"{h} did not send {n} transfers within {timeout}s"
            time.sleep(0.02)

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(10)


@pytest.fixture
def branches(mounts):
    made: list[Branches] = []

    def make(n: int) -> Branches:
        made.append(Branches(mounts, n))
        return made[-1]

    try:
        yield make
    finally:
        for b in made:
            b.close()


@needs_root
@needs_btrfs
def test_quiesced_cut_keeps_the_invariant(branches):
    """Every branch quiesced (its transfers drained), then each image cloned one after the other:
    the restored ledgers add up to the opening total and every transfer is in both or neither."""
    b = branches(3)
    for h in b.fs:
        b.wait_sent(h, 10)
    replies = [bank.ctl("quiesce", b.sock(h)) for h in b.fs]
    assert all(r.startswith("quiesced ") for r in replies), replies
    time.sleep(0.3)  # quiesced branches stay still: a late clone sees the same cut
    images = {h: b.snap(h, "q") for h in b.fs}
    for h in b.fs:
        assert bank.ctl("resume", b.sock(h)).startswith("resumed ")
    v = bankcheck.check(bankcheck.restore(images, os.path.join(b.dir, "work"), DB))
    assert v["invariant_holds"], v
    assert v["total_off"] == 0 and v["half_done"] == 0 and v["opening_total"] == 3 * OPENING
    assert v["complete"] >= 30 and all(x["integrity"] == "ok" for x in v["hosts"].values())
    b.wait_sent("h1", b.stats("h1")["sent"] + 3)  # resumed: transfers flow again


@needs_root
@needs_btrfs
def test_uncoordinated_cut_is_detected(branches):
    """h2 cloned, then h1 only after h1 debited 3 more transfers (all to h2, its one peer): those 3
    are in h1's ledger and cannot be credited in h2's, so the checker must report them half-done and
    the total off by what the half-done transfers explain."""
    b = branches(2)
    b.wait_sent("h1", 5)
    images = {"h2": b.snap("h2", "c")}
    b.wait_sent("h1", b.stats("h1")["sent"] + 3)
    images["h1"] = b.snap("h1", "c")
    v = bankcheck.check(bankcheck.restore(images, os.path.join(b.dir, "work"), DB))
    assert not v["invariant_holds"], v
    assert v["debited_not_credited"] >= 3 and v["half_done"] >= 3
    assert v["total_off"] != 0 or v["credited_not_debited"] > 0
    assert v["half_done_explain_total"], v
    assert "BROKEN" in bankcheck.summary(v)


@needs_root
@needs_btrfs
def test_demo_hosts_4_compare_end_to_end(tmp_path):
    """`pyexec demo --hosts 4 --compare --json`: every group run consistent and its restore keeps the
    invariant; the uncoordinated copies break it; nothing is left: no namespace, loop device, mount,
    process, run directory or etcd data."""
    r = subprocess.run([sys.executable, "-m", "pyexec.cli", "demo", "--hosts", "4", "--compare", "--rounds", "2",
                        "--json", "--dir", str(tmp_path)], capture_output=True, text=True, cwd="/", timeout=300)
    doc = json.loads(r.stdout)  # one JSON document and nothing else
    assert r.returncode == 0 and doc["ok"], r.stdout[-3000:] + r.stderr[-3000:]
    assert len(doc["rounds"]) == 2
    for rnd in doc["rounds"]:
        assert rnd["group"]["outcome"] == "consistent" and rnd["group_exit"] == 0
        assert sorted(rnd["group"]["hosts"]) == ["h1", "h2", "h3", "h4"]
        v = rnd["check"]
        assert v["invariant_holds"] and v["total_off"] == 0 and v["half_done"] == 0, v
        assert v["opening_total"] == 4 * 1_000_000 and v["complete"] > 0
        assert rnd["resumed"] and rnd["transfers_during_round"] > 0
    # Each uncoordinated cut spans tens of ms of traffic at ~100 transfers/s: one cut of the two
    # breaking is the least a correct checker sees; the totals must always add up to the half-done.
    unc = [rnd["uncoordinated"]["check"] for rnd in doc["rounds"]]
    assert any(not v["invariant_holds"] and v["half_done"] > 0 for v in unc), unc
    assert all(v["half_done_explain_total"] for v in unc)
    assert "invariant BROKEN" in r.stderr and "invariant HOLDS" in r.stderr
    assert_nothing_left(doc, tmp_path)


def assert_nothing_left(doc: dict, tmp_path) -> None:
    """No namespace of the demo's lab, loop device, mount or process of its sandbox, run directory
    or etcd data is left."""
    tag, sandbox = doc["lab"], doc["sandbox"]
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if ns.startswith(f"px{tag}-")]
    assert str(tmp_path) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in open("/proc/self/mountinfo").read()
    assert procs_matching(lambda argv: any(str(tmp_path).encode() in a or tag.encode() in a for a in argv)) == []
    assert not os.path.exists(f"/run/pyexec-{tag}") and not os.path.exists(f"/dev/shm/pyexec-etcd-{tag}")
    assert not os.path.exists(sandbox) and list(tmp_path.iterdir()) == []


@needs_root
@needs_btrfs
def test_demo_hosts_interrupted_in_a_group_run_leaves_nothing(tmp_path):
    """SIGINT (Ctrl-C) while the first group run holds the hosts quiesced or frozen, and again in the
    cleanup: the demo says interrupted in its one JSON document, and everything it made is gone."""
    p = subprocess.Popen([sys.executable, "-m", "pyexec.cli", "demo", "--hosts", "4", "--json", "--dir", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        seen = []
        deadline = time.monotonic() + 120
        assert p.stderr is not None
        while not any("round 1: pyexec group run" in line for line in seen):
            assert time.monotonic() < deadline and p.poll() is None, "".join(seen)
            seen.append(p.stderr.readline())
        time.sleep(1.0)  # inside the run: every branch's quiesce takes a python start, the go follows
        p.send_signal(signal.SIGINT)
        while not any("demo: cleaning up:" in line for line in seen):
            assert time.monotonic() < deadline and p.poll() is None, "".join(seen)
            seen.append(p.stderr.readline())
        p.send_signal(signal.SIGINT)  # a second Ctrl-C, in the cleanup: waits for it
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    doc = json.loads(out)
    assert p.returncode == 1 and doc["error"] == "interrupted" and not doc["ok"], "".join(seen) + err
    assert "cleanup_error" not in doc, doc["cleanup_error"]  # the second Ctrl-C did not cut it short
    assert "demo: interrupted: cleaning up" in "".join(seen)
    assert_nothing_left(doc, tmp_path)


@pytest.mark.parametrize("argv", [["--hosts", "1"], ["--hosts", "4", "--keep"], ["--hosts", "4", "--db", "mariadb"],
                                  ["--hosts", "4", "--no-quiesce"], ["--compare"]])
def test_demo_hosts_usage_errors(argv):
    """Combinations that make no fleet demo exit 2 with the demo's usage, before anything is built."""
    r = subprocess.run([sys.executable, "-m", "pyexec.cli", "demo", *argv], capture_output=True, text=True, cwd="/",
                       timeout=60)
    assert r.returncode == 2 and "usage: pyexec demo" in r.stderr and r.stdout == "", r.stderr


def test_demo_hosts_json_without_root_is_one_document():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "pyexec.cli", "demo", "--hosts", "4", "--json"], capture_output=True, text=True, cwd="/",
                       timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert json.loads(r.stdout) == {"hosts": 4, "rounds": [], "ok": False, "error": "needs root"}
