"""The simulated network and etcd the fleet runs on: real namespaces, real etcd members, real TLS and
RBAC.  Each test can fail: reachability, partitions, elections, refusals and teardown are observed."""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fleetfixtures import DATA_DIR, etcd1, etcd3, etcd_tls, lab, new_tag  # noqa: F401

from pyexec.demo.etcdserver import EtcdCluster, EtcdError
from pyexec.demo.netlab import Lab, NetLabError, netns_list


def root_ns_nets() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address and route prefix of the root namespace."""
    out = []
    for cmd in (["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        for word in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split():
            try:
                out.append(ipaddress.IPv4Network(word, strict=False))
            except ValueError:
                continue
    return out


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def put_ok(c: EtcdCluster, node, key: str, value: str, **kw) -> None:
    r = c.etcdctl("put", key, value, node=node, **kw)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r


def test_node_reaches_etcd_and_root_namespace_untouched(etcd1):
    c = etcd1
    h1 = c.lab.add_node("h1")
    put_ok(c, h1, "/pyexec/x", "hello")
    r = c.etcdctl("get", "--print-value-only", "/pyexec/x", node=h1)
    assert r.returncode == 0 and r.stdout.strip() == "hello", r
    # The member listens on its node's address only.
    ss = c.lab.run(c.nodes[0], ["ss", "-Hltn"], capture_output=True, text=True)
    listening = {line.split()[3] for line in ss.stdout.splitlines()}
    assert listening == {f"{c.nodes[0].addr}:2379", f"{c.nodes[0].addr}:2380"}, ss.stdout
    # The root namespace holds no address, route or link of the lab.
    subnet = c.lab.subnet
    assert ipaddress.IPv4Address(h1.addr) in subnet and subnet.subnet_of(ipaddress.IPv4Network("10.192.0.0/10"))
    assert not [n for n in root_ns_nets() if n.overlaps(subnet) and n.prefixlen > 0], root_ns_nets()
    assert not root_links() & {"br0", *(n.port for n in c.lab.nodes.values())}


def test_partition_fails_requests_and_heal_restores(etcd1):
    c = etcd1
    h1, h2 = c.lab.add_node("h1"), c.lab.add_node("h2")
    put_ok(c, h1, "/k", "1")
    c.lab.partition(h1)
    t0 = time.monotonic()
    r = c.etcdctl("put", "/k", "2", node=h1, command_timeout=1.0)
    assert r.returncode != 0, r
    assert time.monotonic() - t0 < 10
    put_ok(c, h2, "/k", "3")  # the rest of the network is not cut
    c.lab.heal(h1)
    for _ in range(40):
        r = c.etcdctl("get", "--print-value-only", "/k", node=h1, command_timeout=1.0)
        if r.returncode == 0:
            break
        time.sleep(0.1)
    assert r.returncode == 0 and r.stdout.strip() == "3", r


def test_leader_killed_another_elected_and_killed_member_rejoins(etcd3):
    c = etcd3
    h1 = c.lab.add_node("h1")
    put_ok(c, h1, "/before", "1")
    old = c.leader()
    c.kill(old)
    t0 = time.monotonic()
    new = c.leader(timeout=10)  # the one the survivors agree on, and a survivor
    assert time.monotonic() - t0 < 10
    assert new != old and new in c.alive(), c.status()
    alive = [c.endpoints[i] for i in c.alive()]
    put_ok(c, h1, "/during", "2", endpoints=alive)
    c.start(old)
    # It caught up: its own (serializable, local) read sees the write made while it was dead.
    for _ in range(100):
        r = c.etcdctl("get", "--consistency=s", "--print-value-only", "/during", endpoints=[c.endpoints[old]],
                      node=h1, command_timeout=1.0)
        if r.returncode == 0 and r.stdout.strip() == "2":
            break
        time.sleep(0.1)
    assert r.returncode == 0 and r.stdout.strip() == "2", r
    assert len(c.status()) == 3 and c.leader() in (0, 1, 2)


def test_tls_refuses_a_client_without_a_ca_signed_cert(etcd_tls, tmp_path):
    c = etcd_tls
    assert all(e.startswith("https://") for e in c.endpoints)
    r = c.etcdctl("get", "/x", no_cert=True, command_timeout=2.0)
    assert r.returncode != 0, r
    # A certificate of another CA is refused too.
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", tmp_path / "k", "-out", tmp_path / "c", "-days", "1", "-subj", "/CN=root"],
                   check=True, capture_output=True)
    r = c.etcdctl("get", "/x", user_cert=(tmp_path / "c", tmp_path / "k"), command_timeout=2.0)
    assert r.returncode != 0, r
    put_ok(c, None, "/x", "ok", user_cert=c.client_cert("someone"))


def test_fleet_roles_limit_each_agent_to_its_own_keys(etcd_tls):
    c = etcd_tls
    put_ok(c, None, "/pyexec/runs/r/plan", "p")  # before auth: anyone with a CA-signed cert
    passwords = c.fleet_roles(["h1", "h2"])
    assert set(passwords) == {"h1", "h2", "coordinator"}

    def put(who: str, key: str) -> int:
        return c.etcdctl("put", key, "v", user_cert=who).returncode

    assert put("h1", "/pyexec/h/h1/x") == 0
    assert put("h1", "/pyexec/h/h2/x") != 0
    assert put("h1", "/pyexec/runs/r/committed") != 0
    r = c.etcdctl("get", "--print-value-only", "/pyexec/runs/r/plan", user_cert="h1")
    assert r.returncode == 0 and r.stdout.strip() == "p", r
    assert put("coordinator", "/pyexec/runs/r/plan") == 0
    assert put("coordinator", "/pyexec/h/h1/x") != 0
    assert put("h2", "/pyexec/h/h2/x") == 0
    assert put("nobody", "/pyexec/h/nobody/x") != 0  # a CA-signed cert of no user


GATEWAY_CLIENT = r"""
import json, sys, requests, etcd3gw
host, ca, cert, key, user, password = sys.argv[1:7]
s = requests.Session()
s.trust_env = False  # else REQUESTS_CA_BUNDLE or a proxy of the environment overrides verify
s.verify, s.cert = ca, (cert, key)
tok = s.post(f"https://{host}:2379/v3/auth/authenticate", json={"name": user, "password": password}, timeout=5)
s.headers["Authorization"] = tok.json()["token"]
c = etcd3gw.Etcd3Client(host=host, port=2379, protocol="https", session=s, timeout=5)
out = {}
for key in sys.argv[7:]:
    try:
        out[key] = c.put(key, "v")
    except Exception as e:
        out[key] = type(e).__name__
