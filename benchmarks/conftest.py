"""Benchmarks use the tests' fixtures (tests/ is on pythonpath, see pyproject.toml)."""
from helpers import mounts, nat, no_fd_leak  # noqa: F401
