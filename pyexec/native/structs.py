"""The core's C structures as Python objects: decoded from (and a few fields stored into) the
memory the bindings fill, by the layouts pyexec/native/_api.py derives from the header."""
from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import TYPE_CHECKING, Any, TypeVar

from pyexec.native import _api

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

SetBuffer = bytearray | mmap.mmap  # memory for a px_set: a bytearray, or the journal page
_R = TypeVar("_R")


def _names(prefix: str) -> tuple[str, ...]:
    """The header's constants PX_<prefix>..., lower-cased without the prefix, in the order of their
    values 0, 1, ... (a state's name is the index of its value)."""
    found = {v: k[len(prefix):].lower() for k, v in vars(_api).items() if k.startswith(prefix) and isinstance(v, int)}
    return tuple(found[i] for i in range(len(found)))


MOUNT_STATES = _names("PX_M_")
RCU_STATES = _names("PX_RCU_")
PHASES = _names("PX_PHASE_")
FEATURES = tuple(f.name for f in _api.PX_FEATURES.fields)
CAP_HALF = _api.PX_CAP_HALF


class _View:
    """The scalar fields of a C struct (those before its first array), as one struct.Struct (the
    whole struct, tail padding included, where it has no array)."""

    def __init__(self, layout: _api.Layout):
        fmt, pos, names = "=", 0, []
        for f in layout.fields:
            if f.length != 1:
                break
            fmt += "x" * (f.offset - pos) + f.code
            pos = f.offset + struct.calcsize("=" + f.code)
            names.append(f.name)
        else:
            fmt += "x" * (layout.size - pos)
        self.struct = struct.Struct(fmt)
        self.names = tuple(names)
        self.fields = {f.name: f for f in layout.fields}

    def unpack(self, buf: ReadableBuffer, base: int = 0) -> dict[str, int]:
        return dict(zip(self.names, self.struct.unpack_from(buf, base)))

    def pack(self, values: dict[str, int]) -> bytes:
        return self.struct.pack(*(values[n] for n in self.names))

    def store(self, buf: SetBuffer, base: int, name: str, value: int) -> None:
        f = self.fields[name]
        struct.pack_into("=" + f.code, buf, base + f.offset, value)


_SET, _MOUNT, _CAP = _View(_api.PX_SET), _View(_api.PX_MOUNT), _View(_api.PX_CAPTURE)
_STATUS, _PROC, _FEATURES = _View(_api.PX_STATUS), _View(_api.PX_PROC), _View(_api.PX_FEATURES)
_MOUNTS_AT = _SET.fields["m"].offset


