"""The agent's root-owned config (/etc/pyexec/agent.json) → an immutable dataclass: which host this
is, how to reach etcd, and what the host runs in a group run and for how long at most.  A plan
from etcd can only shorten these bounds; it never names a command."""
from __future__ import annotations

import dataclasses
import socket
from typing import Any

import orjson

from pyexec import config, errors, limits, scripts, trust
from pyexec.fleet import etcd, protocol

_KEYS: dict[str, tuple[str | None, config.Kind, object]] = {
    "hostConfig": ("host_config", "path", config.HOST_CONFIG_PATH),
    "mounts": ("mounts", "strlist", ()),
    "snapshotCommand": ("snapshot_command", "strlist", ()),
    "host": ("host", "str", ""),
    "prefix": ("prefix", "str", protocol.PREFIX),
}
_BOUNDS = {"maxQuiesceSeconds": ("max_quiesce_s", protocol.DEFAULT_QUIESCE_S),
           "maxFreezeSeconds": ("max_freeze_s", protocol.DEFAULT_FREEZE_S)}
_ETCD_KEYS = ("endpoints", "ca", "cert", "key", "user", "passwordFile")


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """One host's part in group runs, as its root wrote it."""

    path: str
    host: str
    endpoints: tuple[str, ...]
    tls: etcd.Access
    prefix: str
    host_config: str
    mounts: tuple[str, ...]  # empty: discovery minus the host config's mountsToSkip
    snapshot_command: tuple[str, ...]  # resolved (absolute, trusted program); empty: none
    max_quiesce_s: float
    max_freeze_s: float
    warnings: tuple[str, ...] = ()


def _bad(path: str, key: str, detail: str) -> errors.PyexecError:
    return errors.PyexecError(320, detail, path, key)


def parse(data: bytes, path: str = protocol.AGENT_CONFIG_PATH) -> AgentConfig:
    """The agent config from its bytes; PyexecError 320 naming the first bad key."""
    body = {k: v for k, v in _loads(data, path).items() if k not in ("etcd", *_BOUNDS)}
    try:
        fields, warnings = config.parse_json(orjson.dumps(body), path, _KEYS, {})
    except config.Problems as p:
        first = p.errors[0]
        raise _bad(path, first.key or "", first.detail) from None
    doc = _loads(data, path)
    e = doc.get("etcd")
    if not isinstance(e, dict):
        raise _bad(path, "etcd", "required: an object with \"endpoints\" (a list of http:// or https:// URLs)")
    for k in e:
        if k not in _ETCD_KEYS:
            warnings.append(f"unknown key 'etcd.{k}' ignored")
    eps = e.get("endpoints")
    if not isinstance(eps, list) or not eps or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                                       for u in eps):
        raise _bad(path, "etcd.endpoints", f"must be a non-empty list of http:// or https:// URLs, not {eps!r}")
    files: dict[str, str | None] = {}
    for k in ("ca", "cert", "key"):
        v = e.get(k)
        if v is not None and (not isinstance(v, str) or not v.startswith("/")):
            raise _bad(path, f"etcd.{k}", f"must be an absolute path, not {v!r}")
        files[k] = v
    if (files["cert"] is None) != (files["key"] is None):
        raise _bad(path, "etcd.cert", "etcd.cert and etcd.key go together")
    secrets: dict[str, bytes] = {}
    for k in ("key", "passwordFile"):
        f = e.get(k)
        if k == "passwordFile" and f is not None and (not isinstance(f, str) or not f.startswith("/")):
            raise _bad(path, "etcd.passwordFile", f"must be an absolute path, not {f!r}")
        if f is not None:
            try:
                with trust.open_trusted(f, trust.AGENT_KEY) as tf:
                    secrets[k] = tf.read()
            except errors.PyexecError as err:
                raise _bad(path, f"etcd.{k}", err.detail) from None
    user = e.get("user")
    if user is not None and (not isinstance(user, str) or not user or "passwordFile" not in secrets):
        raise _bad(path, "etcd.user", "must be a user name, with etcd.passwordFile (root's, mode 600) beside it")
    password = secrets["passwordFile"].decode("utf-8", "replace").strip() if user is not None else None
    bounds = {}
    for key, (field, default) in _BOUNDS.items():
        try:
            bounds[field] = limits.check_timeout(doc.get(key, default), key)
        except ValueError as err:
            raise _bad(path, key, str(err)) from None
    host = fields.pop("host") or socket.gethostname().split(".")[0]
    try:
        protocol.check_name(host, "host")
    except ValueError as err:
        raise _bad(path, "host", str(err)) from None
    prefix = fields.pop("prefix")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise _bad(path, "prefix", f"must start and end with '/', not {prefix!r}")
    if any(not m.startswith("/") for m in fields["mounts"]):
        raise _bad(path, "mounts", "every mount point must be an absolute path")
    cmd: tuple[str, ...] = ()
    if fields["snapshot_command"]:
        try:
            cmd = tuple(scripts.resolve_command(list(fields["snapshot_command"])))
        except ValueError as err:
            raise _bad(path, "snapshotCommand", str(err)) from None
    return AgentConfig(path=path, host=host, endpoints=tuple(eps), tls=etcd.Access(files["ca"], files["cert"], files["key"], user, password), prefix=prefix,
                       host_config=fields["host_config"], mounts=tuple(fields["mounts"]), snapshot_command=cmd,
                       max_quiesce_s=bounds["max_quiesce_s"], max_freeze_s=bounds["max_freeze_s"],
                       warnings=tuple(warnings))


def _loads(data: bytes, path: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise errors.PyexecError(320, f"not valid JSON: {err}", path) from None
    if not isinstance(doc, dict):
        raise errors.PyexecError(320, "the top level must be a JSON object", path)
    return doc


def load(path: str = protocol.AGENT_CONFIG_PATH) -> AgentConfig:
    """The agent config at path, trust-checked (root's, not writable by others) and parsed."""
    with trust.open_trusted(path, trust.AGENT) as f:
        return parse(f.read(), path)
