"""The etcd client of the fleet: etcd's JSON gateway (/v3) through etcd3gw's session (TLS, client
certificates), every request bounded in time, endpoints tried in turn; a lease kept alive by a
thread; a view of key ranges kept current by a watch, with a read as its fallback."""
from __future__ import annotations

import base64
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson

from pyexec import errors

try:
    import etcd3gw
    import requests
    HAVE_CLIENT = True
except ImportError:  # the fleet extra is not installed: Client() says so with 325
    HAVE_CLIENT = False

REQUEST_S = 1.0  # one request's bound (per endpoint tried)
WATCH_IDLE_S = 5.0  # a watch stream silent this long is opened again
RETRY_S = 0.05  # the pause between two rounds over the endpoints, when a deadline leaves time for another


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def prefix_end(prefix: str) -> str:
    """The range end that makes [prefix, end) every key starting with prefix."""
    b = prefix.encode()
    return (b[:-1] + bytes([b[-1] + 1])).decode()


class Unreachable(Exception):
    """No endpoint answered within the bound."""


@dataclasses.dataclass(frozen=True)
class KV:
    """One key as etcd holds it."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def _kv(d: dict[str, Any]) -> KV:
    # A key is bytes to etcd: one that is not UTF-8 (anyone who can write the range) must not stop a
    # reader; replaced, it matches no name the protocol uses (protocol.check_name).
    return KV(_unb64(d["key"]).decode("utf-8", "replace"), _unb64(d.get("value", "")), int(d.get("create_revision", 0)),
              int(d.get("mod_revision", 0)), int(d.get("lease", 0)))


@dataclasses.dataclass(frozen=True)
class Access:
    """How to reach the members: for https, the CA that signed their certificates and this client's
    own certificate (without a CN: etcd's gateway refuses one that has one); with etcd's auth on, a
    user and its password (the gateway cannot take the user from a certificate)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


def put_op(key: str, value: bytes, lease: int = 0) -> dict[str, Any]:
    """A put for a transaction's branch."""
    op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        op["lease"] = lease
    return {"request_put": op}


def absent(key: str) -> dict[str, Any]:
    """A transaction's compare: key does not exist."""
    return {"key": _b64(key), "target": "VERSION", "result": "EQUAL", "version": 0}


def none_under(prefix: str) -> dict[str, Any]:
    """A transaction's compare: no key starts with prefix (a compare over a range holds for every key
    in it, and for an empty range it compares a key that does not exist: etcd 3.3 and later)."""
    return {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "target": "VERSION", "result": "EQUAL",
            "version": 0}


def modified_at(key: str, revision: int) -> dict[str, Any]:
    """A transaction's compare: key is as it was written at revision (not written since)."""
    return {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}


def present(key: str) -> dict[str, Any]:
    """A transaction's compare: key exists."""
    return {"key": _b64(key), "target": "VERSION", "result": "GREATER", "version": 0}


def created_at(key: str, revision: int) -> dict[str, Any]:
    """A transaction's compare: key is the one created at revision (not deleted and made again)."""
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": revision}


class Client:
    """etcd's /v3 JSON API over the given endpoints (http:// or https:// URLs)."""

    def __init__(self, endpoints: Iterable[str], tls: Access | None = None, request_s: float = REQUEST_S):
        if not HAVE_CLIENT:
            raise errors.PyexecError(325, "python module etcd3gw not found")
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise ValueError("no etcd endpoint given")
        self.request_s = request_s
        self._clients = []
        self.access = tls = tls or Access()
        for url in self.endpoints:
            u = urlsplit(url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"an etcd endpoint must be an http:// or https:// URL, not {url!r}")
            session = requests.Session()
            # Only what the config says: no REQUESTS_CA_BUNDLE, proxy or .netrc from the environment.
            session.trust_env = False
            if tls.ca is not None:
                session.verify = tls.ca
            if tls.cert is not None and tls.key is not None:
                session.cert = (tls.cert, tls.key)
            self._clients.append(etcd3gw.Etcd3Client(
                host=u.hostname, port=u.port or 2379, protocol=u.scheme, timeout=request_s, api_path="/v3/",
                session=session))
        self._cur = 0
        self._lock = threading.Lock()

    def call(self, path: str, body: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """POST body to /v3/<path> on the first endpoint that answers: each endpoint once, and with a
        (time.monotonic()) deadline again and again until it (a pooled connection a partition left
        dead fails once, a leader election a few times); Unreachable if none did; RuntimeError for an
        error answer."""
        tried = 0
        last = ""
        while tried < len(self._clients) or (deadline is not None and deadline - time.monotonic() > RETRY_S):
            if tried and tried % len(self._clients) == 0:
                time.sleep(RETRY_S)
            with self._lock:
                i = self._cur
            c = self._clients[i]
            timeout = self.request_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    break
            try:
                if self.access.user is not None and "Authorization" not in c.session.headers:
                    self._login(c, timeout)
                r = c.session.post(c.get_url(path), data=orjson.dumps(body), timeout=timeout)
                if r.status_code == 401 and self.access.user is not None:  # a token expired: log in again
                    self._login(c, timeout)
                    r = c.session.post(c.get_url(path), data=orjson.dumps(body), timeout=timeout)
            except requests.RequestException as e:
                last = f"{self.endpoints[i]}: {type(e).__name__}"
                with self._lock:
                    if self._cur == i:
                        self._cur = (i + 1) % len(self._clients)
                tried += 1
                continue
            if r.status_code == 503 or (r.status_code >= 500 and "leader" in r.text):
                last = f"{self.endpoints[i]}: {r.status_code} {r.text[:200]}"
                with self._lock:
                    if self._cur == i:
                        self._cur = (i + 1) % len(self._clients)
                tried += 1
                continue
            if r.status_code != 200:
                raise RuntimeError(f"etcd {self.endpoints[i]} /v3/{path}: {r.status_code} {r.text[:300]}")
            doc: dict[str, Any] = r.json()
            return doc
        raise Unreachable(last or "no time left to ask etcd")

    def _login(self, c: Any, timeout: float) -> None:
        """A token for the user (etcd's auth): every later request of this endpoint carries it."""
        c.session.headers.pop("Authorization", None)
        r = c.session.post(c.get_url("auth/authenticate"), timeout=timeout,
                           data=orjson.dumps({"name": self.access.user, "password": self.access.password or ""}))
        if r.status_code != 200:
            raise RuntimeError(f"etcd refused user {self.access.user!r}: {r.status_code} {r.text[:200]}")
        c.session.headers["Authorization"] = r.json()["token"]

    def get(self, key: str, prefix: bool = False, deadline: float | None = None,
            revision: int = 0) -> tuple[list[KV], int]:
        """The key (or every key under it, prefix True) as of revision (0: now), and that revision."""
        body: dict[str, Any] = {"key": _b64(key)}
        if revision:
            body["revision"] = revision
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        doc = self.call("kv/range", body, deadline)
        return [_kv(d) for d in doc.get("kvs", [])], int(doc["header"]["revision"])

    def put(self, key: str, value: bytes, lease: int = 0, deadline: float | None = None) -> int:
        """Put; the revision it made."""
        doc = self.call("kv/put", put_op(key, value, lease)["request_put"], deadline)
        return int(doc["header"]["revision"])

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            deadline: float | None = None) -> tuple[bool, int]:
        """A transaction: (whether every compare held and success was applied, the revision)."""
        doc = self.call("kv/txn", {"compare": compare, "success": success}, deadline)
        return bool(doc.get("succeeded", False)), int(doc["header"]["revision"])

    def grant(self, ttl: int, deadline: float | None = None) -> int:
        """A new lease's id."""
        return int(self.call("lease/grant", {"TTL": ttl}, deadline)["ID"])

    def keepalive(self, lease: int, deadline: float | None = None) -> int:
        """Renew a lease once: its TTL, or -1 if it expired."""
        return int(self.call("lease/keepalive", {"ID": lease}, deadline).get("result", {}).get("TTL", -1))

    def revoke(self, lease: int, deadline: float | None = None) -> None:
        """Revoke a lease: its keys go with it."""
        self.call("kv/lease/revoke", {"ID": lease}, deadline)

    def watch_stream(self, key: str, range_end: str, start_revision: int,
                     timeout: tuple[float, float]) -> Any:
        """The streaming response of a watch from start_revision (the caller reads and closes it)."""
        with self._lock:
            i = self._cur
        c = self._clients[i]
        body = {"create_request": {"key": _b64(key), "range_end": _b64(range_end), "start_revision": start_revision}}
        try:
            return c.session.post(c.get_url("watch"), data=orjson.dumps(body), stream=True, timeout=timeout)
        except requests.RequestException:
            with self._lock:
                if self._cur == i:
                    self._cur = (i + 1) % len(self._clients)
            raise


class Lease:
    """A lease kept alive by a thread every KEEPALIVE_S; `lost` once etcd said it expired (or it could
    not be renewed before its TTL ran out)."""

    def __init__(self, client: Client, ttl: int, every_s: float):
        self.client = client
        self.ttl = ttl
        self.id = client.grant(ttl)
        self.lost = False
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._every = every_s
        self._t = threading.Thread(target=self._run, name="etcd-lease", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if self.client.keepalive(self.id, time.monotonic() + self._every) <= 0:
                    self.lost = True
                    return
                self._renewed = time.monotonic()
            except (Unreachable, RuntimeError):
                if time.monotonic() - self._renewed > self.ttl:
                    self.lost = True

    def close(self, revoke: bool = True) -> None:
        """Stop renewing; revoke (best effort, bounded) unless told not to."""
        self._stop.set()
        if revoke and not self.lost:
            try:
                self.client.revoke(self.id, time.monotonic() + self.client.request_s)
            except (Unreachable, RuntimeError):
                pass  # it expires on its own within its TTL


class View:
    """The keys under some prefixes (none inside another), kept current by a watch per prefix from a
    revision on, and read again every poll_s (a watch is a stream a partition can stall, silently).
    `fd` becomes readable on every change; `snapshot()` is a copy of the keys; `error` says the last
    problem seen.  Each prefix keeps its own revision: its watch's events come in its own order,
    and one stream's later event says nothing of what another has not delivered yet."""

    def __init__(self, client: Client, prefixes: list[str], start_revision: int, poll_s: float = 0.25,
                 accept: Callable[[str], bool] = lambda k: True):
        self.client = client
        self.prefixes = prefixes
        self.accept = accept
        self.poll_s = poll_s
        self.keys: dict[str, KV] = {}
        self.error = ""
        # Per prefix: every event of it up to this revision is in self.keys.
        self._rev = {p: start_revision for p in prefixes}
        self._lock = threading.Lock()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fd = self._r
        self._stop = threading.Event()
        self._streams: list[Any] = []
        self.refresh()
        self._threads = [threading.Thread(target=self._watch, args=(p,), name="etcd-watch", daemon=True)
                         for p in prefixes]
        self._threads.append(threading.Thread(target=self._poll, name="etcd-poll", daemon=True))
        for t in self._threads:
            t.start()

    def _changed(self) -> None:
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the reader is awake already

    def refresh(self, deadline: float | None = None) -> bool:
        """Read every prefix now, all at one revision; False if etcd did not answer."""
        found: dict[str, dict[str, KV]] = {}
        rev = 0
        try:
            for p in self.prefixes:
                kvs, r = self.client.get(p, prefix=True, deadline=deadline, revision=rev)
                rev = rev or r
                found[p] = {kv.key: kv for kv in kvs if self.accept(kv.key)}
        except (Unreachable, RuntimeError) as e:  # a compacted revision too: the next poll reads anew
            self.error = str(e)
            return False
        changed = False
        with self._lock:
            for p in self.prefixes:
                if rev < self._rev[p]:
                    continue  # its watch has delivered later events than this read saw
                old = {k: v for k, v in self.keys.items() if k.startswith(p)}
                if old != found[p]:
                    changed = True
                    for k in old:
                        del self.keys[k]
                    self.keys.update(found[p])
                self._rev[p] = rev
        if changed:
            self._changed()
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh(time.monotonic() + self.poll_s)
            except Exception as e:  # noqa: BLE001 - an answer not as expected: this thread is the fallback, it goes on
                self.error = f"poll: {type(e).__name__}: {e}"

    def _watch(self, prefix: str) -> None:
        end = prefix_end(prefix)
        while not self._stop.is_set():
            with self._lock:
                start = self._rev[prefix] + 1
            try:
                # The read timeout makes an idle (or stalled) stream end: the loop opens it again from
                # the last revision seen, so nothing is missed either way (the poll covers meanwhile).
                resp = self.client.watch_stream(prefix, end, start, (self.client.request_s, WATCH_IDLE_S))
            except Exception as e:  # noqa: BLE001 - any failure: the poll covers, try again shortly
                self.error = f"watch: {type(e).__name__}"
                self._stop.wait(0.1)
                continue
            self._streams.append(resp)
            try:
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        break
                    if line:
                        self._apply(prefix, orjson.loads(line).get("result", {}))
            except Exception as e:  # noqa: BLE001 - a read timeout or a broken stream: reopen it
                self.error = f"watch: {type(e).__name__}"
            finally:
                resp.close()
                self._streams.remove(resp)

    def _apply(self, prefix: str, result: dict[str, Any]) -> None:
        if result.get("compact_revision"):
            self.error = "watch: compacted; reading instead"
            self.refresh()
            return
        events = result.get("events", [])
        if not events:
            return
        with self._lock:
            for ev in events:
                kv = _kv(ev["kv"])
                # At or before its prefix's revision: in keys already (a read since, or an earlier event).
                if kv.mod_revision <= self._rev[prefix] or not self.accept(kv.key):
                    continue
                if ev.get("type") == "DELETE":
                    self.keys.pop(kv.key, None)
                else:
                    self.keys[kv.key] = kv
            self._rev[prefix] = max([self._rev[prefix]] + [int(ev["kv"].get("mod_revision", 0)) for ev in events])
        self._changed()

    def drain(self) -> None:
        """Empty the change pipe (before reading the keys that woke the reader)."""
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def snapshot(self) -> dict[str, KV]:
        """A copy of the keys as last seen."""
        with self._lock:
            return dict(self.keys)

    def close(self) -> None:
        """Stop watching and polling (the threads end within a second)."""
        self._stop.set()
        for s in list(self._streams):
            try:
                s.close()
            except Exception:  # noqa: BLE001, S110 - closing a stream another thread reads: best effort
                pass
        os.close(self._r)
        os.close(self._w)
