"""A hostile review of issue 19's fixes for attack 3 (the quiescers authenticate the server first) and
attack 5 with the lower items (the snapshot command trust-checked): each test is one more way a local
user (local_user: a real account, acting through its own processes) or root's own environment could
get the password or run a program as root, asserting it fails.  What the other files test already
(a user's socket in a sticky or writable directory, its symlinks, TCP without a CA, a rogue
certificate, a user's PATH directory, a swap during the pre-scripts) is not repeated here."""
from __future__ import annotations

import grp
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile

import orjson
import pytest
from helpers import IS_ROOT
from test_config_trust import make, write_setup
from test_quiesce_auth import (  # noqa: F401
    ENGINES,
    PASSWORD,
    fake,
    free_port,
    hostconf,
    mp,
    not_app,
    pki,
    shared_dir,
    socket_host,
    work,
)

from pyexec import config, dbconfig, errors, host, scripts, trust
from pyexec.demo import loopfs, safeio

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: useradd, loop mounts")
PYEXEC = [sys.executable, "-m", "pyexec.cli"]
SERVER_ACCOUNT = {"postgresql": "postgres", "mariadb": "mysql"}  # dbconfig.DB_DEFAULTS' serverUser


# ------------------------------------------------------------------ root's libpq environment

@pytest.mark.parametrize("via", ["PGHOSTADDR", "PGSERVICE"])
def test_a_socket_config_is_not_turned_into_tcp_by_roots_libpq_environment(local_user, work, shared_dir, tmp_path,
                                                                           monkeypatch, via, mp):
    """libpq connects to hostaddr, when it has one, over TCP and ignores host (a socket directory) for
    the connection; requirepeer is a Unix socket's check only.  With PGHOSTADDR in root's environment
    (or a service that sets hostaddr), the socket's peer check would be skipped and the password sent
    in clear to the user listening on 127.0.0.1 at the configured port (a server on a socket only
    leaves that port free).  The quiescer connects where the config says: the socket (absent: the
    server is down), and the user gets nothing."""
    os.chmod(shared_dir, 0o755)
    port = free_port()
    hc = hostconf(tmp_path / "c", "postgresql", host=shared_dir, port=port)
    if via == "PGHOSTADDR":
        monkeypatch.setenv("PGHOSTADDR", "127.0.0.1")
    else:
        services = make(tmp_path / "svc" / "pg_service.conf", b"[evil]\nhostaddr=127.0.0.1\n", mode=0o644)
        monkeypatch.setenv("PGSERVICEFILE", services)
        monkeypatch.setenv("PGSERVICE", "evil")
    # The socket the walk finds (here root's listener, standing in for a server on its socket only):
    # with hostaddr, libpq would never connect to it.
    with socket.socket(socket.AF_UNIX) as server, fake(local_user, work, "postgresql", str(port)) as f:
        server.bind(os.path.join(shared_dir, f".s.PGSQL.{port}"))
        server.listen()
        rep = host.run(hc, [mp], freeze_timeout=10)
        got = f.received()
    assert got == b"", got  # not even a startup packet
    not_app(rep)
    detail = rep.pre[0].detail
    assert rep.code == 300 and "refused" in detail and "serverUser postgres" in detail, detail


