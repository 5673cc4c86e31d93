"""Outage tracking for a remote tier: after a failure, skip it for a while instead of waiting on it."""

from __future__ import annotations

import logging
import time

from kvtier.sglang_ext.metrics import TierMetrics

logger = logging.getLogger(__name__)


class Outage:
    """``up`` is False for ``retry_after_s`` after each ``failed``; the first failure is logged."""

    def __init__(self, where: str, retry_after_s: float, metrics: TierMetrics) -> None:
        self._where = where
        self._retry_after = retry_after_s
        self._metrics = metrics
        self._down_until = 0.0

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, what: str, exc: Exception) -> None:
        if self.up:
            logger.warning(
                "kvtier: remote tier %s failed during %s (%s); treating it as empty for %.0f s",
                self._where, what, exc, self._retry_after,
            )
        self._down_until = time.monotonic() + self._retry_after
        self._metrics.remote_errors.inc()
