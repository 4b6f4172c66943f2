"""The fleet demo's site: simulated hosts (network namespaces of a netlab), each with its own ext4
loop mount inside one outer btrfs, its bank branch, its root-owned pyexec configs and its `pyexec
agent`; one etcd member; a coordinator node.  `close` removes all of it, whatever state it is in."""
from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import orjson

from pyexec.demo import bank, loopfs, processes
from pyexec.demo.etcdserver import EtcdCluster
from pyexec.demo.hostconf import write_host_config
from pyexec.demo.netlab import Lab, Node
from pyexec.demo.output import say, write_file
from pyexec.demo.sandbox import LoopSandbox

DB = "ledger.db"
PORT = 7000  # each branch's credit port, on its host's address
OPENING = 1_000_000  # each branch's opening balance
START_S = 20.0  # a branch or an agent must be up within this
MAX_QUIESCE_S = 30
MAX_FREEZE_S = 10
AGENT_STOP_S = 5.0
CMD_S = 120.0  # one `pyexec group run` (or one host's uncoordinated copy) ends within this

# The snapshot command each agent runs inside its host's freeze window: a reflink of the host's
# disk image; the run id is only put in the name once stripped to a file name's safe characters.
SNAP_SH = """#!/bin/sh
set -eu
run=$(printf %s "${{PYEXEC_GROUP_RUN:-none}}" | tr -cd 'A-Za-z0-9._-')
dst={snaps}/{host}-group-$run.img
cp --reflink=always {image} "$dst"
echo "$dst"
"""


