"""The reference plugin host's two config files, parsed into immutable dataclasses (a built-in
quiescer's own config is dbconfig.py's, on the checks defined here).

Host config (INI, `VMSnapshotPluginHost.conf`) and plugin config (JSON,
`VMSnapshotScriptPluginConfig.json`), with the reference's keys and defaults.  Stricter
than the reference where it crashes or guesses: every bad key is reported (code 304 for
the host file, 305 for a plugin file), not only the first.  Parsing only: reading the
files safely is trust.py's job."""
from __future__ import annotations

import configparser
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import orjson

from pyexec.errors import ConfigError

HOST_CONFIG_PATH = "/etc/azure/VMSnapshotPluginHost.conf"
PLUGIN_CONFIG_PATH = "/etc/azure/VMSnapshotScriptPluginConfig.json"
MAX_CONFIG_BYTES = 1 << 20
HOST_TIMEOUT_MAX = 1800  # the reference's default and cap, seconds
PLUGIN_TIMEOUT_DEFAULT = 30  # as documented for timeoutInSeconds
MAX_RETRIES = 100
SECTION = "pre_post"


@dataclasses.dataclass(frozen=True)
class PluginEntry:
    """One plugin named by the host config."""

    index: int
    name: str  # pluginName<i> (pluginPath<i> is required, as by the reference, but names nothing pyexec runs)
    config_path: str

    @property
    def builtin(self) -> str | None:
        """The built-in quiescer this plugin names (postgresql, mariadb), or None for the ScriptRunner."""
        return BUILTIN_PLUGINS.get(self.name.lower())


@dataclasses.dataclass(frozen=True)
class HostConfig:
    """VMSnapshotPluginHost.conf."""

    path: str
    timeout: int
    plugins: tuple[PluginEntry, ...]
    mounts_to_skip: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    """VMSnapshotScriptPluginConfig.json; `timeout` is already min(plugin, host)."""

    path: str
    pre_script: str
    post_script: str
    pre_params: tuple[str, ...] = ()
    post_params: tuple[str, ...] = ()
    pre_retries: int = 0
    post_retries: int = 0
    timeout: int = PLUGIN_TIMEOUT_DEFAULT
    host_limit: bool = False  # the host's timeoutInSeconds, lower than the plugin's, is `timeout`
    continue_on_failure: bool = True
    fs_freeze: bool = True
    warnings: tuple[str, ...] = ()


