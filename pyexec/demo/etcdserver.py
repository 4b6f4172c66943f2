"""Private etcd clusters on a netlab: real /usr/bin/etcd members, one per lab node, listening only on
their node's address; optionally TLS with client-certificate authentication and the fleet's RBAC."""
from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from pyexec.demo.netlab import Lab, Node

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
CLIENT_PORT = 2379
PEER_PORT = 2380
# Elections in well under 2 s after a member dies: a follower waits one election timeout (randomized
# up to twice that) for a heartbeat.  Heartbeats at 50 ms leave a loaded 2-core machine room.
HEARTBEAT_MS = 50
ELECTION_MS = 500
START_TIMEOUT = 30.0
PREFIX = "/pyexec/"


class EtcdError(RuntimeError):
    """An etcd member did not come up, or an etcdctl command the cluster itself needs failed."""


@dataclasses.dataclass(frozen=True)
class Grant:
    """One permission of a role: perm is read, write or readwrite; key a prefix unless prefix=False."""

    perm: str
    key: str
    prefix: bool = True


def _openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise EtcdError(f"openssl {' '.join(args)}: {p.stderr.strip()}")


class EtcdCluster:
    """1 or 3 etcd members on lab nodes etcd0.., a client node etcdc for etcdctl, data under data_dir."""

    def __init__(self, lab: Lab, members: int = 1, data_dir: Path | str = "/dev/shm", tls: bool = False) -> None:
        if members not in (1, 3, 5):
            raise ValueError(f"members must be 1, 3 or 5: {members}")
        self.lab = lab
        self.tls = tls
        self.root = Path(data_dir) / f"pyexec-etcd-{lab.tag}"
        self.root.mkdir(parents=True, mode=0o700)  # never another cluster's: mkdir fails if it exists
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen[Any] | None] = []
        self._logs: list[IO[bytes] | None] = []
        self._closed = False
        self.auth = False
        self.passwords: dict[str, str] = {}
        try:
            self.nodes = [lab.add_node(f"etcd{i}") for i in range(members)]
            self.client_node = lab.add_node("etcdc")
            self.procs = [None] * members
            self._logs = [None] * members
            if tls:
                self._make_ca()
                for i in range(members):
                    self._server_cert(i)
            for i in range(members):
                self.start(i, wait=False)
            self.wait_healthy()
        except BaseException:
            self.close()
            raise

    # --- addresses and certificates ---

    @property
    def scheme(self) -> str:
        """The client URLs' scheme: https with tls, else http."""
        return "https" if self.tls else "http"

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL."""
        return [f"{self.scheme}://{n.addr}:{CLIENT_PORT}" for n in self.nodes]

    @property
    def ca(self) -> Path:
        """The CA certificate that signed every member's and client's certificate (tls=True only)."""
        if not self.tls:
            raise EtcdError("cluster runs without TLS: no CA")
        return self.root / "pki" / "ca.crt"

    def _make_ca(self) -> None:
        pki = self.root / "pki"
        pki.mkdir(mode=0o700)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", f"/CN=pyexec-lab-{self.lab.tag}-ca",
                 cwd=pki)
        # Auth tokens are JWTs signed with this key: any member checks one by the signature alone,
        # where etcd's default "simple" token is known only to members that have applied its login,
        # and dies after 5 idle minutes.  A JWT expires 1 h after issue: re-authenticate then.
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "jwt.key", cwd=pki)
        _openssl("pkey", "-in", "jwt.key", "-pubout", "-out", "jwt.pub", cwd=pki)

    def _sign(self, name: str, subject: str, ext: str) -> tuple[Path, Path]:
        pki = self.root / "pki"
        (pki / f"{name}.ext").write_text(ext)
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=pki)
        return pki / f"{name}.crt", pki / f"{name}.key"

    def _server_cert(self, i: int) -> tuple[Path, Path]:
        # clientAuth too: etcd's own grpc-gateway dials the member with the server certificate.
        return self._sign(f"member{i}", f"/CN=etcd{i}",
                          f"subjectAltName=IP:{self.nodes[i].addr}\n"
                          "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n")

    def client_cert(self, cn: str) -> tuple[Path, Path]:
        """A CA-signed client certificate and key with CN = cn (the etcd user it authenticates as)."""
        if not self.tls:
            raise EtcdError("cluster runs without TLS: no client certificates")
        if not cn or not all(c.isalnum() or c in "-_." for c in cn):
            raise ValueError(f"certificate CN must be letters, digits, - _ .: {cn!r}")
        pki = self.root / "pki"
        if (pki / f"client-{cn}.crt").exists():
            return pki / f"client-{cn}.crt", pki / f"client-{cn}.key"
        return self._sign(f"client-{cn}", f"/CN={cn}", "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n")

    def gateway_cert(self) -> tuple[Path, Path]:
        """A CA-signed client certificate without a CN, for the JSON gateway (etcd3gw).

        With --client-cert-auth the gateway answers 400 to any certificate that has a CN ("CommonName
        of client sending a request against gateway will be ignored"): its clients pass TLS with this
        one and authenticate with a user's password (POST /v3/auth/authenticate, token in Authorization)."""
        if not self.tls:
            raise EtcdError("cluster runs without TLS: no client certificates")
        pki = self.root / "pki"
        if (pki / "gateway.crt").exists():
            return pki / "gateway.crt", pki / "gateway.key"
        return self._sign("gateway", "/O=pyexec-gateway", "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n")

    # --- members ---

    def _argv(self, i: int) -> list[str]:
        n = self.nodes[i]
        peers = ",".join(f"m{j}=http://{m.addr}:{PEER_PORT}" for j, m in enumerate(self.nodes))
        argv = [ETCD, "--name", f"m{i}", "--data-dir", str(self.root / f"m{i}"),
                "--listen-client-urls", f"{self.scheme}://{n.addr}:{CLIENT_PORT}",
                "--advertise-client-urls", f"{self.scheme}://{n.addr}:{CLIENT_PORT}",
                "--listen-peer-urls", f"http://{n.addr}:{PEER_PORT}",
                "--initial-advertise-peer-urls", f"http://{n.addr}:{PEER_PORT}",
                "--initial-cluster", peers, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"pyexec-{self.lab.tag}",
                "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
                "--logger", "zap", "--log-outputs", "stderr"]
        if self.tls:
            pki = self.root / "pki"
            argv += ["--client-cert-auth", "--trusted-ca-file", str(pki / "ca.crt"),
                     "--cert-file", str(pki / f"member{i}.crt"), "--key-file", str(pki / f"member{i}.key"),
                     "--auth-token", f"jwt,pub-key={pki / 'jwt.pub'},priv-key={pki / 'jwt.key'},sign-method=ES256,ttl=1h"]
        return argv

    def log_path(self, i: int) -> Path:
        """Member i's log (stderr of every start, appended)."""
        return self.root / f"m{i}.log"

    def log_tail(self, i: int, lines: int = 15) -> str:
        """The last lines of member i's log."""
        try:
            return "\n".join(self.log_path(i).read_text(errors="replace").splitlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def start(self, i: int, wait: bool = True) -> None:
        """Start member i (again, on its data dir); with wait, until the cluster answers healthy."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            raise EtcdError(f"member etcd{i} is running")
        log = open(self.log_path(i), "ab")
        log.write(f"--- pyexec: starting etcd{i} at {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        old = self._logs[i]
        if old is not None:
            old.close()
        self._logs[i] = log
        self.procs[i] = self.lab.popen(self.nodes[i], self._argv(i), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=log)
        if wait:
            self.wait_healthy()

    def alive(self) -> list[int]:
        """The members whose process runs."""
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def kill(self, i: int) -> None:
        """SIGKILL member i and reap it."""
        p = self.procs[i]
        if p is not None:
            self.lab.kill(p)

    def kill_all(self) -> None:
        """SIGKILL every member."""
        for i in range(len(self.procs)):
            self.kill(i)

    def wait_healthy(self, timeout: float = START_TIMEOUT, members: Sequence[int] | None = None) -> float:
        """Wait until every running member (or `members`) answers healthy; the seconds it took."""
        t0 = time.monotonic()
        want = list(members) if members is not None else self.alive()
        last = ""
        while True:
            for i in want:
                p = self.procs[i]
                if p is None or p.poll() is not None:
                    raise EtcdError(f"etcd member etcd{i} ({self.nodes[i].addr}) exited "
                                    f"({None if p is None else p.returncode}); log tail:\n{self.log_tail(i)}")
            eps = [self.endpoints[i] for i in want]
            r = self.etcdctl("endpoint", "health", "-w", "json", endpoints=eps, command_timeout=1.0)
            if r.returncode == 0:
                try:
                    if all(h.get("health") for h in json.loads(r.stdout)):
                        return time.monotonic() - t0
                except ValueError:
                    pass
            last = (r.stderr or r.stdout).strip()[-500:]
            if time.monotonic() - t0 > timeout:
                tails = "\n".join(f"--- etcd{i} ({self.nodes[i].addr}):\n{self.log_tail(i)}" for i in want)
                raise EtcdError(f"etcd cluster not healthy after {timeout:.0f}s: {last}\n{tails}")
            time.sleep(0.1)

    def status(self) -> dict[int, dict[str, Any]]:
        """`etcdctl endpoint status` of every running member that answers, by member index."""
        out: dict[int, dict[str, Any]] = {}
        for i in self.alive():
            r = self.etcdctl("endpoint", "status", "-w", "json", endpoints=[self.endpoints[i]], command_timeout=1.0)
            if r.returncode == 0:
                try:
                    out[i] = json.loads(r.stdout)[0]["Status"]
                except (ValueError, KeyError, IndexError):
                    continue
        return out

    def leader(self, timeout: float = 10.0) -> int:
        """The index of the member every answering member names leader (waits up to timeout for one)."""
        end = time.monotonic() + timeout
        while True:
            st = self.status()
            ids = {i: s["header"]["member_id"] for i, s in st.items()}
            leaders = {s.get("leader") for s in st.values()}
            if len(leaders) == 1:
                lid = leaders.pop()
                for i, mid in ids.items():
                    if mid == lid:
                        return i
            if time.monotonic() > end:
                raise EtcdError(f"no leader agreed on after {timeout}s: {st}")
            time.sleep(0.05)

    # --- clients ---

    def etcdctl(self, *args: str, user_cert: tuple[Path, Path] | str | None = None, no_cert: bool = False,
                endpoints: Sequence[str] | None = None, command_timeout: float = 5.0,
                node: Node | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run etcdctl in a lab node (default: etcdc) against the cluster; never raises on its exit status.

        With TLS, it authenticates with user_cert ((cert, key) or a CN), else as root; no_cert sends none."""
        argv = [ETCDCTL, f"--endpoints={','.join(endpoints or self.endpoints)}",
                f"--dial-timeout={min(command_timeout, 2.0)}s", f"--command-timeout={command_timeout}s"]
        if self.tls:
            argv.append(f"--cacert={self.ca}")
            if not no_cert:
                cert, key = self.client_cert(user_cert if isinstance(user_cert, str) else "root") \
                    if not isinstance(user_cert, tuple) else user_cert
                argv += [f"--cert={cert}", f"--key={key}"]
        return self.lab.run(node or self.client_node, [*argv, *args], timeout=command_timeout + 15,
                            capture_output=True, text=True, input=input,
                            env={"PATH": "/usr/bin:/bin", "ETCDCTL_API": "3"})

    def _ctl_ok(self, *args: str) -> str:
        r = self.etcdctl(*args)
        if r.returncode != 0:
            raise EtcdError(f"etcdctl {' '.join(args)}: {(r.stderr or r.stdout).strip()}")
        return str(r.stdout)

    # --- RBAC ---

    def enable_auth(self, roles: Mapping[str, Sequence[Grant]], users: Mapping[str, Sequence[str]]) -> dict[str, str]:
        """Create roles, users (with their roles) and root, then `auth enable`: each user's password by name.

        A gRPC client (etcdctl) is its certificate's CN.  The JSON gateway (/v3/..., what etcd3gw speaks)
        ignores the CN ("CommonName of client sending a request against gateway will be ignored"), so
        each user also gets a random password: POST /v3/auth/authenticate, then send the token as the
        Authorization header."""
        if not self.tls:
            raise EtcdError("auth by certificate CN needs tls=True")
        for role, grants in roles.items():
            self._ctl_ok("role", "add", role)
            for g in grants:
                if g.perm not in ("read", "write", "readwrite"):
                    raise ValueError(f"permission must be read, write or readwrite: {g.perm!r}")
                self._ctl_ok("role", "grant-permission", *(["--prefix=true"] if g.prefix else []), role, g.perm, g.key)
        for user, user_roles in {"root": ["root"], **users}.items():
            self.passwords[user] = secrets.token_hex(16)
            self._ctl_ok("user", "add", user, f"--new-user-password={self.passwords[user]}")
            for role in user_roles:
                self._ctl_ok("user", "grant-role", user, role)
        self._ctl_ok("auth", "enable")
        self.auth = True
        return {u: self.passwords[u] for u in users}

    def fleet_roles(self, hosts: Sequence[str], coordinator: str = "coordinator") -> dict[str, str]:
        """The fleet's RBAC: host H reads /pyexec/plans/ and /pyexec/runs/ and writes /pyexec/h/H/; the
        coordinator reads /pyexec/ and writes /pyexec/runs/ and /pyexec/plans/.

        Users are named after the hosts and the coordinator (their certificates' CN); their passwords by name."""
        names = [*hosts, coordinator]
        if len(set(names)) != len(names) or "root" in names:
            raise ValueError(f"host and coordinator names must be distinct and not 'root': {names}")
        roles: dict[str, list[Grant]] = {}
        users: dict[str, list[str]] = {}
        for h in hosts:
            # Not the other hosts' keys: their reports hold their scripts' output.
            roles[f"pyexec-host-{h}"] = [Grant("read", f"{PREFIX}plans/"), Grant("read", f"{PREFIX}runs/"),
                                         Grant("readwrite", f"{PREFIX}h/{h}/")]
            users[h] = [f"pyexec-host-{h}"]
        roles["pyexec-coordinator"] = [Grant("read", PREFIX), Grant("readwrite", f"{PREFIX}runs/"),
                                       Grant("readwrite", f"{PREFIX}plans/")]
        users[coordinator] = ["pyexec-coordinator"]
        return self.enable_auth(roles, users)

    # --- teardown ---

    def close(self) -> None:
        """Kill and reap every member, remove the data dirs and certificates; idempotent, first error raised."""
        first: BaseException | None = None
        for i in range(len(self.procs)):
            try:
                self.kill(i)
            except BaseException as e:  # noqa: BLE001 - every step is tried, the first error raised
                first = first or e
        for f in self._logs:
            if f is not None:
                f.close()
        self._logs = [None] * len(self._logs)
        try:
            shutil.rmtree(self.root, ignore_errors=False)
        except FileNotFoundError:
            pass
        except BaseException as e:  # noqa: BLE001
            first = first or e
        self._closed = True
        if first is not None:
            raise first

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