def _children(pid: int) -> list[processes.Proc]:
    """pid's children (of every thread), each held by a pidfd so that no signal reaches a reused pid."""
    found = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    kids = []
    for c in found:
        try:
            p = processes.Proc(c)
        except OSError:
            continue  # gone already
        # The pidfd pins the pid: if its parent is still pid now, it is the child we saw.
        try:
            with open(f"/proc/{c}/stat", "rb") as f:
                parent = int(f.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            parent = -1
        if parent == pid:
            kids.append(p)
        else:
            p.close()
    return kids


class Host:
    """One simulated host: its node, disk, branch and agent."""

    def __init__(self, name: str, node: Node, fs: loopfs.LoopFS):
        self.name, self.node, self.fs = name, node, fs
        self.branch: subprocess.Popen[bytes] | None = None
        self.agent: subprocess.Popen[bytes] | None = None
        self.sock = ""
        self.agent_config = ""
        self.run_dir = ""


class FleetSite(LoopSandbox):
    """Build with `build()`; everything it made is in its fields, and `close()` removes it all."""

    def __init__(self, hosts: int, base: str | None):
        super().__init__("pyexec-fleet-demo-", base)
        self.tag = "fd" + secrets.token_hex(4)
        self.n = hosts
        self.lab: Lab | None = None
        self.etcd: EtcdCluster | None = None
        self.coordinator: Node | None = None
        self.hosts: dict[str, Host] = {}
        self.run_root = os.path.join("/run", f"pyexec-{self.tag}")  # tmpfs: never on a frozen disk
        self.snaps = ""

    # -- building ----------------------------------------------------------------------------------

    def build(self) -> None:
        """Sandbox, lab, etcd, configs, branches and agents, in that order (progress on stderr)."""
        self.build_outer()
        self.snaps = os.path.join(self.outer.mountpoint, "snapshots")
        os.mkdir(self.snaps, 0o700)
        say(f"network lab {self.tag}: {self.n} host namespaces + a coordinator on one bridge")
        self.lab = Lab(self.tag)
        for i in range(1, self.n + 1):
            name = f"h{i}"
            node = self.lab.add_node(name)
            fs = self._mount(os.path.join("outer", f"{name}.img"), name, "ext4", 64)
            self.hosts[name] = Host(name, node, fs)
        self.coordinator = self.lab.add_node("coord")
        say(f"hosts {', '.join(f'{h.name}={h.node.addr}' for h in self.hosts.values())}, each with its own "
            "ext4 disk (a loop image inside the outer btrfs)")
        t0 = time.monotonic()
        self.etcd = EtcdCluster(self.lab, members=1)
        say(f"etcd: 1 member at {', '.join(self.etcd.endpoints)} (healthy in {time.monotonic() - t0:.1f} s)")
        os.mkdir(self.run_root, 0o700)
        os.mkdir(os.path.join(self.run_root, "coord"), 0o700)
        ctl = os.path.join(self.dir, "ctl")
        os.mkdir(ctl, 0o700)
        for h in self.hosts.values():
            h.sock = os.path.join(ctl, f"{h.name}.sock")
            self._write_configs(h)
        say(f"starting the bank: a branch per host (opening balance {OPENING} each, total {OPENING * self.n}), "
            "moving money between hosts over TCP")
        for h in self.hosts.values():
            self._start_branch(h)
        say("starting one `pyexec agent` per host, in its namespace, with its own run directory")
        for h in self.hosts.values():
            self._start_agent(h)

    def _write_configs(self, h: Host) -> None:
        etc = os.path.join(self.dir, "etc", h.name)
        os.makedirs(etc, 0o700)
        # The module's file run as a script (-I: nothing from the environment), not `-m`, which would
        # import the pyexec package first: a fifth of a second of every hold, quiesce and resume.
        ctl = f"{sys.executable} -I {os.path.abspath(bank.__file__)} ctl"
        conf = write_host_config(etc, f"bank-{h.name}",
                                 f"# stop new transfers, drain those in flight (bounded)\n"
                                 f"exec {ctl} quiesce {h.sock}\n",
                                 f"exec {ctl} resume {h.sock}\n")
        snap = write_file(os.path.join(etc, "snap.sh"), SNAP_SH.format(snaps=self.snaps, host=h.name, image=h.fs.image),
                          0o700)
        assert self.etcd is not None
        doc = {"host": h.name, "etcd": {"endpoints": self.etcd.endpoints}, "hostConfig": conf,
               "mounts": [h.fs.mountpoint], "snapshotCommand": [snap], "maxQuiesceSeconds": MAX_QUIESCE_S,
               "maxFreezeSeconds": MAX_FREEZE_S}
        h.agent_config = write_file(os.path.join(etc, "agent.json"),
                                    orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode(), 0o600)
        h.run_dir = os.path.join(self.run_root, h.name)
        os.mkdir(h.run_dir, 0o700)

    def _start_branch(self, h: Host) -> None:
        assert self.lab is not None
        argv = [sys.executable, "-m", "pyexec.demo.bank", "serve", "--host", h.name,
                "--db", os.path.join(h.fs.mountpoint, DB), "--listen", f"{h.node.addr}:{PORT}", "--ctl", h.sock,
                "--balance", str(OPENING)]
        argv += [a for p in self.hosts.values() if p is not h for a in ("--peer", f"{p.name}={p.node.addr}:{PORT}")]
        h.branch = self.lab.popen(h.node, argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd="/")
        assert h.branch.stdout is not None
        if not select.select([h.branch.stdout], [], [], START_S)[0] or h.branch.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the bank branch of {h.name} did not start within {START_S:g} s")

    def _start_agent(self, h: Host) -> None:
        assert self.lab is not None
        env = dict(os.environ, PYEXEC_RUN_DIR=h.run_dir)
        log = open(os.path.join(self.dir, f"agent-{h.name}.log"), "ab")
        try:
            h.agent = self.lab.popen(h.node, [sys.executable, "-m", "pyexec.cli", "agent", "--config", h.agent_config],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env)
        finally:
            log.close()

    def agent_log(self, host: str, lines: int = 10) -> str:
        """The last lines of a host's agent log."""
        with contextlib.suppress(OSError), open(os.path.join(self.dir, f"agent-{host}.log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    # -- acting ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, Any]]:
        """Every branch's counters."""
        return {h.name: orjson.loads(bank.ctl("stats", h.sock).split(" ", 1)[1]) for h in self.hosts.values()}

    def group_run(self, timeout: float = CMD_S) -> tuple[int, dict[str, Any] | None, str]:
        """`pyexec group run` on the coordinator node: exit status, its JSON record (None if it printed
        none), stderr."""
        assert self.lab is not None and self.etcd is not None and self.coordinator is not None
        argv = [sys.executable, "-m", "pyexec.cli", "group", "run", "--etcd", ",".join(self.etcd.endpoints),
                "--hosts", ",".join(self.hosts), "--json"]
        r = self.lab.run(self.coordinator, argv, timeout=timeout, capture_output=True, cwd="/",
                         env=dict(os.environ, PYEXEC_RUN_DIR=os.path.join(self.run_root, "coord")))
        try:
            doc = orjson.loads(r.stdout)
        except orjson.JSONDecodeError:
            doc = None
        return r.returncode, doc if isinstance(doc, dict) else None, r.stderr.decode(errors="replace")

    def uncoordinated(self, tag: str) -> tuple[dict[str, str], float]:
        """Each host's image copied by reflink one after the other, in its own namespace, nothing
        quiesced or frozen (what a loop of `ssh host cp --reflink` gives): the images and the seconds
        from the first copy's start to the last one's end."""
        assert self.lab is not None
        images = {}
        t0 = time.monotonic()
        for h in self.hosts.values():
            dst = os.path.join(self.snaps, f"{h.name}-{tag}.img")
            r = self.lab.run(h.node, ["cp", "--reflink=always", h.fs.image, dst], timeout=CMD_S, capture_output=True)
            if r.returncode != 0:
                raise RuntimeError(f"uncoordinated copy of {h.name}: {r.stderr.decode(errors='replace').strip()}")
            images[h.name] = dst
        return images, time.monotonic() - t0

    # -- removing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Agents killed, disks thawed, branches and etcd killed, namespaces deleted, disks unmounted
        and detached, directories removed: every step tried, the first error raised."""
        steps: list[Any] = []
        steps.append(self._stop_agents)
        steps.append(self.thaw)  # an agent killed in its window leaves the thaw to its guardian: don't wait
        for h in self.hosts.values():
            if h.branch is not None:
                steps.append(lambda p=h.branch: self._kill(p))
        if self.etcd is not None:
            steps.append(self.etcd.close)
        if self.lab is not None:
            steps.append(self.lab.close)
        steps += [self.remove, lambda: shutil.rmtree(self.run_root, ignore_errors=True)]
        first: BaseException | None = None
        for step in steps:
            try:
                step()
            except BaseException as e:  # noqa: BLE001 - every step is tried, the first error raised
                first = first or e
        if first is not None:
            raise first

    def _stop_agents(self) -> None:
        # An agent's worker runs in its own session and outlives its agent by design (a restarted
        # agent does not end a run), holding its mount open up to its own bounds: the workers are
        # found while their agent still parents them, and stopped with it.  SIGTERM first, to all at
        # once: a worker thaws and runs its post-scripts, an agent leaves etcd.
        agents = [h.agent for h in self.hosts.values() if h.agent is not None and h.agent.returncode is None]
        workers = [w for a in agents for w in _children(a.pid)]
        try:
            for a in agents:
                with contextlib.suppress(ProcessLookupError):
                    a.terminate()
            for w in workers:
                w.kill(signal.SIGTERM)
            deadline = time.monotonic() + AGENT_STOP_S
            for a in agents:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    a.wait(max(0.0, deadline - time.monotonic()))
                self._kill(a)
            for w in workers:
                if not w.wait(max(0.0, deadline - time.monotonic())):
                    w.kill()
                    w.wait(processes.KILL_WAIT_S)
        finally:
            for w in workers:
                w.close()

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        assert self.lab is not None
        self.lab.kill(proc)
        if proc.stdout is not None:
            proc.stdout.close()
