"""The one reconnect policy of every component (broker link, cameras)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Capped exponential back-off, jittered in its upper half (never below `low`), so a
    fleet that lost its broker at once does not come back in lock-step."""
    ceiling = min(high, low * (2 ** min(attempt, 16)))
    return random.uniform(max(low, ceiling / 2), ceiling)
