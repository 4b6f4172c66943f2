"""Hostile tests of the built-in quiescers, on real servers (tests/test_quiesce.py's sandboxes): hung
servers, hostile configs, the extension's call orders.  Each one is a regression test of a bug found."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import pytest
from helpers import IS_ROOT
from test_quiesce import sandbox

from pyexec import host

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: loop devices, mount, servers")


@pytest.fixture
def mp(mounts) -> str:
    """A loop mount of the test's own for a run to freeze (a run always freezes something: an empty
    list is refused, and discovery would reach the machine's own filesystems)."""
    return mounts.make("ext4").mountpoint


@pytest.fixture(scope="module")
def maria():
    with sandbox("mariadb") as s:
        yield s


@pytest.fixture(scope="module")
def pg():
    with sandbox("postgresql") as s:
        yield s


@contextlib.contextmanager
def stopped(pids):
    """The server's processes SIGSTOPped (hung, not dead) for the block; always resumed."""
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    # kill() returns once the signal is queued; a thread running on another CPU stops a moment later
    # (and could still answer a request, as a release once did in 0.8 ms): wait until all have.
    deadline = time.monotonic() + 10
    while not all(_all_stopped(p) for p in pids):
        assert time.monotonic() < deadline, "the server did not stop"
        time.sleep(0.01)
    try:
        yield
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


def _all_stopped(pid: int) -> bool:
    """Every thread of pid is in the stopped state (T), or gone."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] != b"T":
                    return False
    return True


def bounded(fn, limit):
    """fn() in a thread: (seconds, result), or (None, None) if it has not returned within limit."""
    out = {}

    def go():
        t = time.monotonic()
        r = fn()
        out["r"] = (time.monotonic() - t, r)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(limit)
    return out.get("r", (None, None)), th


def quiescer(site, name, **doc):
    checked = host.check(site.setup(name, **doc))
    assert not checked.errors, checked.errors
    return checked, checked.plugins[0].quiescer


def maria_sessions(m, user="bk"):
    return m.server.sql(f"SELECT ID, COMMAND, COALESCE(INFO,'') FROM information_schema.PROCESSLIST "
                        f"WHERE USER = '{user}'").splitlines()


def sessions_gone(m, wait_s: float = 10.0) -> bool:
    """Whether pyexec's sessions are gone from the server, awaited: a server just resumed (SIGCONT)
    ends a session whose socket was cut a moment later, not at once."""
    deadline = time.monotonic() + wait_s
    while maria_sessions(m) and time.monotonic() < deadline:
        time.sleep(0.1)
    return maria_sessions(m) == []


def assert_timed_out(res, code: int, timeout_s: int) -> None:
    """The step ended by its timeout: the code and the flag say so, and it lasted at least the
    timeout on the core's clock (an earlier end would be some other failure called a timeout)."""
    assert res.error_code == code and res.timed_out and not res.cancelled, (res.error_code, res.detail)
    assert f"timed out after {timeout_s}s" in res.detail, res.detail
    assert res.duration_ns >= timeout_s * 1_000_000_000, res.duration_ns


def test_mariadb_hung_during_connect_is_bounded_by_the_timeout(maria):
    """A MariaDB that accepts the socket but never answers the handshake (SIGSTOPped): the pre-phase
    must end at timeoutInSeconds (308), not hang (PyMySQL's connect_timeout does not bound the
    handshake, and the watchdog's abort had no connection to cut)."""
    checked, q = quiescer(maria, "hung-connect", timeoutInSeconds=3, lockWaitTimeoutInSeconds=1)
    try:
        with stopped([maria.server.proc.pid]):
            # A wait for the phase to end (10x its timeout), not a speed bound: hung, it never ends.
            (took, res), th = bounded(lambda: q.pre(2), 30)
            assert took is not None, "the pre-phase hung with the server hung"
            # It ended while the server was still stopped: the timeout ended it, not the server.
            assert _all_stopped(maria.server.proc.pid), "the server resumed before the pre-phase ended"
        th.join(10)
        assert_timed_out(res, 308, 3)
        assert q.session is None
        print(f"the pre-phase ended {took - 3:.3f}s after its 3s timeout")
    finally:
        checked.close()
    assert sessions_gone(maria)


def test_mariadb_hung_during_release_is_bounded_and_leaves_nothing(maria):
    """The server hangs (SIGSTOP) while pyexec holds the read lock: the post-phase ends within its
    bound (309), and once the server resumes no session of pyexec's is left and writes go through."""
    checked, q = quiescer(maria, "hung-release", timeoutInSeconds=3, lockWaitTimeoutInSeconds=1)
    try:
        assert q.pre(2).ok
        with stopped([maria.server.proc.pid]):
            (took, res), th = bounded(lambda: q.post("taken"), 30)  # a wait (10x), not a speed bound
            assert took is not None, "the release hung with the server hung"
            assert _all_stopped(maria.server.proc.pid), "the server resumed before the release ended"
        th.join(10)
        assert_timed_out(res, 309, 3)
        print(f"the release ended {took - 3:.3f}s after its 3s timeout")
    finally:
        checked.close()
    assert sessions_gone(maria)


