"""The quiescer: a built-in plugin's session driven from the pre-phase to the post-phase, each step
bounded by a watchdog (the plugin's timeoutInSeconds, a signal to pyexec) that ends the session."""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Self

from pyexec import config, dbconfig, native, trust, waits
from pyexec.errors import PyexecError, ScriptError
from pyexec.quiesce import endpoint, mariadb, postgresql
from pyexec.quiesce.session import Failed, Session
from pyexec.steps import CODES, ScriptResult

# The driver each engine needs and the extra that installs it (pyproject's optional-dependencies).
DRIVERS = {"postgresql": ("psycopg", "postgresql"), "mariadb": ("pymysql", "mariadb")}


def load_driver(engine: str, path: str) -> ModuleType:
    """The engine's client library, or ScriptError 300 naming the extra that installs it."""
    module, extra = DRIVERS[engine]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ScriptError(300, f"the {engine} quiescer needs the {module} driver, which is not installed: "
                               f"pip install 'pyexec[{extra}]'", path) from err


def read_password(path: str) -> str:
    """The first line of a credentials file that passes the trust rules (root's, mode 600 or 400)."""
    if not path:
        return ""
    with trust.open_trusted(path, trust.CREDENTIALS) as f:
        data = f.read(4096)
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "strict")


class _Watchdog:
    """In its block, calls abort() once if the deadline passes or cancel_fd becomes readable first:
    one wait in another thread, woken by the block's end (no polling).  `fired` says which."""

    def __init__(self, deadline_ns: int, cancel_fd: int, abort: Callable[[], None], nat: native.Native):
        self.fired: str | None = None  # "timeout" | "cancelled"
        self.deadline_ns, self.cancel_fd, self.abort, self.nat = deadline_ns, cancel_fd, abort, nat
        self._r = self._w = -1
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        ready = waits.wait_readable([self._r], self.deadline_ns, self.cancel_fd, self.nat)
        if self._r in ready:
            return
        self.fired = "cancelled" if ready else "timeout"
        with contextlib.suppress(Exception):  # the session is being torn down either way
            self.abort()

    def __enter__(self) -> Self:
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._watch, name="pyexec-quiesce-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        os.write(self._w, b"x")
        assert self._thread is not None
        self._thread.join()
        os.close(self._r)
        os.close(self._w)


class Quiescer:
    """A built-in plugin: its config, password and driver (loaded by the check), and its session
    from the pre-phase to the post-phase."""

    def __init__(self, entry: config.PluginEntry, cfg: dbconfig.DatabaseConfig):
        """Load the driver, check where the password will go, read the credentials: ScriptError/TrustError/
        ConfigError now, before anything runs."""
        self.entry = entry
        self.cfg = cfg
        driver = load_driver(cfg.engine, cfg.path)
        ep = endpoint.check(cfg)
        password = read_password(cfg.credentials_file)
        self.session: Session | None = None
        self._make: Callable[[], Session]
        if cfg.engine == "postgresql":
            postgresql.check_driver(cfg, driver)
            postgresql.check_label_dir(cfg)
            self._make = lambda: postgresql.PostgresSession(cfg, password, driver, ep)
        else:
            mariadb.check_driver(cfg, driver)
            self._make = lambda: mariadb.MariaDBSession(cfg, password, driver, ep)

    def _result(self, phase: str) -> ScriptResult:
        return ScriptResult(self.entry.name, phase, self.cfg.path, tries=1)

    def _step(self, res: ScriptResult, session: Session, step: Callable[[], dict[str, str]],
              deadline_ns: int, cancel_fd: int, nat: native.Native) -> bool:
        """Run one bounded step into res; False (and the session closed) if it failed."""
        dog = _Watchdog(deadline_ns, cancel_fd, session.abort, nat)
        err: Exception | None = None
        try:
            with dog:
                res.facts.update(step())
        except Exception as e:  # noqa: BLE001 - Failed, or one of the driver's many errors: an outcome
            err = e
        if dog.fired is None and err is None:
            return True
        if dog.fired is None and nat.now_ns() >= deadline_ns:
            # The driver's own timeouts (PyMySQL's read timeout, libpq's connect_timeout) are set to the
            # same bound and may notice it an instant before the watchdog: a step that failed at its
            # deadline timed out, whichever noticed first.
            dog.fired = "timeout"
        if dog.fired is not None:
            res.stopped(dog.fired, self.cfg.timeout, self.cfg.host_limit, "the session was ended, nothing is held")
        else:
            res.error_code = CODES[res.phase]["failed"]
            res.detail = str(err) if isinstance(err, Failed) else f"{type(err).__name__}: {err}".strip()
        session.close()
        return False

    def pre(self, filesystems: int, cancel_fd: int = -1, nat: native.Native | None = None) -> ScriptResult:
        """Open the session and quiesce (filesystems: how many the window freezes)."""
        nat = nat or native.default()
        res = self._result("pre")
        t0 = nat.now_ns()
        deadline = t0 + native.ns_from_s(self.cfg.timeout)
        self.close()  # a second pre-phase starts afresh
        session = self._make()

        def connect() -> dict[str, str]:
            session.open(self.cfg.timeout)
            return {}
        ok = (self._step(res, session, connect, deadline, cancel_fd, nat)
              and self._step(res, session, lambda: session.quiesce(filesystems), deadline, cancel_fd, nat))
        if ok:
            self.session = session
            res.exit_code = 0
        else:
            res.continue_backup = self.cfg.continue_on_failure
        res.duration_ns = nat.now_ns() - t0
        return res

    def post(self, snapshot: str, nat: native.Native | None = None) -> ScriptResult:
        """Release what the pre-phase holds (nothing to do if it holds nothing) and end the session."""
        nat = nat or native.default()
        res = self._result("post")
        t0 = nat.now_ns()
        session, self.session = self.session, None
        if session is None:
            res.exit_code, res.detail = 0, "nothing held: the quiesce did not complete"
        elif self._step(res, session, lambda: session.release(snapshot),
                        t0 + native.ns_from_s(self.cfg.timeout), -1, nat):
            res.exit_code = 0
            session.close()
        else:
            res.continue_backup = self.cfg.continue_on_failure
        res.duration_ns = nat.now_ns() - t0
        return res

    def close(self) -> None:
        """End a session still open (the check's cleanup: no session outlives a run)."""
        if self.session is not None:
            self.session.close()
            self.session = None


def prepare(entry: config.PluginEntry, cfg: dbconfig.DatabaseConfig, errs: list[PyexecError]) -> Quiescer | None:
    """The plugin's Quiescer, or None with the reason appended to errs (missing driver, credentials)."""
    try:
        return Quiescer(entry, cfg)
    except PyexecError as e:
        errs.append(e)
    except UnicodeDecodeError:
        errs.append(ScriptError(300, "the credentials file's first line is not UTF-8 text", cfg.credentials_file))
    return None
