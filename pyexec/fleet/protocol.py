"""The group-run protocol's facts, declared once: the key layout, names, the plan, and the bound
arithmetic that makes a commit prove the overlap (docs/fleet.md)."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import orjson

from pyexec import limits

PREFIX = "/pyexec/"
AGENT_CONFIG_PATH = "/etc/pyexec/agent.json"
# Names go into keys and file names: no slash, no dot-dot, nothing a shell or etcd's ranges would read.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")

# A run's own keys (under runs/<id>/): the coordinator writes them.
PLAN, GO, COMMITTED, ABORT, RECORD = "plan", "go", "committed", "abort", "record"
# A host's keys for a run (under h/<host>/runs/<id>/): only that host's agent writes them, so an
# etcd role per host can be one key range (docs/fleet.md, roles).
READY, FROZEN, HOST_ABORT, REPORT = "ready", "frozen", "abort", "report"
WORKER = "worker"  # h/<host>/runs/<id>/worker: on the worker's lease from its start (a restarted agent sees it)
AGENT = "agent"  # h/<host>/agent: the agent's registration, on its lease

LEASE_TTL_S = 3  # coordinator's, agent's and worker's leases; etcd's floor is 1.5 election timeouts
KEEPALIVE_S = 0.5
# CLOCK_MONOTONIC of two machines may run at different rates: NTP slews at most 500 ppm; twice that
# is assumed, so a duration measured on the coordinator is trusted to 0.1 % of itself.
DRIFT = 1e-3
SELF_THAW_EARLY_NS = 2_000_000  # a worker thaws this long before its guardian's deadline
COMMIT_SLACK_NS = 1_000_000

# etcd refuses a transaction of more than --max-txn-ops compares (128 by default, etcd 3.4's embed
# config): the commit compares 3 run keys and 2 per host (no abort, frozen).
MAX_TXN_OPS = 128
MAX_HOSTS = (MAX_TXN_OPS - 3) // 2

DEFAULT_QUIESCE_S = 60.0  # how long a group waits for every host to be quiesced
DEFAULT_FREEZE_S = 10.0   # each host's freeze bound in a group run (the wait for the commit is inside it)


def check_name(value: str, what: str) -> str:
    """value if it is a valid host name or run id, else ValueError."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} must be 1-63 letters, digits, '.', '_' or '-' (not starting with one of "
                         f"the last three), not {value!r}")
    return value


def run_key(prefix: str, run: str, leaf: str = "") -> str:
    """The key of a run's own leaf (or the run's prefix, leaf empty).  Plans live apart, under plans/:
    on the coordinator's lease, that prefix holds only the runs in progress, which every agent reads."""
    if leaf == PLAN:
        return f"{prefix}plans/{run}"
    return f"{prefix}runs/{run}/{leaf}"


def plans_prefix(prefix: str) -> str:
    """Where the plans of the runs in progress are."""
    return f"{prefix}plans/"


def host_key(prefix: str, host: str, run: str | None = None, leaf: str = "") -> str:
    """A host's key: its registration (run None), or its leaf of a run (or that run's prefix)."""
    if run is None:
        return f"{prefix}h/{host}/{leaf or AGENT}"
    return f"{prefix}h/{host}/runs/{run}/{leaf}"


def parse_host_key(prefix: str, key: str) -> tuple[str, str, str] | None:
    """(host, run, leaf) of a host's run key, else None."""
    if not key.startswith(prefix + "h/"):
        return None
    parts = key[len(prefix) + 2:].split("/")
    if len(parts) != 4 or parts[1] != "runs":
        return None
    return parts[0], parts[2], parts[3]


def commit_budget_ns(freeze_s: float) -> int:
    """How long after the coordinator sends `go` its commit must be applied, at the latest, for every
    host that took freeze_s as its bound to be provably still frozen: each host starts its bound after
    it saw `go`, thaws on its own SELF_THAW_EARLY_NS before it, and its clock may run 0.1 % fast."""
    ns = freeze_s * 1e9
    return int(ns - SELF_THAW_EARLY_NS - math.ceil(ns * DRIFT) - COMMIT_SLACK_NS)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a coordinator asks of the hosts: who, and the longest each may wait quiesced and stay
    frozen.  Never a command: each host runs what its own root-owned config says, and takes the
    shorter of each bound (the plan can only shorten them)."""

    run: str
    hosts: tuple[str, ...]
    quiesce_s: float
    freeze_s: float
    coordinator: str = ""

    def dumps(self) -> bytes:
        """The plan as stored in etcd."""
        return orjson.dumps({"run": self.run, "hosts": list(self.hosts), "quiesce_s": self.quiesce_s,
                             "freeze_s": self.freeze_s, "coordinator": self.coordinator})

    @classmethod
    def loads(cls, data: bytes) -> Plan:
        """A plan read from etcd; ValueError for anything but a well-formed one."""
        try:
            doc: Any = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"the plan is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("the plan is not a JSON object")  # noqa: TRY004 - a bad value: callers catch ValueError
        hosts = doc.get("hosts")
        if not isinstance(hosts, list) or not hosts or len(hosts) > MAX_HOSTS:
            raise ValueError(f"the plan's hosts must be a non-empty list of at most {MAX_HOSTS}")
        names = tuple(check_name(h, "a host") for h in hosts)
        if len(set(names)) != len(names):
            raise ValueError("the plan names a host twice")
        coordinator = doc.get("coordinator", "")
        return cls(check_name(doc.get("run", ""), "the run id"), names,
                   limits.check_timeout(doc.get("quiesce_s", ""), "quiesce_s"),
                   limits.check_timeout(doc.get("freeze_s", ""), "freeze_s"),
                   coordinator if isinstance(coordinator, str) else "")