@ENGINES
def test_roots_libpq_environment_does_not_weaken_verified_tls(local_user, work, tmp_path, pki, monkeypatch, engine,
                                                              mp):
    """PGSSLMODE=disable, PGSSLROOTCERT naming the user's certificate and PGREQUIREAUTH=password in
    root's environment: the explicit verify-full and the CA held in memory win (PyMySQL reads no
    environment and no option file: read_default_file is never passed).  The user's server without TLS
    gets no password."""
    port = free_port()
    rogue = os.path.join(work, "rogue.pem")
    make(pathlib.Path(rogue), (pki / "rogue.pem").read_bytes(), mode=0o644, uid=local_user.uid)
    for k, v in {"PGSSLMODE": "disable", "PGSSLROOTCERT": rogue, "PGREQUIREAUTH": "password",
                 "PGHOSTADDR": "127.0.0.1", "MYSQL_PWD": "x", "MYSQL_HOST": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    hc = hostconf(tmp_path / "c", engine, host="127.0.0.1", port=port, tlsCAFile=str(pki / "ca.pem"))
    with fake(local_user, work, engine, str(port)) as f:
        rep = host.run(hc, [mp], freeze_timeout=10)
        got = f.received()
    assert PASSWORD.encode() not in got, got
    not_app(rep)
    assert rep.code == 300, rep.pre


def test_a_ca_file_reached_through_the_users_symlink_is_refused(local_user, work, shared_dir, tmp_path, pki):
    """tlsCAFile names a symlink the user made in a sticky directory, to a CA file of its own: 306 at the
    check.  (One that passes is read by the check and used from memory, libpq through a memfd: a swap
    of the path afterwards changes nothing the connect trusts.)"""
    os.chmod(shared_dir, 0o1777)
    own = os.path.join(work, "ca.pem")
    make(pathlib.Path(own), (pki / "rogue.pem").read_bytes(), mode=0o644, uid=local_user.uid)
    link = os.path.join(shared_dir, "ca.pem")
    assert local_user.run(["ln", "-s", own, link]).returncode == 0
    for engine in ("mariadb", "postgresql"):
        checked = host.check(hostconf(tmp_path / engine, engine, host="127.0.0.1", port=free_port(), tlsCAFile=link))
        checked.close()
        assert [e.code for e in checked.errors] == [306], checked.errors
        assert "symlink" in checked.errors[0].detail and f"uid {local_user.uid}" in checked.errors[0].detail


# ------------------------------------------------------------------ MariaDB's first plugin, "tls": "disable"

# The user's fake MariaDB names plugin in its handshake (no switch): caching_sha2_password then asks
# for full authentication, sha256_password gets the client's request for a key; either way it offers
# its own RSA public key, to which a client that does not refuse encrypts the password.  It records
# each packet the client sends, one line each ("handshake-response", then what followed).
FIRST_PLUGIN = r'''
import socket, struct, sys
plugin, port, record = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", port)); s.listen(4)
print("ready", flush=True)
KEY = b"-----BEGIN PUBLIC KEY-----\nMFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBAL7Y8aQy5nF4b0hKxqOEtgB0W1Nk0fTZ\n" \
      b"5Xz2p2oK8m3dIc4pW8n3v5uHc1r2s9lQe8mV0Yk3v8tq6a8rK3cCAwEAAQ==\n-----END PUBLIC KEY-----\n"
def rd(c, n):
    d = b""
    while len(d) < n:
        more = c.recv(n - len(d))
        if not more: raise EOFError
        d += more
    return d
def read_packet(c):
    h = rd(c, 4)
    return h[3], rd(c, int.from_bytes(h[:3], "little"))
def packet(c, seq, body):
    c.sendall(struct.pack("<I", len(body))[:3] + bytes([seq]) + body)
c, _ = s.accept()
c.settimeout(5)
out = open(record, "a", buffering=1)
caps = 0x1 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x80000
packet(c, 0, b"\x0a8.0.99-fake\0" + struct.pack("<I", 7) + b"abcdefgh\0" + struct.pack("<HBHHB", caps & 0xFFFF, 33, 2,
       caps >> 16, 21) + b"\0" * 10 + b"ijklmnopqrst\0" + plugin.encode() + b"\0")
try:
    seq, resp = read_packet(c)
    out.write("handshake-response\n")
    if plugin == "caching_sha2_password":
        packet(c, seq + 1, b"\x01\x04")  # perform full authentication
        seq, resp = read_packet(c)
        out.write(f"{resp[:1].hex()} {len(resp)}\n")  # 02: a request for the server's public key
    packet(c, seq + 1, b"\x01" + KEY)
    seq, resp = read_packet(c)
    out.write(f"rsa-encrypted-password {len(resp)}\n")
except (EOFError, OSError):
    pass
'''


@pytest.mark.parametrize("plugin", ["caching_sha2_password", "sha256_password"])
def test_mariadb_tls_disable_refuses_the_handshakes_first_plugin_not_only_a_switch(local_user, work, tmp_path,
                                                                                  plugin, mp):
    """"tls": "disable": the user's server names caching_sha2_password or sha256_password in its
    handshake rather than switching to it, then sends its own RSA key.  PyMySQL before 1.2.1 did not
    ask auth_plugin_map about that first plugin and encrypted the password to the user's key; the
    quiescer refuses (installed PyMySQL: the map is asked; older: the check refuses the driver)."""
    port = free_port()
    record = os.path.join(work, f"first-{plugin}")
    hc = hostconf(tmp_path / "c", "mariadb", host="127.0.0.1", port=port, tls="disable")
    proc = local_user.popen(["/usr/bin/python3", "-c", FIRST_PLUGIN, plugin, str(port), record],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        rep = host.run(hc, [mp], freeze_timeout=10)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    got = pathlib.Path(record).read_text()
    assert got == "handshake-response\n", got  # then nothing: no key asked for, no password encrypted to it
    not_app(rep)
    detail = rep.pre[0].detail
    assert rep.code == 300 and "refused" in detail and plugin in detail and "not sent" in detail, detail


def test_a_pymysql_that_would_send_the_password_over_tcp_is_refused(tmp_path):
    """The driver gate itself: the installed PyMySQL passes; a version before 1.2.1 (its VERSION, as the
    module says it) is 300 for TCP, "tls": "disable" (it asked auth_plugin_map on a switch only) and
    verified TLS alike (before 1.2.0 it logged in in clear to a server that offered no TLS: shown
    with 1.1.2 against the fake of test_quiesce_auth), and fine over a Unix socket."""
    import types

    import pymysql

    from pyexec.quiesce import mariadb
    cfg = dbconfig.parse_database(orjson.dumps({"host": "127.0.0.1", "tls": "disable"}), "/x.json", "mariadb")
    mariadb.check_driver(cfg, pymysql)
    old = types.SimpleNamespace(VERSION=(1, 2, 0, "final"))
    with pytest.raises(errors.ScriptError) as e:
        mariadb.check_driver(cfg, old)
    assert e.value.code == 300 and "1.2.0" in e.value.detail
    tls = dbconfig.parse_database(orjson.dumps({"host": "db", "tlsCAFile": "/etc/ssl/ca.pem"}), "/x.json", "mariadb")
    with pytest.raises(errors.ScriptError) as e:
        mariadb.check_driver(tls, types.SimpleNamespace(VERSION=(1, 1, 2, "final")))
    assert e.value.code == 300 and "1.1.2" in e.value.detail
    mariadb.check_driver(dbconfig.parse_database(orjson.dumps({"host": "/run/mysqld/mysqld.sock"}), "/x.json",
                                               "mariadb"), old)


# ------------------------------------------------------------------ the server's group

@ENGINES
def test_a_member_of_the_servers_group_who_binds_in_its_group_writable_socket_directory_is_refused(
        local_user, work, shared_dir, tmp_path, engine, mp):
    """Debian's socket directory is group-writable for the server's group (2775), and the directory rule
    accepts it.  A user in that group can put its own socket at the configured name while the server
    is down (or swap it for the server's after the walk: the socket's own owner is not checked, and
    PostgreSQL's libpq looks the name up again in the directory).  The peer check is what refuses it:
    SO_PEERCRED (MariaDB) and requirepeer (PostgreSQL) name the user, not serverUser."""
    group = grp.getgrnam(SERVER_ACCOUNT[engine]).gr_gid
    d = os.path.join(shared_dir, "run")
    os.mkdir(d)
    os.chown(d, 0, group)
    os.chmod(d, 0o2775)
    os.chmod(shared_dir, 0o755)
    where, cfg_host, port = socket_host(engine, d)
    hc = hostconf(tmp_path / "c", engine, host=cfg_host, **port)
    checked = host.check(hc)
    checked.close()
    assert checked.errors == [], checked.errors  # the directory is one the server's account may have
    with fake(InGroup(local_user, group), work, engine, where) as f:  # the user's own process, in the group
        assert os.stat(where).st_uid == local_user.uid
        rep = host.run(hc, [mp], freeze_timeout=10)
        got = f.received()
    assert got == b"", got
    not_app(rep)
    detail = rep.pre[0].detail
    assert rep.code == 300 and "refused" in detail and "password was not sent" in detail, detail


class InGroup:
    """local_user's processes with one supplementary group (as its login would have, once a member)."""

    def __init__(self, user, gid: int):
        self.user, self.gid = user, gid

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("cwd", self.user.home)
        return subprocess.Popen(["setpriv", f"--reuid={self.user.uid}", f"--regid={self.user.gid}",
                                 f"--groups={self.gid}", "--inh-caps=-all", "--bounding-set=-all", "--", *argv], **kw)


def test_a_port_of_0_or_out_of_range_is_305():
    for port in (0, -1, 65536, "5432", True):
        for engine in ("mariadb", "postgresql"):
            with pytest.raises(config.Problems) as p:
                dbconfig.parse_database(orjson.dumps({"host": "127.0.0.1", "port": port, "tls": "disable"}),
                                      "/x.json", engine)
            assert [(e.code, e.key) for e in p.value.errors] == [(305, "port")], (port, p.value.errors)


# ------------------------------------------------------------------ a `#!` line naming the user's program

@pytest.fixture
def area(local_user):
    """root's 755 directory `root`, the user's own `user`, and `marks` (1777: where a program run leaves
    its mark); under /tmp so the user can reach them."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="pyexec-review-"))
    os.chmod(base, 0o755)
    for name, mode in (("root", 0o755), ("user", 0o755), ("marks", 0o1777)):
        (base / name).mkdir()
        os.chmod(base / name, mode)
    local_user.chown(base / "user")
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _users_interpreter(user, area: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The user's own program (made by its processes), which leaves its mark when it runs."""
    interp, marker = area / "user" / "interp", area / "marks" / "interp-ran"
    res = user.run(["sh", "-c", f"printf '#!/bin/sh\\nid -u > {marker}\\n' > '{interp}' && chmod 755 '{interp}'"])
    assert res.returncode == 0, res.stderr
    return interp, marker


@pytest.mark.parametrize("chain", [1, 2])
def test_a_snapshot_command_whose_interpreter_the_user_owns_is_refused(tmp_path, mounts, local_user, area, chain):
    """root's own 755 snapshot command in root's directory, its `#!` naming a program of the user's
    (directly, or through a root `#!` script that names it): execve would run the user's program as
    root.  Refused when resolved (11), naming the interpreter; nothing runs, nothing is frozen."""
    m = mounts.make("ext4")
    interp, marker = _users_interpreter(local_user, area)
    if chain == 2:
        interp = pathlib.Path(make(area / "root" / "wrapper", f"#!{interp}\n".encode(), mode=0o755))
    snap = make(area / "root" / "snap", f"#! {interp} -x\nexit 0\n".encode(), mode=0o755)
    with pytest.raises(ValueError) as e:
        scripts.resolve_command(snap)
    assert f"interpreter {interp}" in str(e.value) and f"owned by uid {local_user.uid}" in str(e.value), e.value
    pre_ran = tmp_path / "pre-ran"
    hc = write_setup(tmp_path, pre=f"#!/bin/sh\necho > {pre_ran}\n".encode())
    res = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", m.mountpoint, "--json", "--snapshot-cmd", snap],
                         capture_output=True, text=True, cwd="/", timeout=120)
    assert "Traceback" not in res.stderr
    doc = orjson.loads(res.stdout)
    assert res.returncode == errors.TABLE[11].exit_status and doc["code"] == 11, res.stdout
    assert not marker.exists() and not pre_ran.exists()
    assert not loopfs.thaw_path(m.mountpoint)


def test_an_interpreter_handed_to_the_user_after_the_check_does_not_run(tmp_path, mounts, local_user, area):
    """The snapshot command's interpreter is root's at the check; a pre-script hands its directory to the
    user, whose own process replaces it.  The walk right before the spawn follows the `#!` line too:
    not run, the post-scripts run, nothing stays frozen."""
    m = mounts.make("ext4")
    d = area / "root" / "lib"
    d.mkdir(mode=0o755)
    root_interp = pathlib.Path(make(d / "interp", b"#!/bin/sh\nexit 0\n", mode=0o755))
    snap = make(area / "root" / "snap", f"#!{root_interp}\n".encode(), mode=0o755)
    evil, marker = _users_interpreter(local_user, area)
    swap = shlex.join(local_user.argv(["sh", "-c", f"cp '{evil}' '{d}/new' && mv -f '{d}/new' '{root_interp}'"]))
    hc = write_setup(tmp_path, pre=f"#!/bin/sh\nchown {local_user.uid} {d} && {swap}\n".encode())
    res = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", m.mountpoint, "--json", "--snapshot-cmd", snap],
                         capture_output=True, text=True, cwd="/", timeout=120)
    doc = orjson.loads(res.stdout)
    assert doc["pre"][0]["exit_code"] == 0 and os.stat(root_interp).st_uid == local_user.uid, doc["pre"]
    assert doc["outcome"] == "failed" and doc["snapshot"]["detail"].startswith("not run:"), res.stdout
    assert "interpreter" in doc["snapshot"]["detail"], doc["snapshot"]
    assert not marker.exists() and doc["post"][0]["exit_code"] == 0
    assert not loopfs.thaw_path(m.mountpoint)


