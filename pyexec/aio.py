"""The asyncio face of pyexec: `await run_async(...)` and `async with freeze_async(...)`.

The event loop never blocks.  A run's work is done by the same code as `run()` (host.run: one
implementation of the promise that every started pre-script gets its post-script), in one worker
thread that spends its time in the native core's waits, which hold no GIL; the loop awaits one future.
Cancellation (task.cancel(), asyncio.timeout) writes to the run's cancel pipe, which every native wait
polls, exactly as SIGINT does for the command line: the running script's tree is killed, the window
thaws, the post-scripts run, then CancelledError goes on up.  A coroutine function as the snapshot
action runs on the caller's loop, inside the window."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, TypedDict, Unpack

from pyexec import config, host, limits, locks, native, signals, window

# A coroutine function as the snapshot action: awaited on the caller's loop, inside the window.
AsyncSnapshot = Callable[[window.Window | None], Coroutine[Any, Any, object]]


class RunOptions(TypedDict, total=False):
    """run()'s other keyword arguments, as run_async() passes them on."""

    expedite: bool
    presync: bool
    nat: native.Native | None
    progress: Callable[[str], object]
    lock_wait: float


class FreezeOptions(TypedDict, total=False):
    """freeze()'s other keyword arguments, as freeze_async() passes them on."""

    expedite: bool
    presync: bool
    guardian: bool
    backend: native.Native | None
    lock_wait: float


async def run_async(host_path: str = config.HOST_CONFIG_PATH, mount_points: Iterable[limits.Path] | None = None,
                    snapshot: host.Snapshot | AsyncSnapshot = None, freeze_timeout: float = limits.DEFAULT_RUN_FREEZE_TIMEOUT,
                    **kw: Unpack[RunOptions]) -> host.RunReport:
    """run() without blocking the event loop; cancellable like a signalled run (post-scripts first).

    `snapshot` may also be a coroutine function taking the window: it runs on this loop."""
    loop = asyncio.get_running_loop()
    action: host.Snapshot
    if inspect.iscoroutinefunction(snapshot):
        coro_fn = snapshot

        def on_loop(win: window.Window | None) -> None:  # in the worker thread, inside the window
            fut = asyncio.run_coroutine_threadsafe(coro_fn(win), loop)
            try:
                fut.result()
            except BaseException:
                fut.cancel()
                raise
        action = on_loop
    else:
        action = snapshot

    cancel = signals.Cancel(handle_signals=False)
    cancel.__enter__()
    job = loop.run_in_executor(None, lambda: host.run(host_path, mount_points=mount_points, snapshot=action,
                                                      freeze_timeout=freeze_timeout, cancel=cancel, **kw))
    try:
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            cancel.trigger()  # the worker kills what runs, thaws and runs the post-scripts
            await asyncio.wait([job])  # never leave before the application is resumed
            raise
    finally:
        if job.done():
            cancel.__exit__(None, None, None)
        else:  # cancelled again while waiting: close once the worker is done with it
            job.add_done_callback(lambda _: cancel.__exit__(None, None, None))


@contextlib.asynccontextmanager
async def freeze_async(
        paths: Iterable[limits.Path] | locks.Held,
        timeout: float = limits.DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the freeze bound, not a wait's
        **kw: Unpack[FreezeOptions]) -> AsyncIterator[window.Window]:
    """freeze() for asyncio: the freeze and the thaw run off the loop; the guardian bounds the window
    as always.  A cancellation inside the block thaws, then goes on up."""
    loop = asyncio.get_running_loop()
    cm = window.freeze(paths, timeout=timeout, **kw)
    enter = loop.run_in_executor(None, cm.__enter__)
    try:
        win = await asyncio.shield(enter)
    except asyncio.CancelledError:
        await asyncio.wait([enter])
        if not enter.cancelled() and enter.exception() is None:
            await loop.run_in_executor(None, cm.__exit__, None, None, None)
        raise
    try:
        yield win
    except BaseException as e:
        exit_ = loop.run_in_executor(None, cm.__exit__, type(e), e, e.__traceback__)
        await asyncio.wait([exit_])  # thaw before anything else, a second cancellation included
        if not exit_.result():
            raise
    else:
        exit_ = loop.run_in_executor(None, cm.__exit__, None, None, None)
        await asyncio.wait([exit_])
        exit_.result()