print(json.dumps(out))
"""


def test_gateway_client_is_held_to_its_role_by_password(etcd_tls):
    """etcd3gw speaks the JSON gateway, which ignores (refuses) a certificate CN: a CN-less cert + a token."""
    c = etcd_tls
    passwords = c.fleet_roles(["h1", "h2"])
    h1 = c.lab.add_node("h1")
    cert, key = c.gateway_cert()
    r = c.lab.run(h1, [sys.executable, "-c", GATEWAY_CLIENT, c.nodes[0].addr, str(c.ca), str(cert), str(key),
                       "h1", passwords["h1"], "/pyexec/h/h1/x", "/pyexec/h/h2/x"],
                  capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["/pyexec/h/h1/x"] is True and out["/pyexec/h/h2/x"] is not True, out


def test_gateway_token_survives_a_member_restart(etcd_tls):
    """A gateway client's token, issued before its member restarts, still authenticates after."""
    c = etcd_tls
    passwords = c.fleet_roles(["h1"])
    h1 = c.lab.add_node("h1")
    cert, key = c.gateway_cert()

    def post(path: str, body: dict, token: str | None = None) -> dict:
        argv = ["curl", "-sS", "--max-time", "5", "--cacert", str(c.ca), "--cert", str(cert), "--key", str(key),
                "-X", "POST", c.endpoints[0] + path, "-d", json.dumps(body)]
        if token:
            argv += ["-H", f"Authorization: {token}"]
        r = c.lab.run(h1, argv, capture_output=True, text=True)
        assert r.returncode == 0, r
        return json.loads(r.stdout)

    key_h1 = base64.b64encode(b"/pyexec/h/h1/t").decode()
    token = post("/v3/auth/authenticate", {"name": "h1", "password": passwords["h1"]})["token"]
    assert "error" in post("/v3/kv/put", {"key": key_h1, "value": "dg=="})  # no token: no user
    c.kill(0)
    c.start(0)
    out = post("/v3/kv/put", {"key": key_h1, "value": "dg=="}, token)
    assert "error" not in out and "header" in out, out


def test_twenty_nodes_two_labs_distinct_ranges():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    with Lab(new_tag()) as a, Lab(new_tag()) as b:
        assert not a.subnet.overlaps(b.subnet)
        t0 = time.monotonic()
        nodes = [a.add_node(f"n{i}") for i in range(20)]
        print(f"20 nodes in {time.monotonic() - t0:.2f}s")
        assert len({n.addr for n in nodes}) == 20
        for n in (nodes[0], nodes[-1]):
            out = subprocess.run(["ip", "-n", n.ns, "-o", "-4", "addr"], capture_output=True, text=True).stdout
            assert f"{n.addr}/24" in out and "127.0.0.1" in out
        names = {n.ns for n in nodes} | {a.bridge_ns}
        assert names <= set(netns_list())
        with pytest.raises(ValueError):
            a.add_node("n0")
        # A second lab of the same tag fails and deletes nothing of the first.
        with pytest.raises(NetLabError, match="already exists"):
            Lab(a.tag)
        assert names <= set(netns_list())
    assert not names & set(netns_list())


def test_close_leaves_nothing_behind():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces")
    links_before = root_links()
    tag = new_tag()
    lb = Lab(tag)
    try:
        c = EtcdCluster(lb, members=3, data_dir=DATA_DIR, tls=True)
        h = lb.add_node("h1")
        sleeper = lb.popen(h, ["sleep", "600"])
        pids = [p.pid for p in c.procs if p] + [sleeper.pid]
        root = c.root
        assert root.is_dir() and all(Path(f"/proc/{p}").exists() for p in pids)
        ours = {ns for ns in netns_list() if ns.startswith(f"px{tag}-")}
        assert len(ours) == 6  # bridge, 3 members, etcdc, h1
    finally:
        try:
            c.close()
        finally:
            lb.close()
    lb.close()  # idempotent
    c.close()
    assert not [ns for ns in netns_list() if ns.startswith(f"px{tag}-")]
    assert not root.exists()
    for p in pids:  # reaped: no process, not even a zombie
        assert not Path(f"/proc/{p}").exists() or str(root) not in Path(f"/proc/{p}/cmdline").read_text(), p
    assert sleeper.returncode is not None
    assert not root_links() - links_before
    assert not [n for n in root_ns_nets() if n.overlaps(lb.subnet) and n.prefixlen > 0]


def test_member_that_cannot_start_is_named_with_its_log(etcd1):
    c = etcd1
    c.kill(0)
    data = c.root / "m0"
    shutil.rmtree(data)
    data.write_text("not a directory")  # etcd refuses it and exits
    t0 = time.monotonic()
    with pytest.raises(EtcdError, match=r"(?s)etcd0 .*exited.*log tail:\n.*failed to list data directory"):
        c.start(0)
    assert time.monotonic() - t0 < 30
