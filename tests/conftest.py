"""Fixtures (defined in helpers.py, shared with benchmarks/): both native backends, loop
mounts that are always thawed and unmounted (with a watchdog), an fd-leak check, and
a real unprivileged user for the hostile tests.

A test of the native core or of the window takes `nat` and runs once per binding; the flow's tests
(scripts, configs, the CLI) run on the default one (Cython): both answer through `native.Native`."""
from helpers import local_user, mounts, nat, no_fd_leak, run_tmpfs  # noqa: F401
