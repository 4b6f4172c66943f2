"""The numbers and lists pyexec accepts, checked before anything runs, and the defaults of the bounds a caller sets."""
from __future__ import annotations

import math
import os
from collections.abc import Iterable

# Two defaults, on purpose: run()'s window holds a snapshot command (often a cloud API call, whose
# latency is not ours), freeze()'s holds the caller's own in-process action.
DEFAULT_TIMEOUT = 30.0  # the freeze bound of the library's freeze() when none is given
DEFAULT_RUN_FREEZE_TIMEOUT = 60.0  # the freeze bound of run(), run_async() and `pyexec run`
MAX_TIMEOUT = 86400.0
DEFAULT_LOCK_WAIT = 0.0
Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]  # a mount point, as the caller names it


def check_timeout(value: float | str, what: str = "timeout", zero_ok: bool = False) -> float:
    """value as seconds: a finite number in (0, 86400] ([0, 86400] if zero_ok), else ValueError."""
    try:
        if isinstance(value, bool):  # float(True) is 1.0: a bug in the caller, not a bound
            raise TypeError
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, not {value!r}") from None
    if not (math.isfinite(t) and (0 <= t if zero_ok else 0 < t) and t <= MAX_TIMEOUT):
        low = "at least 0" if zero_ok else "more than 0"
        raise ValueError(f"{what} must be {low} and at most {MAX_TIMEOUT:g} seconds, not {value!r}")
    return t


def check_paths(paths: Iterable[Path] | None) -> list[str]:
    """paths as a non-empty list of path strings, else TypeError/ValueError."""
    if paths is None or isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
        raise TypeError(f"mount points must be a list of paths, not {type(paths).__name__} {paths!r}")
    out = [os.fsdecode(os.fspath(p)) for p in paths]
    if not out:
        raise ValueError("no mount point to freeze")
    if any(not p.strip() for p in out):  # an unset $VAR: "" would mean the working directory
        raise ValueError(f"an empty mount point in {out!r}")
    return out