@pytest.mark.parametrize("phase", ["pre", "post"])
def test_a_script_whose_interpreter_the_user_owns_is_refused(tmp_path, local_user, area, phase):
    """The same for a pre- or post-script (root's, 700, in root's directories): 306 / 307 at the check."""
    interp, marker = _users_interpreter(local_user, area)
    body = f"#!{interp}\nexit 0\n".encode()
    hc = write_setup(tmp_path, **{phase: body})
    checked = host.check(hc)
    checked.close()
    want = 306 if phase == "pre" else 307
    assert [e.code for e in checked.errors] == [want], checked.errors
    assert f"interpreter {interp}" in checked.errors[0].detail, checked.errors[0].detail
    assert not marker.exists()


def test_interpreters_root_owns_or_that_are_missing_are_accepted(tmp_path):
    """/bin/sh and /usr/bin/env (755, root's) pass; an interpreter that does not exist is the exec's to
    report (only root could make it: the walk found root's directories); a script without the execute
    bit runs as `sh PATH` and its `#!` line is not followed."""
    for body, mode in ((b"#!/bin/sh\nexit 0\n", 0o755), (b"#!/usr/bin/env sh\nexit 0\n", 0o755),
                       (b"#!/no/such/interp\n", 0o755), (b"#!/tmp\n", 0o644)):
        p = make(tmp_path / "r" / "s", body, mode=mode)
        os.chmod(tmp_path / "r", 0o755)
        trust.open_trusted(p, trust.SNAPSHOT).close()


