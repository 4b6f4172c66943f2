"""Who a quiescer's password may go to: the server its config names, authenticated before a byte of
the password is sent (docs/security-quiescers.md).

A local user can listen where the server should be while it is down: bind its TCP port (loopback
included: ports above 1023 are anyone's) or its socket path in a directory the user can write to.
Both drivers then send the password to that program if it asks (PyMySQL: mysql_clear_password or
dialog in clear; libpq: AuthenticationCleartextPassword), and a program that answers every query
with "OK" makes the run report app-consistent for a database nobody locked.  So:

- Unix socket: every directory and symlink on the way is root's or the server account's
  (serverUser), none writable by anyone else except through the sticky bit (the rule of scripts,
  with the server's account added: it creates its own socket directory, which Debian makes
  group-writable for its group), and the connection is made through the checked directory's fd.
  Then the connected socket's peer (SO_PEERCRED, unix(7): the credentials of the process that
  called listen(2)) must be serverUser, checked before the driver writes anything: only the
  server's own account, or root, can hold a listening socket with those credentials.  The
  directory rule keeps the path on the server the admin named; the peer check is what a sticky
  /tmp cannot give (anyone may bind /tmp/mysql.sock while the server is down).
- TCP: TLS with the certificate verified against tlsCAFile and its name checked against host,
  before the password; or, with "tls": "disable" (insecure, said as a warning), the engine's
  refusal of methods that would send the password recoverably (see each engine's module)."""
from __future__ import annotations

import dataclasses
import os
import pwd
import socket
import ssl
import struct
from typing import Any

from pyexec import dbconfig, trust
from pyexec.errors import ConfigError, PyexecError

PG_SOCKET = ".s.PGSQL.{port}"  # libpq's socket name in its host directory
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7), SO_PEERCRED)


class Refused(Exception):
    """The other end is not the configured server: nothing of the password was sent."""


@dataclasses.dataclass
class Endpoint:
    """The checked facts of where a quiescer connects: the server's account (Unix sockets), the CA's
    certificates (TCP with TLS)."""

    cfg: dbconfig.DatabaseConfig
    account: str = ""
    uid: int = -1
    owners: trust.Owners = trust.ROOT
    ca_pem: bytes = b""

    @property
    def where(self) -> str:
        """The configured server, as messages name it."""
        return self.cfg.host if self.cfg.socket else f"{self.cfg.host}:{self.cfg.port}"

    @property
    def socket_path(self) -> str:
        """The socket file (MariaDB's host; PostgreSQL's host is its directory)."""
        if self.cfg.engine == "postgresql":
            return os.path.join(self.cfg.host, PG_SOCKET.format(port=self.cfg.port))
        return self.cfg.host

    @property
    def socket_dir(self) -> str:
        """The directory the socket is in."""
        return self.cfg.host if self.cfg.engine == "postgresql" else os.path.dirname(self.cfg.host)

    def open_socket_dir(self) -> int:
        """An O_PATH fd of the socket's directory, the whole chain checked; Refused or PyexecError."""
        try:
            return trust.open_dir(self.socket_dir, trust.SOCKET_DIR, self.owners)
        except PyexecError as e:
            raise _refusal(e) from e

    def open_socket(self) -> int:
        """An O_PATH fd of the socket, the whole chain checked (a symlink at its name too); Refused, or
        OSError if it does not exist (the server is down)."""
        try:
            return trust.open_socket(self.socket_path, trust.SOCKET_DIR, self.owners)
        except PyexecError as e:
            raise _refusal(e) from e

    def connect_unix(self, timeout_s: float) -> socket.socket:
        """A stream socket connected to the configured socket and served by serverUser, or Refused
        (the connection closed: nothing was written to it) or OSError (nobody listens)."""
        fd = self.open_socket()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout_s)
            # Through the checked inode's fd: the path cannot name another socket between the walk
            # and the connect.
            s.connect(f"/proc/self/fd/{fd}")
            self.check_peer(s)
        except BaseException:
            s.close()
            raise
        finally:
            os.close(fd)
        return s

    def check_peer(self, s: socket.socket) -> None:
        """Refused unless the process listening at s's other end runs as serverUser."""
        _pid, uid, _gid = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != self.uid:
            raise Refused(f"refused: {self.socket_path} is served by {_name(uid)}, not by serverUser "
                          f"{self.account}: not the database server; the password was not sent")

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context trusting tlsCAFile's CA alone, checking the server's name (TLS 1.2+)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii"))
        return ctx

    def ca_memfd(self) -> int:
        """A memfd holding tlsCAFile's certificates as checked (libpq's sslrootcert takes a path: it
        gets /proc/self/fd/<fd>, so what it reads is what the check read)."""
        fd = os.memfd_create("pyexec-tls-ca", os.MFD_CLOEXEC)
        try:
            os.write(fd, self.ca_pem)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _refusal(e: PyexecError) -> Exception:
    """A walk's failure at connect time: a missing socket is a server down (OSError), the rest Refused."""
    if e.code == trust.SOCKET_DIR.not_found:
        return FileNotFoundError(2, e.detail.removeprefix(f"{trust.SOCKET_DIR.label}: "), e.path)
    return Refused(f"refused: {e.detail}; the password was not sent")


def check(cfg: dbconfig.DatabaseConfig) -> Endpoint:
    """The endpoint of cfg, checked now (the check phase): serverUser is an account (305), the socket's
    directory chain is trusted as far as it exists (306), tlsCAFile is root's and holds certificates
    (306).  What does not exist yet (a server down) is left to the connect."""
    ep = Endpoint(cfg)
    if cfg.socket:
        try:
            pw = pwd.getpwnam(cfg.server_user)
        except KeyError:
            raise ConfigError(305, f"{cfg.server_user!r} is not an account on this machine: set serverUser to "
                                   "the OS user the database server runs as", cfg.path, "serverUser") from None
        ep.account, ep.uid = pw.pw_name, pw.pw_uid
        ep.owners = trust.Owners(frozenset({0, pw.pw_uid}), frozenset({0, pw.pw_gid}), f"root or {pw.pw_name}")
        try:
            os.close(trust.open_dir(ep.socket_dir, trust.SOCKET_DIR, ep.owners))
        except PyexecError as e:
            if e.code != trust.SOCKET_DIR.not_found:
                raise
    elif cfg.tls == "verify-full":
        with trust.open_trusted(cfg.tls_ca_file, trust.CA_FILE) as f:
            ep.ca_pem = f.read()
        try:
            ep.ssl_context()
        except (ssl.SSLError, ValueError, UnicodeDecodeError) as err:
            raise ConfigError(305, f"{cfg.tls_ca_file} holds no usable PEM certificate: {err}",
                              cfg.path, "tlsCAFile") from err
    return ep


def refuse_plugin(name: str) -> type:
    """A PyMySQL auth_plugin_map entry that refuses the plugin name (before its first byte is sent)."""

    class _Refuse:
        def __init__(self, conn: Any):
            pass

        def authenticate(self, pkt: Any) -> Any:
            raise Refused(f"refused: the server asked for the {name} authentication plugin, which would "
                          "send the password where it can be read back, to a server TLS did not "
                          "authenticate (\"tls\": \"disable\"); the password was not sent")

    return _Refuse