def _record(cls: type[_R], values: dict[str, Any], **extra: Any) -> _R:
    """A dataclass of the fields it names (a field Python does not read needs no Python change)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]  # type: ignore[arg-type]
    return cls(**{n: values[n] for n in names}, **extra)


@dataclasses.dataclass(frozen=True)
class MountRecord:
    """One mount of a freeze set as the core left it (ns stamps, CLOCK_MONOTONIC)."""

    fd: int
    state: str
    freeze_errno: int
    thaw_errno: int
    sync_errno: int
    guardian_fd: int
    sync_start_ns: int
    sync_end_ns: int
    freeze_start_ns: int
    freeze_end_ns: int
    thaw_start_ns: int
    thaw_end_ns: int


@dataclasses.dataclass(frozen=True)
class SetRecord:
    """The header of a freeze set and its mounts."""

    n: int
    flags: int
    phase: str
    rcu_state: str
    rcu_prev: int
    failed_index: int
    failed_errno: int
    controller_pid: int
    guardian_pid: int
    guardian_state: int
    deadline_ns: int
    window_start_ns: int
    window_end_ns: int
    mounts: tuple[MountRecord, ...]


@dataclasses.dataclass(frozen=True)
class Status:
    """How a reaped process ended."""

    code: int  # exit status, -1 when killed by a signal
    signal: int
    exit_seen_ns: int


@dataclasses.dataclass(frozen=True)
class Captured:
    """Bounded output: the first and last 64 KiB, and how much was dropped between."""

    head: bytes
    tail: bytes
    total: int
    dropped: int

    @property
    def data(self) -> bytes:
        """Head and tail joined (the whole output when nothing was dropped)."""
        return self.head + self.tail


@dataclasses.dataclass(frozen=True)
class Proc:
    """A spawned child: pid, pidfd and the read ends of its stdout/stderr pipes."""

    pid: int
    pidfd: int
    out_fd: int
    err_fd: int
    raw: bytes = dataclasses.field(default=b"", repr=False, compare=False)  # the px_proc as the core filled it

    @classmethod
    def decode(cls, raw: bytes) -> Proc:
        """The px_proc a binding returned."""
        return _record(cls, _PROC.unpack(raw), raw=raw)

    def encode(self) -> bytes:
        """The px_proc to hand back to a binding: as the core filled it, every field kept."""
        return self.raw or _PROC.pack({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def close(self) -> None:
        """Close the pidfd and pipes (after the child is reaped)."""
        for fd in (self.pidfd, self.out_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)


class SetVersionError(ValueError):
    """A freeze set written by a pyexec of another layout (PX_SET_VERSION): not to be read by this one."""


# Each record's fields must be the header's: a field removed from a struct fails the import, not a run.
for _cls, _view in ((MountRecord, _MOUNT), (SetRecord, _SET), (Status, _STATUS), (Proc, _PROC)):
    _missing = {f.name for f in dataclasses.fields(_cls)} - set(_view.fields) - {"mounts", "raw"}
    if _missing:
        raise ImportError(f"{_cls.__name__}: {sorted(_missing)} not in the header's struct")


def read_set(buf: ReadableBuffer) -> SetRecord:
    """Decode a px_set from buf; ValueError if it is not one (SetVersionError: not of this layout)."""
    size = memoryview(buf).nbytes
    if size < _api.PX_SET.size:  # a journal file made, its page not written yet
        raise ValueError(f"{size} bytes: shorter than a freeze set")
    h: dict[str, Any] = _SET.unpack(buf)
    if h["magic"] != _api.PX_SET_MAGIC:
        raise ValueError("not a pyexec freeze set")
    if h["version"] != _api.PX_SET_VERSION:
        raise SetVersionError(f"a freeze set of version {h['version']}: this pyexec reads {_api.PX_SET_VERSION}")
    mounts = []
    for i in range(h["n"]):
        m: dict[str, Any] = _MOUNT.unpack(buf, _MOUNTS_AT + i * _api.PX_MOUNT.size)
        m["state"] = MOUNT_STATES[m["state"]]
        mounts.append(_record(MountRecord, m))
    h.update(phase=PHASES[h["phase"]], rcu_state=RCU_STATES[h["rcu_state"]], mounts=tuple(mounts))
    return _record(SetRecord, h)


def set_header(buf: SetBuffer, **fields: int) -> None:
    """Store header fields of a px_set in buf (e.g. controller_pid, deadline_ns, guardian_state)."""
    for name, value in fields.items():
        _SET.store(buf, 0, name, value)


def set_mount_fd(buf: SetBuffer, i: int, fd: int) -> None:
    """Store the fd of mount i of a px_set in buf (recover reopens a dead run's mounts)."""
    _MOUNT.store(buf, _MOUNTS_AT + i * _api.PX_MOUNT.size, "fd", fd)


def set_mount_state(buf: SetBuffer, i: int, state: int) -> None:
    """Store the state (an index of MOUNT_STATES) of mount i of a px_set in buf (a journal's copy)."""
    _MOUNT.store(buf, _MOUNTS_AT + i * _api.PX_MOUNT.size, "state", state)


def read_capture(buf: bytearray) -> Captured:
    """Decode a px_capture from buf."""
    c = _CAP.unpack(buf)
    head_at, ring = _CAP.fields["head"].offset, _CAP.fields["tail"].offset
    head = bytes(buf[head_at:head_at + c["head_len"]])
    tail_len, tail_pos = c["tail_len"], c["tail_pos"]
    if tail_len < CAP_HALF:
        tail = bytes(buf[ring:ring + tail_len])
    else:
        tail = bytes(buf[ring + tail_pos:ring + CAP_HALF]) + bytes(buf[ring:ring + tail_pos])
    return Captured(head, tail, c["total"], c["dropped"])


def read_status(raw: bytes) -> Status:
    """Decode the px_status a binding returned."""
    return _record(Status, _STATUS.unpack(raw))


def read_features(raw: bytes) -> dict[str, bool]:
    """Decode the px_features a binding returned: each kernel feature in use (True) or replaced by
    its fallback (False)."""
    return {k: bool(v) for k, v in _FEATURES.unpack(raw).items()}