# ------------------------------------------------------------------ relative commands and PATH entries

@pytest.mark.parametrize("path_env,prog", [(".:/usr/bin:/bin", "cp"), (":/usr/bin:/bin", "cp"),
                                           ("/usr/bin:/bin", "./cp"), ("/usr/bin:/bin", "cp-link")])
def test_a_snapshot_command_found_through_roots_cwd_in_a_users_directory_is_refused(
        tmp_path, mounts, local_user, area, path_env, prog):
    """Root runs pyexec from a directory of the user's, with "." or an empty entry in its PATH, or gives
    a relative command, or the name found on PATH is root's symlink... to the user's program: the
    program found is the user's, refused (11); it never runs."""
    m = mounts.make("ext4")
    cwd = area / "user"
    marker = area / "marks" / "cp-ran"
    res = local_user.run(["sh", "-c", f"printf '#!/bin/sh\\nid -u > {marker}\\n' > '{cwd}/cp' && chmod 755 '{cwd}/cp'"])
    assert res.returncode == 0, res.stderr
    if prog == "cp-link":
        bindir = area / "root" / "bin"
        bindir.mkdir(mode=0o755)
        os.symlink(cwd / "cp", bindir / "cp-link")
        path_env = f"{bindir}:{path_env}"
    hc = write_setup(tmp_path)
    res = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", m.mountpoint, "--json",
                          "--snapshot-cmd", f"{prog} {hc} {tmp_path / 'copy'}"],
                         capture_output=True, text=True, cwd=cwd, env={**os.environ, "PATH": path_env}, timeout=120)
    assert "Traceback" not in res.stderr
    doc = orjson.loads(res.stdout)
    assert res.returncode == errors.TABLE[11].exit_status and doc["code"] == 11, res.stdout
    assert not marker.exists() and not (tmp_path / "copy").exists()
    assert not loopfs.thaw_path(m.mountpoint)


