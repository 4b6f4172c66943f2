"""pyexec: application-consistent snapshots on Linux with a minimal, bounded freeze window."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("pyexec")  # declared once, in pyproject.toml
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