class Problems(Exception):
    """Every problem found in one file, each a table error."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("; ".join(e.describe() for e in errors))


def _decode(data: bytes, path: str, code: int) -> str:
    if len(data) > MAX_CONFIG_BYTES:
        raise Problems([ConfigError(code, f"file is larger than {MAX_CONFIG_BYTES} bytes", path)])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Problems([ConfigError(code, f"not UTF-8 text ({err.reason} at byte {err.start})", path)]) from err


def _int(raw: str) -> int | None:
    raw = raw.strip()
    if not raw or not (raw.isdigit() or (raw[0] in "+-" and raw[1:].isdigit())) or len(raw) > 12:
        return None
    return int(raw)


def parse_host(data: bytes, path: str = HOST_CONFIG_PATH) -> HostConfig:
    """Parse the host config; Problems (code 304) lists every bad key."""
    text = _decode(data, path, 304)
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        cp.read_string(text, source=path)
    except configparser.Error as err:
        msg = str(err).replace("\n", " ")
        raise Problems([ConfigError(304, f"not a valid INI file: {msg}", path)]) from err
    if not cp.has_section(SECTION):
        raise Problems([ConfigError(304, f"section [{SECTION}] is missing", path)])
    sec = cp[SECTION]
    errors: list[ConfigError] = []
    warnings: list[str] = []

    def number(key: str, default: int, lo: int) -> int:
        if key not in sec:
            return default
        value = _int(sec[key])
        if value is None or value < lo:
            errors.append(ConfigError(304, f"must be an integer >= {lo}, not {sec[key]!r}", path, key))
            return default
        return value

    timeout = number("timeoutInSeconds", HOST_TIMEOUT_MAX, 1)
    if timeout > HOST_TIMEOUT_MAX:
        warnings.append(f"timeoutInSeconds {timeout} is above the cap; using {HOST_TIMEOUT_MAX}")
        timeout = HOST_TIMEOUT_MAX
    count = number("numberOfPlugins", 0, 0)
    plugins = []
    for i in range(min(count, 1000)):
        values = {}
        for base in ("pluginName", "pluginPath", "pluginConfigPath"):
            key = f"{base}{i}"
            value = sec.get(key, "").strip()
            if not value:
                errors.append(ConfigError(304, f"numberOfPlugins is {count} but {key} is missing or empty",
                                          path, key))
            values[base] = value
        if all(values.values()):
            plugins.append(PluginEntry(i, values["pluginName"], values["pluginConfigPath"]))
    if count == 0:  # as the reference: nothing runs, nothing fails
        warnings.append("numberOfPlugins is 0: no plugins configured, no script will run")
    skip = tuple(s.strip() for s in sec.get("mountsToSkip", "").split(",") if s.strip())
    if errors:
        raise Problems(errors)
    return HostConfig(path, timeout, tuple(plugins), skip, tuple(warnings))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


# A key's kind: "path", "strlist", "retries", "timeout", "bool", "str", "port", or a tuple of the strings allowed.
Kind = str | tuple[str, ...]
# key: (field, kind, default): a default of None makes the key required; a field of None checks the
# key's value (a wrong type is 305, as for any key) and keeps nothing, for keys pyexec has no use for.
_PLUGIN_KEYS: dict[str, tuple[str | None, Kind, object]] = {
    "preScriptLocation": ("pre_script", "path", None),
    "postScriptLocation": ("post_script", "path", None),
    "preScriptParams": ("pre_params", "strlist", ()),
    "postScriptParams": ("post_params", "strlist", ()),
    "preScriptNoOfRetries": ("pre_retries", "retries", 0),
    "postScriptNoOfRetries": ("post_retries", "retries", 0),
    "timeoutInSeconds": ("timeout", "timeout", PLUGIN_TIMEOUT_DEFAULT),
    "continueBackupOnFailure": ("continue_on_failure", "bool", True),
    "fsFreezeEnabled": ("fs_freeze", "bool", True),
    "pluginName": (None, "str", ""),
    "appName": (None, "str", ""),
}
_IGNORED_KEYS = {
    "ScriptsExecutionPollTimeSeconds": "accepted and ignored: pyexec waits on events, it does not poll",
}


def check_value(kind: Kind, value: object) -> tuple[object, str | None]:
    """The value converted, or an error string."""
    if kind == "path":
        if not isinstance(value, str) or not value.strip():
            return None, "must be a non-empty string (the script's full path)"
        if not value.startswith("/"):
            return None, f"must be an absolute path, not {value!r}"
        if "\0" in value:
            return None, "must not contain a NUL character"
        return value, None
    if kind == "strlist":
        if not isinstance(value, list):
            return None, f"must be a list of strings, not {type(value).__name__}"
        bad = [i for i, v in enumerate(value) if not isinstance(v, str) or "\0" in v]
        if bad:
            return None, f"element {bad[0]} is not a string (each parameter must be quoted)"
        return tuple(value), None
    if kind in ("retries", "timeout"):
        lo, hi = (0, MAX_RETRIES) if kind == "retries" else (1, HOST_TIMEOUT_MAX * 1000)
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"must be a whole number, not {value!r}"
        if not lo <= value <= hi:
            return None, f"must be between {lo} and {hi}, not {value}"
        return value, None
    if kind == "bool":
        if not isinstance(value, bool):
            return None, f"must be true or false (unquoted), not {value!r}"
        return value, None
    if kind == "str":
        if not isinstance(value, str) or "\0" in value:
            return None, f"must be a string, not {value!r}"
        return value, None
    if kind == "port":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            return None, f"must be a port number (1-65535), not {value!r}"
        return value, None
    if isinstance(kind, tuple):  # one of these strings
        if value not in kind:
            return None, f"must be one of {', '.join(kind)}, not {value!r}"
        return value, None
    raise AssertionError(kind)


def parse_json(data: bytes, path: str, keys: Mapping[str, tuple[str | None, Kind, object]],
                ignored: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """A JSON object's keys checked against keys: (fields, warnings); Problems (305) lists every bad key."""
    text = _decode(data, path, 305)
    try:
        doc = orjson.loads(text)  # strict JSON: no NaN/Infinity, integers within 64 bits
        json.loads(text, object_pairs_hook=_no_duplicates)  # orjson keeps the last duplicate silently
    except (orjson.JSONDecodeError, ValueError, RecursionError) as err:
        raise Problems([ConfigError(305, f"not valid JSON: {err}", path)]) from err
    if not isinstance(doc, dict):
        raise Problems([ConfigError(305, f"the top level must be a JSON object, not {type(doc).__name__}", path)])
    errors: list[ConfigError] = []
    warnings: list[str] = []
    fields: dict[str, Any] = {}  # the dataclass's keyword arguments, each of its field's type (check_value)
    for key, (field, kind, default) in keys.items():
        if key not in doc:
            if default is None:
                errors.append(ConfigError(305, "required key is missing", path, key))
            elif field is not None:
                fields[field] = default
            continue
        value, problem = check_value(kind, doc[key])
        if problem:
            errors.append(ConfigError(305, problem, path, key))
        elif field is not None:
            fields[field] = value
    for key in doc:
        if key in ignored:
            value = doc[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (isinstance(value, float) and not math.isfinite(value)):
                errors.append(ConfigError(305, f"must be a number, not {value!r}", path, key))
            warnings.append(f"{key}: {ignored[key]}")
        elif key not in keys:
            warnings.append(f"unknown key {key!r} ignored")
    if errors:
        raise Problems(errors)
    return fields, warnings


def clamp_timeout(fields: dict[str, Any], warnings: list[str], host_timeout: int) -> None:
    if fields["timeout"] > host_timeout:
        warnings.append(f"timeoutInSeconds {fields['timeout']} exceeds the host's {host_timeout}; using {host_timeout}")
        fields["timeout"] = host_timeout
        fields["host_limit"] = True


def parse_plugin(data: bytes, path: str = PLUGIN_CONFIG_PATH, host_timeout: int = HOST_TIMEOUT_MAX) -> PluginConfig:
    """Parse a plugin config; Problems (code 305) lists every bad key."""
    fields, warnings = parse_json(data, path, _PLUGIN_KEYS, _IGNORED_KEYS)
    clamp_timeout(fields, warnings, host_timeout)
    return PluginConfig(path=path, warnings=tuple(warnings), **fields)


# pluginName<i> values that name a built-in quiescer instead of the ScriptRunner (case-insensitive).
BUILTIN_PLUGINS = {"postgresql": "postgresql", "postgres": "postgresql", "mariadb": "mariadb", "mysql": "mariadb"}