# ------------------------------------------------------------------ the demo's chown of a restored tree

def test_the_demo_does_not_chown_a_hard_link_its_account_planted_in_its_tree(local_user, area):
    """The demo gives a restored data directory to the server's account (safeio.chown_tree).  That
    account (here the user) owns the tree and, before, hard-links into it a file of root's it may write
    (fs.protected_hardlinks allows that much; without it, any file): a chown of the link would give
    root's file to the account.  It stays root's; the account's own files and directories are given."""
    victim = area / "root" / "victim"
    victim.write_text("root's\n")
    os.chmod(victim, 0o666)
    tree = area / "user" / "data"
    res = local_user.run(["sh", "-c", (f"mkdir -p '{tree}/sub' && echo x > '{tree}/sub/own' && "
                                       f"ln '{victim}' '{tree}/sub/link' && ln -s '{victim}' '{tree}/sym'")])
    assert res.returncode == 0, res.stderr
    for p in (tree, tree / "sub", tree / "sub" / "own"):
        os.chown(p, 0, 0)  # as a restore by root leaves them
    safeio.chown_tree(str(tree), local_user.uid, local_user.gid)
    assert (os.stat(victim).st_uid, os.stat(victim).st_gid) == (0, 0)
    for p in (tree, tree / "sub", tree / "sub" / "own"):
        assert os.stat(p).st_uid == local_user.uid, p
