"""The library face of group runs: `pyexec.group_run(...)` and `await pyexec.group_run_async(...)`."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from pyexec import signals
from pyexec.fleet import coordinator, protocol


def group_run(etcd: str | Sequence[str], hosts: str | Sequence[str], cut_cmd: str | Sequence[str] | None = None,
              quiesce_timeout: float = protocol.DEFAULT_QUIESCE_S, freeze_timeout: float = protocol.DEFAULT_FREEZE_S,
              cacert: str | None = None, cert: str | None = None, key: str | None = None,
              prefix: str = protocol.PREFIX, run_id: str | None = None,
              user: str | None = None, password_file: str | None = None,
              progress: Callable[[str], object] = lambda m: None,
              cancel: signals.Cancel | None = None) -> dict[str, Any]:
    """One consistent snapshot of many hosts: the group record (outcome "consistent" only when the
    commit proved every host frozen at once).  ValueError/TypeError for a bad argument, before
    anything is sent; RunIdTaken (a ValueError) for a run_id etcd already has, before anything runs."""
    o = coordinator.options(etcd, hosts, cut_cmd, quiesce_timeout, freeze_timeout, cacert, cert, key, prefix, run_id,
                            user=user, password_file=password_file)

    def say(m: str) -> None:
        try:
            progress(m)
        except Exception:  # noqa: BLE001, S110 - progress is best effort, the run is not
            pass
    if cancel is not None:
        return coordinator.group_run(o, say, cancel)
    with signals.Cancel() as own:
        return coordinator.group_run(o, say, own)


async def group_run_async(etcd: str | Sequence[str], hosts: str | Sequence[str], **kw: Any) -> dict[str, Any]:
    """group_run() without blocking the event loop; a cancellation aborts the run (every host thaws
    and resumes), then goes on up."""
    loop = asyncio.get_running_loop()
    cancel = signals.Cancel(handle_signals=False)
    cancel.__enter__()
    job = loop.run_in_executor(None, lambda: group_run(etcd, hosts, cancel=cancel, **kw))
    try:
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.trigger()
            await asyncio.wait([job])
            raise
    finally:
        if job.done():
            cancel.__exit__(None, None, None)
        else:
            job.add_done_callback(lambda _: cancel.__exit__(None, None, None))
