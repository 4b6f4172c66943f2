"""A simulated network of hosts: network namespaces on one private Linux bridge.

Every address the lab hands out sits on a veth inside a namespace the lab made, in a private /24 of
10.200.0.0-10.254.255.0 no other namespace on the machine uses; the root namespace gets no address,
no route and no interface.  Commands run in a node's network namespace only (nsenter --net), so they
see the same mounts as their caller: pyexec's freezes act on the mounts a test made."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import ipaddress
import os
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

NETNS_DIR = "/run/netns"
# Two Labs of two processes pick their subnet under this lock, and hold it until the bridge
# namespace carries the subnet's first address: the next one's scan then sees it as taken.
_LOCK = "/run/pyexec-netlab.lock"
_BRIDGE = "br0"
_IFACE = "eth0"  # a node's end of its veth, inside the node's namespace


class NetLabError(RuntimeError):
    """A lab step (ip, nsenter) failed; the message names the command and its stderr."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One simulated host: its lab name, its namespace and its one address."""

    name: str
    ns: str
    addr: str
    port: str  # its veth's end on the bridge, in the bridge namespace


def _ip(*args: str) -> str:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise NetLabError(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p.stdout


def netns_list() -> list[str]:
    """The names of every named network namespace on the machine (`ip netns list`)."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _used_subnets() -> set[ipaddress.IPv4Network]:
    """The /24s of every IPv4 address and route in the root namespace and every named namespace."""
    used: set[ipaddress.IPv4Network] = set()

    def scan(prefix: list[str]) -> None:
        for cmd in (["-o", "-4", "addr", "show"], ["-4", "route", "show", "table", "all"]):
            try:
                out = _ip(*prefix, *cmd)
            except NetLabError:
                continue  # a namespace deleted while we looked
            for word in out.split():
                try:
                    net = ipaddress.ip_network(word, strict=False)
                except ValueError:
                    continue
                if isinstance(net, ipaddress.IPv4Network) and net.prefixlen >= 8:
                    used.add(net.supernet(new_prefix=24) if net.prefixlen > 24 else net)

    scan([])
    for ns in netns_list():
        scan(["-n", ns])
    return used


def _pick_subnet(tag: str) -> ipaddress.IPv4Network:
    used = _used_subnets()
    seed = int.from_bytes(hashlib.sha256(f"{tag}/{os.getpid()}".encode()).digest()[:4], "big")
    for i in range(55 * 256):
        n = (seed + i) % (55 * 256)
        net = ipaddress.IPv4Network(f"10.{200 + n // 256}.{n % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetLabError("no free /24 left in 10.200.0.0-10.254.255.0")


class Lab:
    """A bridge namespace and the node namespaces on it; every process, veth and namespace is its own."""

    def __init__(self, tag: str) -> None:
        if not tag or not all(c.isalnum() for c in tag) or len(tag) > 20:
            raise ValueError(f"lab tag must be 1-20 letters or digits: {tag!r}")
        self.tag = tag
        self.bridge_ns = f"px{tag}-bridge"
        self.nodes: dict[str, Node] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._namespaces: list[str] = []
        self._closed = False
        with open(_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = _pick_subnet(tag)
            try:
                self._add_ns(self.bridge_ns)
                _ip("-n", self.bridge_ns, "link", "add", _BRIDGE, "type", "bridge", "forward_delay", "0")
                # The bridge holds the subnet's .1 so that the next Lab's scan sees the /24 as taken.
                _ip("-n", self.bridge_ns, "addr", "add", f"{self.subnet[1]}/24", "dev", _BRIDGE)
                _ip("-n", self.bridge_ns, "link", "set", _BRIDGE, "up")
            except BaseException:
                self.close()
                raise

    @property
    def prefix(self) -> str:
        """The subnet in CIDR notation, e.g. 10.213.7.0/24."""
        return str(self.subnet)

    def _add_ns(self, ns: str) -> None:
        if ns in netns_list():
            raise NetLabError(f"network namespace {ns} already exists: another lab with tag {self.tag}?")
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_node(self, name: str) -> Node:
        """A new host on the bridge: namespace px<tag>-<name>, lo up, one veth with the next address."""
        if self._closed:
            raise NetLabError("lab is closed")
        if not name or not all(c.isalnum() for c in name) or name in self.nodes or name == "bridge":
            raise ValueError(f"node name must be new, letters or digits, not 'bridge': {name!r}")
        k = len(self.nodes) + 2
        if k > 253:
            raise NetLabError("a lab holds at most 252 nodes")
        ns = f"px{self.tag}-{name}"
        node = Node(name, ns, str(self.subnet[k]), f"v{k}")
        self._add_ns(ns)
        # Both ends are made inside namespaces: the root namespace never holds either of them.
        _ip("-n", self.bridge_ns, "link", "add", node.port, "type", "veth", "peer", "name", _IFACE, "netns", ns)
        _ip("-n", self.bridge_ns, "link", "set", node.port, "master", _BRIDGE, "up")
        _ip("-n", ns, "addr", "add", f"{node.addr}/24", "dev", _IFACE)
        _ip("-n", ns, "link", "set", _IFACE, "up")
        self.nodes[name] = node
        return node

    def popen(self, node: Node, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv in node's network namespace (mounts shared); the lab kills it at close."""
        if self._closed:
            raise NetLabError("lab is closed")
        kw.setdefault("start_new_session", True)  # its own group: close() kills what it forks too
        proc = subprocess.Popen(["nsenter", f"--net={NETNS_DIR}/{node.ns}", "--", *argv], **kw)
        self._procs.append(proc)
        return proc

    def run(self, node: Node, argv: Sequence[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run argv in node's network namespace to its end, killed after timeout seconds (TimeoutExpired)."""
        if "capture_output" in kw and kw.pop("capture_output"):
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        inp = kw.pop("input", None)
        if inp is not None:
            kw["stdin"] = subprocess.PIPE
        proc = self.popen(node, argv, **kw)
        try:
            out, err = proc.communicate(inp, timeout=timeout)
        except BaseException:
            self._kill(proc)
            raise
        finally:
            if proc.returncode is not None:
                self._procs.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def partition(self, node: Node) -> None:
        """Cut node off the network: its port on the bridge goes down."""
        _ip("-n", self.bridge_ns, "link", "set", node.port, "down")

    def heal(self, node: Node) -> None:
        """Put node back on the network."""
        _ip("-n", self.bridge_ns, "link", "set", node.port, "up")

    @staticmethod
    def _kill(proc: subprocess.Popen[Any]) -> None:
        # Only while unreaped: its pid (alive or a zombie) still holds the group id; once reaped the
        # id may belong to someone else's new group.
        if proc.returncode is None:
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.kill()
        proc.wait(timeout=30)

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        """SIGKILL one process the lab started (and its group), and reap it."""
        self._kill(proc)

    def close(self) -> None:
        """Kill and reap every process, delete every namespace (and with them their veths and bridge).

        Idempotent; tries every step and raises the first error."""
        first: BaseException | None = None
        while self._procs:
            proc = self._procs.pop()
            try:
                self._kill(proc)
            except BaseException as e:  # noqa: BLE001 - every step is tried, the first error raised
                first = first or e
        # Nodes first: deleting a node's namespace destroys its veth pair, the bridge's end with it.
        while self._namespaces:
            ns = self._namespaces.pop()
            try:
                _ip("netns", "delete", ns)
            except BaseException as e:  # noqa: BLE001
                first = first or e
        self._closed = True
        if first is not None:
            raise first

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

