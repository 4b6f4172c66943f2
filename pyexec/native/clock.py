"""Time as the core counts it: CLOCK_MONOTONIC nanoseconds (px_now_ns), and seconds turned into them."""
from __future__ import annotations

NS_PER_S = 1_000_000_000


def ns_from_s(seconds: float) -> int:
    """Seconds (a timeout, a bound) as nanoseconds, truncated toward zero: exact for an int."""
    return int(seconds * NS_PER_S)
