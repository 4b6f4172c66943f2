"""Issue 19, attack 3: a local user listens where the database server should be (its Unix socket while
it is down, its TCP port) and asks the quiescer for the password.  As that user (local_user), with a
fake server that speaks enough of each protocol to be sent the password by a client that does not
check (the control test proves it is), the quiescer must refuse before a byte of the password, and
the run must never be app-consistent.  Also backupLabelDirectory, which root writes into."""
from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import tempfile

import orjson
import psycopg
import pymysql
import pytest
from helpers import IS_ROOT, db_sandbox
from test_config_trust import make

from pyexec import config, dbconfig, host

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: useradd, servers")
ENGINES = pytest.mark.parametrize("engine", ["mariadb", "postgresql"])
PASSWORD = "s3cret-Pa55word-never-sent"
PYTHON = "/usr/bin/python3"  # the user's fake server needs the standard library only

# A fake database server, run as the local user: it records every byte it receives (after TLS, if it
# offers TLS: what it learns) and asks for the password as each engine's clear-text method does.
FAKE = r'''
import os, socket, ssl, struct, sys
engine, where, record, cert = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if where.startswith("/"):
    s = socket.socket(socket.AF_UNIX)
    s.bind(where)
    os.chmod(where, 0o777)
else:
    s = socket.socket(socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(where)))
s.listen(16)
out = open(record, "ab", buffering=0)
ctx = None
if cert:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert)
print("ready", flush=True)

def rd(c, n):
    data = b""
    while len(data) < n:
        more = c.recv(n - len(data))
        if not more:
            raise EOFError
        out.write(more)
        data += more
    return data

def drain(c):
    c.settimeout(2)  # what the client sends after the request (a password), then hang up
    while True:
        more = c.recv(4096)
        if not more:
            return
        out.write(more)

def pg(c):
    while True:
        n = struct.unpack("!i", rd(c, 4))[0]
        code = struct.unpack("!i", rd(c, n - 4)[:4])[0]
        if code == 80877103 and ctx:  # SSLRequest
            c.sendall(b"S")
            c = ctx.wrap_socket(c, server_side=True)
        elif code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not here
            c.sendall(b"N")
        else:
            break
    c.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
    drain(c)

def packet(c, seq, body):
    c.sendall(struct.pack("<I", len(body))[:3] + bytes([seq]) + body)

def read_packet(c):
    head = rd(c, 4)
    return head[3], rd(c, int.from_bytes(head[:3], "little"))

def maria(c):
    caps = 0x1 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x80000 | (0x800 if ctx else 0)
    body = (b"\x0a" + b"5.5.5-10.11.99-MariaDB-fake\0" + struct.pack("<I", 7) + b"abcdefgh" + b"\0"
            + struct.pack("<HBHHB", caps & 0xFFFF, 33, 2, caps >> 16, 21) + b"\0" * 10
            + b"ijklmnopqrst" + b"\0" + b"mysql_clear_password\0")
    packet(c, 0, body)
    seq, resp = read_packet(c)
    if ctx and len(resp) == 32:  # an SSL request: TLS, then the real response
        c = ctx.wrap_socket(c, server_side=True)
        seq, resp = read_packet(c)
    packet(c, seq + 1, b"\xfemysql_clear_password\0")  # switch to clear text
    drain(c)

while True:
    c, _ = s.accept()
    try:
        (pg if engine == "postgresql" else maria)(c)
    except (EOFError, OSError, ssl.SSLError):  # socket.timeout is an OSError
        pass
    finally:
        c.close()
'''


@pytest.fixture
def mp(mounts) -> str:
    """A loop mount of the test's own for a run to freeze (a run always freezes something: an empty
    list is refused, and discovery would reach the machine's own filesystems)."""
    return mounts.make("ext4").mountpoint


