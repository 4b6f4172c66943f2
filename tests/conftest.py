"""Fixtures (defined in helpers.py, shared with benchmarks/): both native backends, loop
mounts that are always thawed and unmounted (with a watchdog), and an fd-leak check."""
from helpers import mounts, nat, no_fd_leak  # noqa: F401
