"""The native core as the rest of pyexec sees it: one face over its parts, each with one job.

- `binding`: which binding (Cython or cffi) is in use, its layout check at load, `Native`;
- `structs`: the C structures as Python objects (decode, and the few fields Python stores);
- `_api`: the header's constants and struct layouts (generated at build time by native/api_gen.py);
- `life`: this process's life pipe, for helpers on kernels without pidfd_open;
- `clock`: seconds as the core's nanoseconds.
"""
from __future__ import annotations

from pyexec.errors import Cancelled
from pyexec.native import _api
from pyexec.native.binding import Binding, Native, default, load
from pyexec.native.clock import ns_from_s
from pyexec.native.life import life_fd
from pyexec.native.structs import (
    CAP_HALF,
    FEATURES,
    MOUNT_STATES,
    PHASES,
    RCU_STATES,
    Captured,
    MountRecord,
    Proc,
    SetBuffer,
    SetRecord,
    SetVersionError,
    Status,
    read_capture,
    read_set,
    set_header,
    set_mount_fd,
    set_mount_state,
)

# The flags and guardian states pyexec/ passes or reads, under their header names without PX_.
FREEZE_EXPEDITE = _api.PX_FREEZE_EXPEDITE
FREEZE_PRESYNC = _api.PX_FREEZE_PRESYNC
FREEZE_HOLD = _api.PX_FREEZE_HOLD
THAW_IN_FLIGHT = _api.PX_THAW_IN_FLIGHT
SPAWN_DIE_WITH_PARENT = _api.PX_SPAWN_DIE_WITH_PARENT  # as cgroup_fd: no cgroup, killed if we die
G_READY = _api.PX_G_READY
G_FIRED_DEADLINE = _api.PX_G_FIRED_DEADLINE
G_LOST = _api.PX_G_LOST

__all__ = ["Binding", "CAP_HALF", "Cancelled", "Captured", "FEATURES", "FREEZE_EXPEDITE", "FREEZE_HOLD", "FREEZE_PRESYNC",
           "G_FIRED_DEADLINE", "G_LOST", "G_READY", "MOUNT_STATES", "MountRecord", "Native", "PHASES", "Proc",
           "RCU_STATES", "SPAWN_DIE_WITH_PARENT", "SetBuffer", "SetRecord", "SetVersionError", "Status",
           "THAW_IN_FLIGHT", "default", "life_fd", "load", "ns_from_s", "read_capture", "read_set", "set_header",
           "set_mount_fd", "set_mount_state"]