def test_a_signal_ends_the_quiesce_even_with_descriptors_above_1023(maria):
    """In a process with many descriptors (an application calling pyexec.run_async), the cancel fd and
    the watchdog's pipe are above 1023: select() refuses them, the watchdog thread died with a
    traceback and a cancelled run took (and kept) the read lock.  The cancel must still end it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), max(hard, 2048)))
    checked, q = quiescer(maria, "many-fds")
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    r, w = os.pipe()
    try:
        os.write(w, b"x")  # pyexec was signalled before the quiesce started
        assert r > 1023
        res = q.pre(2, cancel_fd=r)
        assert res.cancelled and res.error_code == 300, (res.error_code, res.detail)
        assert q.session is None
    finally:
        q.close()
        checked.close()
        for fd in held + [r, w]:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert maria_sessions(maria) == []


def test_the_extension_gets_a_backup_label_from_postgresql(pg):
    """handle.py calls post_script() with no argument (PYEXEC_SNAPSHOT=unknown), after its snapshot:
    the backup's label must still be written, or every multi-disk snapshot the extension takes of a
    PostgreSQL server has no backup_label and cannot be restored as the README says."""
    from pyexec.azure import pluginhost

    ph = pluginhost.PluginHost(None)
    ph.configLocation = pg.setup("ext-label", backupMode="always")
    labels = os.path.join(os.path.dirname(ph.configLocation), "labels")
    try:
        code, _, _ = ph.pre_check()
        assert code == 0
        pre = ph.pre_script()
        assert pre.errorCode == 0 and pre.scripts[0].facts.get("backup_start_lsn"), pre.scripts[0].detail
        post = ph.post_script()  # as handle.py calls it
    finally:
        ph.close()
    assert post.errorCode == 0, post.scripts[0].detail
    label = post.scripts[0].facts["backup_label"]
    assert label.startswith(labels + "/") and os.path.isfile(label), label
    assert "START WAL LOCATION" in open(label).read()
    assert pg.server.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pyexec-quiesce'").strip() == "0"


def test_a_short_mariadb_timeout_without_a_lock_wait_is_accepted():
    """timeoutInSeconds 5 and no lockWaitTimeoutInSeconds: the default lock wait (10) fits itself below
    the timeout instead of failing the check with 305 on a key the admin never wrote; a timeout too
    short for any lock wait is refused on timeoutInSeconds, the key that is wrong."""
    from pyexec import config, dbconfig

    c = dbconfig.parse_database(b'{"timeoutInSeconds": 5}', "/x.json", "mariadb", 60)
    assert (c.timeout, c.lock_wait) == (5, 4)
    assert dbconfig.parse_database(b"{}", "/x.json", "mariadb", 60).lock_wait == 10
    c = dbconfig.parse_database(b"{}", "/x.json", "mariadb", 6)  # the host's timeout bounds it too
    assert (c.timeout, c.lock_wait) == (6, 5)
    with pytest.raises(config.Problems) as p:
        dbconfig.parse_database(b'{"timeoutInSeconds": 1}', "/x.json", "mariadb", 60)
    assert [e.key for e in p.value.errors] == ["timeoutInSeconds"]
    with pytest.raises(config.Problems) as p:
        dbconfig.parse_database(b'{"timeoutInSeconds": 9, "lockWaitTimeoutInSeconds": 9}', "/x.json", "mariadb", 60)
    assert [e.key for e in p.value.errors] == ["lockWaitTimeoutInSeconds"]


def test_an_unwritable_backup_label_directory_is_a_clear_301(pg, mp):
    """backupLabelDirectory is a file: the release ends the backup, then fails 301 saying the label was
    not written, where, and the stop LSN (it was a bare 'NotADirectoryError: [Errno 20] …')."""
    hc = pg.setup("label-file", backupMode="always")
    labels = os.path.join(os.path.dirname(hc), "labels")
    with open(labels, "w") as f:
        f.write("not a directory")
    rep = host.run(hc, [mp], freeze_timeout=10)
    post = rep.post[0]
    assert post.error_code == 301 and "backup_label could not be written" in post.detail, post.detail
    assert labels in post.detail and "stop LSN" in post.detail
    assert open(labels).read() == "not a directory"
    assert pg.server.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pyexec-quiesce'").strip() == "0"


def test_sigterm_to_pyexec_run_while_the_server_hangs_in_the_handshake(maria):
    """`pyexec run --json` connecting to a hung MariaDB gets SIGTERM: it must end at once (exit 143,
    exactly one JSON document, the pre-phase cancelled), not wait for a handshake that never comes."""
    import subprocess
    import sys

    import orjson

    hc = maria.setup("cli-hung", timeoutInSeconds=20, lockWaitTimeoutInSeconds=10)
    pid = maria.server.proc.pid
    with stopped([pid]):
        proc = subprocess.Popen([sys.executable, "-m", "pyexec.cli", "run", "--config", hc, "--mount",
                                 maria.mount_points[0], "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        try:
            said = b""
            while b"pre-scripts:" not in said:  # the pre-phase began (its progress says so)
                line = proc.stderr.readline()
                assert line, f"exited before the pre-phase: {said!r}"
                said += line
            time.sleep(2)  # in the handshake by now (if not, the quiesce reads the cancel at its start)
            assert proc.poll() is None
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # A wait for the exit, not a speed bound; the server stays stopped until it ends, so the
            # handshake cannot be what ended.
            out, err = proc.communicate(timeout=60)
            took = time.monotonic() - t0
            assert _all_stopped(pid)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    doc = orjson.loads(out)  # exactly one document, or this raises
    assert proc.returncode == 143 and doc["interrupted"] == "SIGTERM", err
    # The signal ended the pre-phase (cancelled), not its 20 s timeout (that would say timed out).
    pre = doc["pre"][0]
    assert pre["cancelled"] and not pre["timed_out"] and "interrupted" in pre["detail"], pre
    print(f"exited {took * 1e3:.0f} ms after SIGTERM")
    assert sessions_gone(maria)