class Fake:
    """The user's fake server at where (a socket path, or a port on 127.0.0.1); `.received()`."""

    def __init__(self, user, work: str, engine: str, where: str, cert: str = ""):
        self.record = os.path.join(work, f"received-{engine}-{os.path.basename(where)}")
        self.proc = user.popen([PYTHON, "-c", FAKE, engine, where, self.record, cert],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line == "ready\n", self.proc.stderr.read() if self.proc.poll() is not None else line

    def received(self) -> bytes:
        try:
            return pathlib.Path(self.record).read_bytes()
        except FileNotFoundError:
            return b""

    def close(self):
        self.proc.kill()
        self.proc.wait()


@contextlib.contextmanager
def fake(user, work, engine, where, cert=""):
    f = Fake(user, work, engine, where, cert)
    try:
        yield f
    finally:
        f.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hostconf(d: pathlib.Path, engine: str, **doc) -> str:
    """A host config with engine's built-in plugin (doc: its JSON), the password in a root 600 file."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    cred = make(d / "cred", (PASSWORD + "\n").encode(), mode=0o600)
    conf = {"user": "bk", "credentialsFile": cred, "timeoutInSeconds": 10, **doc}
    pj = make(d / "db.json", orjson.dumps(conf), mode=0o600)
    return make(d / "host.conf", (f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\n"
                                  f"pluginName0 = {engine}\npluginPath0 = builtin\npluginConfigPath0 = {pj}\n"
                                  ).encode(), mode=0o600)


def socket_host(engine: str, d: str) -> tuple[str, str, dict]:
    """(where the fake binds, the config's host, its port) for a server whose socket is in d."""
    if engine == "postgresql":
        return os.path.join(d, ".s.PGSQL.5499"), d, {"port": 5499}
    return os.path.join(d, "mysqld.sock"), os.path.join(d, "mysqld.sock"), {}


@pytest.fixture
def work(local_user):
    """A directory of the user's it can reach (its home is under pytest's 0700 tmp), for its files."""
    top = tempfile.mkdtemp(prefix="pyexec-auth-user-")
    os.chmod(top, 0o755)
    d = os.path.join(top, "u")
    os.mkdir(d, 0o755)
    local_user.chown(d)
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", top], check=False)


@pytest.fixture
def shared_dir():
    """A directory under /tmp, root's: the test sets its mode (sticky or not)."""
    d = tempfile.mkdtemp(prefix="pyexec-auth-")
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", d], check=False)


def not_app(rep) -> None:
    assert rep.outcome != host.APP and rep.code != 0, (rep.outcome, rep.code)


@ENGINES
def test_control_an_unchecking_client_sends_the_fake_the_password(local_user, work, shared_dir, engine):
    """The fakes are good enough: the drivers as pyexec used them (no peer check) send them the
    password in clear.  Without the checks below, the tests below fail on this."""
    os.chmod(shared_dir, 0o1777)
    where, cfg_host, port = socket_host(engine, shared_dir)
    with fake(local_user, work, engine, where) as f:
        with pytest.raises((psycopg.Error, pymysql.MySQLError)):
            if engine == "postgresql":
                psycopg.connect(host=cfg_host, port=port["port"], user="bk", password=PASSWORD, connect_timeout=3)
            else:
                pymysql.connect(unix_socket=where, user="bk", password=PASSWORD, connect_timeout=3, read_timeout=3)
        assert PASSWORD.encode() in f.received()


@ENGINES
def test_a_users_socket_in_a_sticky_directory_is_refused_by_its_peer(local_user, work, shared_dir, tmp_path, engine, mp):
    """/tmp-like (1777): the check cannot tell, the server is down and the user binds the socket path;
    the connection's peer is the user, not serverUser: refused before the driver writes a byte."""
    os.chmod(shared_dir, 0o1777)
    where, cfg_host, port = socket_host(engine, shared_dir)
    hc = hostconf(tmp_path / "c", engine, host=cfg_host, **port)
    with fake(local_user, work, engine, where) as f:
        rep = host.run(hc, [mp], freeze_timeout=10)
        got = f.received()
    assert got == b"", got  # not even a startup packet or a handshake response, let alone the password
    not_app(rep)
    assert rep.code == 300 and rep.pre[0].error_code == 300, rep.pre
    detail = rep.pre[0].detail
    assert "refused" in detail and local_user.name in detail, detail  # the peer, named
    assert "password was not sent" in detail
    assert rep.post[0].ok and "nothing held" in rep.post[0].detail


@ENGINES
@pytest.mark.parametrize("layout", ["world-writable", "user-owned", "user-symlink"])
def test_a_socket_directory_others_can_change_is_refused_by_the_check(local_user, work, shared_dir, tmp_path, engine,
                                                                      layout, mp):
    """A socket directory writable by others (not sticky), owned by the user, or reached through the
    user's symlink: the check refuses it (306, naming it) and nothing runs, nothing connects."""
    base = shared_dir
    if layout == "world-writable":
        os.chmod(base, 0o777)
        d = base
    elif layout == "user-owned":
        os.chmod(base, 0o755)
        d = os.path.join(base, "sock")
        os.mkdir(d, 0o755)
        local_user.chown(d)
    else:
        os.chmod(base, 0o1777)
        real = os.path.join(work, "sock")
        assert local_user.run(["mkdir", "-m", "755", real]).returncode == 0
        d = os.path.join(base, "link")
        assert local_user.run(["ln", "-s", real, d]).returncode == 0
    where, cfg_host, port = socket_host(engine, d)
    hc = hostconf(tmp_path / "c", engine, host=cfg_host, **port)
    with fake(local_user, work, engine, where) as f:
        checked = host.check(hc)
        checked.close()
        assert [e.code for e in checked.errors] == [306], checked.errors
        assert checked.errors[0].detail.startswith("database server socket: "), checked.errors[0].detail
        rep = host.run(hc, [mp], freeze_timeout=10)
        assert rep.code == 306 and rep.pre == [] and rep.post == []
        assert f.received() == b""


@ENGINES
def test_a_users_symlink_at_the_socket_path_is_refused(local_user, work, shared_dir, tmp_path, engine, mp):
    """In a sticky directory the user puts a symlink where the socket should be, to its own socket
    elsewhere: the connect's walk refuses the user's symlink (300) before connecting to anything."""
    os.chmod(shared_dir, 0o1777)
    where, cfg_host, port = socket_host(engine, shared_dir)
    own = os.path.join(work, os.path.basename(where))
    with fake(local_user, work, engine, own) as f:
        assert local_user.run(["ln", "-s", own, where]).returncode == 0
        rep = host.run(hostconf(tmp_path / "c", engine, host=cfg_host, **port), [mp], freeze_timeout=10)
        assert f.received() == b""
    not_app(rep)
    assert rep.code == 300 and "refused" in rep.pre[0].detail and "symlink" in rep.pre[0].detail, rep.pre


@ENGINES
def test_a_socket_directory_the_user_makes_after_the_check_is_refused(local_user, work, shared_dir, tmp_path, engine):
    """The socket's directory does not exist at the check (server down: not an error) and the user
    makes it, in a sticky /tmp-like directory, before the run connects: the connect's own walk
    refuses the user's directory (300), nothing is sent."""
    os.chmod(shared_dir, 0o1777)
    d = os.path.join(shared_dir, "run-db")
    where, cfg_host, port = socket_host(engine, d)
    hc = hostconf(tmp_path / "c", engine, host=cfg_host, **port)
    checked = host.check(hc)
    try:
        assert not checked.errors, checked.errors
        assert local_user.run(["mkdir", "-m", "755", d]).returncode == 0
        with fake(local_user, work, engine, where) as f:
            [res] = host.run_phase(checked, "pre", filesystems=2)
            assert f.received() == b""
            assert res.error_code == 300 and "refused" in res.detail and "owned by uid" in res.detail, res.detail
    finally:
        checked.close()


@ENGINES
def test_tcp_without_a_ca_is_refused_by_the_check(local_user, work, tmp_path, engine, mp):
    """The user listens on 127.0.0.1:<port>, the port the config names; no tlsCAFile: the check says
    which key to set (305) and nothing connects to the user's port."""
    port = free_port()
    hc = hostconf(tmp_path / "c", engine, host="127.0.0.1", port=port)
    with fake(local_user, work, engine, str(port)) as f:
        checked = host.check(hc)
        checked.close()
        assert [(e.code, e.key) for e in checked.errors] == [(305, "tlsCAFile")], checked.errors
        assert "tls" in checked.errors[0].detail and "disable" in checked.errors[0].detail
        rep = host.run(hc, [mp], freeze_timeout=10)
        assert rep.code == 305 and rep.pre == []
        assert f.received() == b""


@ENGINES
def test_tcp_with_tls_disabled_refuses_clear_text(local_user, work, tmp_path, engine, mp):
    """"tls": "disable" (insecure, warned about): the user's server asks for the password in clear
    (PostgreSQL: AuthenticationCleartextPassword; MariaDB: a switch to mysql_clear_password) and
    is refused; it got the startup packet / handshake response, not the password."""
    port = free_port()
    hc = hostconf(tmp_path / "c", engine, host="127.0.0.1", port=port, tls="disable")
    with fake(local_user, work, engine, str(port)) as f:
        rep = host.run(hc, [mp], freeze_timeout=10)
        got = f.received()
    assert b"bk" in got and PASSWORD.encode() not in got, got  # it was reached, and told nothing
    checked = host.check(hc)
    checked.close()
    assert not checked.errors and any("tls is disable" in w for w in checked.warnings), checked.warnings
    not_app(rep)
    assert rep.code == 300, rep.pre
    detail = rep.pre[0].detail
    if engine == "postgresql":
        assert "cleartext" in detail or "password" in detail, detail
    else:
        assert "refused" in detail and "mysql_clear_password" in detail, detail


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA (openssl CLI), a server certificate it signed for 127.0.0.1, and a self-signed 'rogue' one."""
    d = tmp_path_factory.mktemp("pki")

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
         "-subj", "/CN=pyexec test CA")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
         "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName = IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "server.pem", "-days", "2", "-extfile", "ext")
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem",
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName = IP:127.0.0.1")
    (d / "rogue.chain").write_bytes((d / "rogue.pem").read_bytes() + (d / "rogue.key").read_bytes())
    os.chmod(d / "ca.pem", 0o644)
    return d


@ENGINES
@pytest.mark.parametrize("offer", ["no-tls", "rogue-cert"])
def test_tcp_with_a_ca_refuses_a_server_it_did_not_certify(local_user, work, tmp_path, pki, engine, offer, mp):
    """tlsCAFile set: the user's server offers no TLS (a downgrade), or TLS with its own certificate
    for the right name: both refused before the password (300), never app-consistent."""
    port = free_port()
    cert = ""
    if offer == "rogue-cert":
        cert = os.path.join(work, "rogue.chain")
        make(pathlib.Path(cert), (pki / "rogue.chain").read_bytes(), mode=0o600, uid=local_user.uid)
    hc = hostconf(tmp_path / "c", engine, host="127.0.0.1", port=port, tlsCAFile=str(pki / "ca.pem"))
    with fake(local_user, work, engine, str(port), cert) as f:
        rep = host.run(hc, [mp], freeze_timeout=10)
        got = f.received()
    assert PASSWORD.encode() not in got, got  # MariaDB without TLS: nothing at all (PyMySQL stops first)
    not_app(rep)
    assert rep.code == 300 and not rep.check_errors, (rep.check_errors, rep.pre)
    detail = rep.pre[0].detail
    assert ("SSL" in detail or "certificate" in detail or "ssl" in detail), detail


@pytest.mark.parametrize("mode,uid,code", [(0o644, 0, None), (0o664, 0, 306), (0o644, "user", 306)])
def test_the_ca_file_is_trust_checked(local_user, work, tmp_path, pki, mode, uid, code):
    """tlsCAFile may be world-readable (it is public), but only root may be able to change it."""
    ca = make(tmp_path / "ca" / "ca.pem", (pki / "ca.pem").read_bytes(), mode=mode,
              uid=local_user.uid if uid == "user" else 0)
    os.chmod(tmp_path / "ca", 0o755)
    checked = host.check(hostconf(tmp_path / "c", "mariadb", host="127.0.0.1", port=3306, tlsCAFile=ca))
    checked.close()
    assert [e.code for e in checked.errors] == ([code] if code else []), checked.errors
    if code:
        assert checked.errors[0].detail.startswith("TLS CA file (tlsCAFile): ")


def test_a_ca_file_without_a_certificate_is_305(tmp_path):
    ca = make(tmp_path / "ca" / "ca.pem", b"not a certificate\n", mode=0o644)
    checked = host.check(hostconf(tmp_path / "c", "postgresql", host="db.example", tlsCAFile=ca))
    checked.close()
    assert [(e.code, e.key) for e in checked.errors] == [(305, "tlsCAFile")], checked.errors


@pytest.mark.parametrize("doc,key", [
    ({"host": "@abstract"}, "host"), ({"host": "a.example,b.example", "tls": "disable"}, "host"),
    ({"tls": "off"}, "tls"), ({"tls": True}, "tls"), ({"serverUser": ""}, "serverUser"),
    ({"tlsCAFile": "relative.pem"}, "tlsCAFile"), ({"serverUser": 0}, "serverUser"),
])
def test_bad_server_authentication_keys_are_305(doc, key):
    for engine in ("mariadb", "postgresql"):
        with pytest.raises(config.Problems) as p:
            dbconfig.parse_database(orjson.dumps(doc), "/x.json", engine)
        assert [(e.code, e.key) for e in p.value.errors] == [(305, key)], p.value.errors


def test_server_user_that_is_no_account_is_305_at_the_check(tmp_path):
    checked = host.check(hostconf(tmp_path / "c", "mariadb", host=str(tmp_path / "s.sock"),
                                  serverUser="no-such-account-px"))
    checked.close()
    assert [(e.code, e.key) for e in checked.errors] == [(305, "serverUser")], checked.errors


# ------------------------------------------------------------------------- the real servers

@pytest.fixture(scope="module", params=["mariadb", "postgresql"])
def site(request):
    from test_quiesce import Site
    with db_sandbox(f"pyexec-auth-{request.param}-", lambda tmp, mounts: Site(request.param, tmp, mounts)) as s:
        yield s


def test_the_real_server_passes_the_checks_and_another_server_user_does_not(site):
    """The server's own socket, in its run directory (its account's), served by its account (postgres /
    mysql, the defaults): app-consistent.  With serverUser naming another account, that directory is
    no longer one only root or the server's account can change: the check refuses it (306)."""
    ok = host.run(site.setup("peer-ok"), site.mount_points, freeze_timeout=20)
    assert ok.outcome == host.APP, (ok.pre, ok.post)
    rep = host.run(site.setup("peer-other", serverUser="nobody"), site.mount_points, freeze_timeout=20)
    not_app(rep)
    assert rep.code == 306 and rep.pre == [], rep.check_errors
    assert "not root or nobody" in rep.check_errors[0].detail, rep.check_errors


@pytest.mark.parametrize("site", ["postgresql"], indirect=True)
@pytest.mark.parametrize("layout", ["user-owned", "user-symlink", "group-writable"])
def test_a_backup_label_directory_others_can_change_is_refused(site, local_user, work, layout):
    """backupLabelDirectory owned by the user, reached through the user's symlink, or writable by a
    group: the check refuses it (307) before any backup starts, and nothing is written there."""
    base = site.tmp / f"labels-{layout}"
    target = pathlib.Path(work) / f"labels-{layout}"
    assert local_user.run(["mkdir", "-m", "755", str(target)]).returncode == 0
    if layout == "user-owned":
        labels = target
    elif layout == "user-symlink":
        base.mkdir(mode=0o1777)
        os.chmod(base, 0o1777)
        labels = base / "labels"
        assert local_user.run(["ln", "-s", str(target), str(labels)]).returncode == 0
    else:
        labels = base
        base.mkdir()
        os.chmod(base, 0o770)
        os.chown(base, 0, local_user.gid)
    hc = site.setup(f"label-{layout}", backupMode="always", backupLabelDirectory=str(labels))
    checked = host.check(hc)
    checked.close()
    assert [e.code for e in checked.errors] == [307], checked.errors
    assert checked.errors[0].detail.startswith("backupLabelDirectory: "), checked.errors[0].detail
    rep = host.run(hc, site.mount_points, freeze_timeout=20)
    assert rep.code == 307 and rep.pre == [] and rep.post == []
    assert os.listdir(target) == []


@pytest.mark.parametrize("site", ["postgresql"], indirect=True)
def test_a_backup_label_directory_the_user_plants_during_the_window_is_not_written(site, local_user):
    """backupLabelDirectory does not exist at the check, in a sticky directory; inside the window the
    user plants a symlink there to a directory of root's: the release refuses (301), the backup
    ended, and nothing is written through the symlink."""
    base = site.tmp / "labels-race"
    base.mkdir()
    os.chmod(base, 0o1777)
    victim = site.tmp / "victim"
    victim.mkdir(mode=0o755)
    labels = base / "labels"
    hc = site.setup("label-race", backupMode="always", backupLabelDirectory=str(labels))

    def snapshot(win):
        assert local_user.run(["ln", "-s", str(victim), str(labels)]).returncode == 0

    rep = host.run(hc, site.mount_points, snapshot=snapshot, freeze_timeout=20)
    not_app(rep)
    post = rep.post[0]
    assert post.error_code == 301 and "symlink" in post.detail and "nothing was written" in post.detail, post.detail
    assert "stop LSN" in post.detail and os.listdir(victim) == []
    assert site.server.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pyexec-quiesce'") == "0"


@pytest.mark.parametrize("site", ["postgresql"], indirect=True)
def test_a_missing_backup_label_directory_is_created_root_only(site):
    """A backupLabelDirectory two levels deep that does not exist: made at the release, root's 0700."""
    labels = site.tmp / "new-a" / "new-b"
    rep = host.run(site.setup("label-new", backupMode="always", backupLabelDirectory=str(labels)),
                   site.mount_points, freeze_timeout=20)
    assert rep.outcome == host.APP, (rep.pre, rep.post)
    for d in (site.tmp / "new-a", labels):
        st = os.stat(d)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    assert rep.post[0].facts["backup_label"].startswith(str(labels) + "/")


# ------------------------------------------------------------- a real server over TCP with TLS

class TlsSite:
    """A real server listening on 127.0.0.1:<port> too, with the pki's server certificate; its TCP logins
    need TLS (PostgreSQL: hostssl only; MariaDB: the quiescer's user REQUIRE SSL)."""

    def __init__(self, engine, tmp, mounts, pki):
        import pwd

        from pyexec.demo.servers import MariaDBServer, PostgresServer
        self.engine, self.tmp, self.port = engine, tmp, free_port()
        account = pwd.getpwnam("postgres" if engine == "postgresql" else "mysql")
        tls = tmp / "tls"
        tls.mkdir()
        os.chmod(tls, 0o755)
        cert = make(tls / "server.pem", (pki / "server.pem").read_bytes(), mode=0o644)
        key = make(tls / "server.key", (pki / "server.key").read_bytes(), mode=0o600, uid=account.pw_uid)
        self.data = mounts.make("ext4", 160)
        db = os.path.join(self.data.mountpoint, "db")
        if engine == "postgresql":
            hba = make(tls / "hba.conf", b"local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
                       mode=0o644)
            self.server = PostgresServer(db, port=self.port, settings={
                "listen_addresses": "127.0.0.1", "ssl": "on", "ssl_cert_file": cert, "ssl_key_file": key,
                "hba_file": hba})
            self.server.start()
            self.user, self.password = "postgres", self.server.password
        else:
            self.server = MariaDBServer(db, options=[
                "skip-networking = 0", "bind-address = 127.0.0.1", f"port = {self.port}", f"ssl-cert = {cert}",
                f"ssl-key = {key}"])
            self.server.start()
            self.user, self.password = "bk", "bk-tls-secret"
            self.server.create_user(self.user, self.password, "RELOAD, PROCESS, BINLOG MONITOR")
            self.server.sql("ALTER USER 'bk'@'localhost' REQUIRE SSL")

    def setup(self, name, **doc):
        d = self.tmp / name
        d.mkdir()
        os.chmod(d, 0o700)
        cred = make(d / "cred", (self.password + "\n").encode(), mode=0o600)
        conf = {"host": "127.0.0.1", "port": self.port, "user": self.user, "credentialsFile": cred,
                "timeoutInSeconds": 20, **doc}
        pj = make(d / "db.json", orjson.dumps(conf), mode=0o600)
        return make(d / "host.conf", (f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\n"
                                      f"pluginName0 = {self.engine}\npluginPath0 = builtin\n"
                                      f"pluginConfigPath0 = {pj}\n").encode(), mode=0o600)

    def close(self):
        self.server.stop()


@ENGINES
def test_a_real_server_over_tcp_with_tls_verified_against_the_ca(engine, pki):
    """The real server on 127.0.0.1 with a certificate the CA signed: app-consistent over verified TLS
    (the server takes TCP logins over TLS only).  The same server named "localhost" (the certificate
    names 127.0.0.1), or checked against another CA: refused before the password (300)."""
    with db_sandbox(f"pyexec-tls-{engine}-", lambda tmp, mounts: TlsSite(engine, tmp, mounts, pki)) as s:
        ca = make(s.tmp / "ca" / "ca.pem", (pki / "ca.pem").read_bytes(), mode=0o644)
        rogue = make(s.tmp / "ca" / "rogue.pem", (pki / "rogue.pem").read_bytes(), mode=0o644)
        os.chmod(s.tmp / "ca", 0o755)
        ok = host.run(s.setup("tls-ok", tlsCAFile=ca), [s.data.mountpoint], freeze_timeout=20)
        assert ok.outcome == host.APP, (ok.check_errors, ok.pre, ok.post)
        for name, doc, expect in [("tls-name", {"host": "localhost", "tlsCAFile": ca}, ("match", "hostname")),
                                  ("tls-ca", {"tlsCAFile": rogue}, ("verify failed", "certificate"))]:
            rep = host.run(s.setup(name, **doc), [s.data.mountpoint], freeze_timeout=20)
            not_app(rep)
            assert rep.code == 300 and any(w in rep.pre[0].detail for w in expect), (name, rep.pre[0].detail)
