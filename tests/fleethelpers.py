"""A simulated fleet for the group-run tests: N hosts, each a lab node with its own loop mount,
plugin (pre/post-scripts that log and can be held), snapshot command (logs, can be held), agent
config and a real `pyexec agent`; the coordinator runs in its own node.  Everything it starts is
stopped at close, the agents' workers included (they run in their own sessions)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from pyexec.demo import loopfs

PY = sys.executable
HOLD_SCRIPT = """#!/bin/sh
# {phase}: log, then wait while the test holds this phase (bounded by pyexec's own timeouts)
echo "{phase}-start $(date +%s.%N) $PYEXEC_GROUP_RUN" >> {log}
n=0
while [ -e {hold} ] && [ $n -lt 3000 ]; do sleep 0.01; n=$((n+1)); done
{extra}
echo "{phase}-end $(date +%s.%N)" >> {log}
"""


def write(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


class Host:
    """One simulated host's files, mount and agent."""

    def __init__(self, fleet: Fleet, i: int):
        self.fleet = fleet
        self.name = f"h{i}"
        self.node = fleet.lab.add_node(self.name)
        self.dir = fleet.tmp / self.name
        self.dir.mkdir(mode=0o755)
        self.log = self.dir / "log"
        self.run_dir = f"/run/pyexec-fleet-{fleet.lab.tag}-{self.name}"
        self.fs = loopfs.LoopFS(str(self.dir / "img"), str(self.dir / "mnt"), "ext4", 16)
        fleet.mounts.append(self.fs)
        scripts = {}
        for phase, extra in (("pre", ""), ("post", ""), ("snap", "echo snap-$PYEXEC_HOST-$PYEXEC_GROUP_RUN")):
            scripts[phase] = write(self.dir / f"{phase}.sh", HOLD_SCRIPT.format(
                phase=phase, log=self.log, hold=self.hold_path(phase), extra=extra), 0o700)
        plugin = {"pluginName": "S", "preScriptLocation": str(scripts["pre"]), "postScriptLocation": str(scripts["post"]),
                  "timeoutInSeconds": 30, "continueBackupOnFailure": True, "fsFreezeEnabled": True}
        pj = write(self.dir / "plugin.json", json.dumps(plugin), 0o600)
        self.host_conf = write(self.dir / "host.conf", f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\n"
                               f"pluginName0 = S\npluginPath0 = {self.dir}\npluginConfigPath0 = {pj}\n", 0o600)
        cfg = {"host": self.name, "etcd": {"endpoints": fleet.cluster.endpoints}, "hostConfig": str(self.host_conf),
               "mounts": [self.fs.mountpoint], "snapshotCommand": fleet.snapshot_cmd or [str(scripts["snap"])],
               "maxFreezeSeconds": fleet.freeze_s, "maxQuiesceSeconds": fleet.quiesce_s}
        cfg["etcd"].update(fleet.tls_files(self.name))
        self.agent_conf = write(self.dir / "agent.json", json.dumps(cfg), 0o600)
        self.agent: subprocess.Popen[bytes] | None = None

    def hold_path(self, phase: str) -> Path:
        return self.dir / f"hold-{phase}"

    def hold(self, phase: str) -> None:
        self.hold_path(phase).touch()

    def release(self, phase: str) -> None:
        self.hold_path(phase).unlink(missing_ok=True)

    def start_agent(self) -> None:
        env = dict(os.environ, PYEXEC_RUN_DIR=self.run_dir)
        self.agent = self.fleet.lab.popen(self.node, [PY, "-m", "pyexec.cli", "agent", "--config", str(self.agent_conf)],
                                          env=env, cwd="/", stderr=open(self.dir / "agent.log", "ab"))

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def count(self, what: str) -> int:
        return sum(1 for line in self.lines() if line.startswith(what + " "))

    def workers(self) -> list[int]:
        """The pids of this host's run workers (their argv names this host's agent config)."""
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pyexec.fleet.worker" in argv and str(self.agent_conf).encode() in argv:
                out.append(int(pid))
        return out

    def writable_after(self, timeout: float) -> float | None:
        """Seconds until a write + fsync to the mount completed, or None if not within timeout (then
        the mount is thawed by force so that the test can go on)."""
        t0 = time.monotonic()
        done = threading.Event()

        def write_once() -> None:
            fd = os.open(os.path.join(self.fs.mountpoint, "probe"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)
            done.set()
        t = threading.Thread(target=write_once, daemon=True)
        t.start()
        if done.wait(timeout):
            return time.monotonic() - t0
        self.fs.thaw()
        t.join(10)
        return None


class Fleet:
    """N hosts and a coordinator node on a cluster's lab."""

    def __init__(self, cluster, tmp: Path, n: int, freeze_s: float = 3.0, quiesce_s: float = 10.0,
                 tls_users: bool = False, snapshot_cmd: list[str] | None = None):
        self.cluster = cluster
        # None: each host's logging, holdable snap.sh; the benchmarks give a no-op (/bin/true).
        self.snapshot_cmd = snapshot_cmd
        self.lab = cluster.lab
        self.tmp = tmp
        self.freeze_s = freeze_s
        self.quiesce_s = quiesce_s
        self.tls_users = tls_users
        self.mounts: list[loopfs.LoopFS] = []
        self.hosts: list[Host] = []
        self.coord = self.lab.add_node("coord")
        self.cut_log = tmp / "cut.log"
        self.cut_hold = tmp / "hold-cut"
        self.cut = write(tmp / "cut.sh", HOLD_SCRIPT.format(phase="cut", log=self.cut_log, hold=self.cut_hold,
                                                            extra="echo cut-$PYEXEC_GROUP_RUN"), 0o700)
        try:
            for i in range(n):
                self.hosts.append(Host(self, i))
            for h in self.hosts:
                h.start_agent()
            self.wait_registered()
        except BaseException:
            self.close()
            raise

    def tls_files(self, user: str) -> dict[str, str]:
        """The agent config's etcd files: the CA and the gateway's CN-less client certificate; with
        the cluster's auth on, the user and a root-only password file."""
        if self.cluster.scheme != "https":
            return {}
        cert, key = self.cluster.gateway_cert()
        out = {"ca": str(self.cluster.ca), "cert": str(cert), "key": str(key)}
        if user in self.cluster.passwords:
            pw = write(self.tmp / f"{user}.password", self.cluster.passwords[user], 0o600)
            out.update(user=user, passwordFile=str(pw))
        return out

    def coordinator_tls_args(self) -> list[str]:
        f = self.tls_files("coordinator")
        args = ["--cacert", f["ca"], "--cert", f["cert"], "--key", f["key"]] if f else []
        if "user" in f:
            args += ["--user", f["user"], "--password-file", f["passwordFile"]]
        return args

    def wait_registered(self, timeout: float = 20.0) -> None:
        """Until every agent's registration is in etcd (bounded)."""
        names = {h.name for h in self.hosts}
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            r = self.etcdctl("get", "--prefix", "--keys-only", "/pyexec/h/")
            found = {k.split("/")[3] for k in r.stdout.split() if k.endswith("/agent")}
            if names <= found:
                return
            time.sleep(0.2)
        raise AssertionError(f"agents not registered within {timeout}s: {names - found}; logs: " +
                             " | ".join((h.dir / "agent.log").read_text()[-500:] for h in self.hosts))

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cluster.etcdctl(*args)

    def group_argv(self, *extra: str, hosts: list[str] | None = None) -> list[str]:
        return [PY, "-m", "pyexec.cli", "group", "run", "--etcd", ",".join(self.cluster.endpoints),
                "--hosts", ",".join(hosts or [h.name for h in self.hosts]), "--freeze-timeout", str(self.freeze_s),
                "--quiesce-timeout", str(self.quiesce_s), "--json", *self.coordinator_tls_args(), *extra]

    def start_group(self, *extra: str, hosts: list[str] | None = None) -> subprocess.Popen[bytes]:
        return self.lab.popen(self.coord, self.group_argv(*extra, hosts=hosts), cwd="/", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)

    def group(self, *extra: str, hosts: list[str] | None = None, timeout: float = 90) -> tuple[int, dict]:
        """One group run from the coordinator's node: (exit status, record)."""
        p = self.lab.run(self.coord, self.group_argv(*extra, hosts=hosts), timeout=timeout, cwd="/",
                         capture_output=True)
        assert p.stdout, f"no record (rc {p.returncode}): {p.stderr.decode()[-2000:]}"
        return p.returncode, orjson.loads(p.stdout)

    def show(self, run_id: str) -> dict:
        p = self.lab.run(self.coord, [PY, "-m", "pyexec.cli", "group", "show", "--etcd", ",".join(self.cluster.endpoints),
                                      "--hosts", ",".join(h.name for h in self.hosts), "--run-id", run_id, "--json",
                                      *self.coordinator_tls_args()], timeout=60, cwd="/", capture_output=True)
        assert p.stdout, p.stderr.decode()[-2000:]
        return orjson.loads(p.stdout)

    def wait_for(self, pred, what: str, timeout: float = 30.0) -> None:
        t_end = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > t_end:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def wait_workers_gone(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda: not any(h.workers() for h in self.hosts), "every run worker to end", timeout)

    def close(self) -> None:
        """Release every hold, stop agents and workers, thaw and detach every mount."""
        first: BaseException | None = None
        steps = []
        for h in self.hosts:
            steps += [lambda h=h: [h.release(p) for p in ("pre", "post", "snap")]]
        steps.append(lambda: self.cut_hold.unlink(missing_ok=True))
        steps += [lambda h=h: h.agent and self.lab.kill(h.agent) for h in self.hosts]
        steps += [lambda h=h: [os.kill(pid, signal.SIGKILL) for pid in h.workers()] for h in self.hosts]
        steps += [m.thaw for m in self.mounts]
        steps += [lambda: time.sleep(0.2)]
        steps += [m.close for m in reversed(self.mounts)]
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - kept and raised once everything is released
                first = first or e
        if first is not None:
            raise first
