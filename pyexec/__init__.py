"""pyexec: application-consistent snapshots on Linux with a minimal, bounded freeze window."""
__version__ = "0.1.0"
