"""Per-request retries for transient provider errors, opt-in per client.

A deploy step makes many API calls; at a provider error rate of a few percent, a step that
fails whole on any one of them retries itself into the ground. Retrying the single call
that failed (with backoff, honouring `Retry-After`) keeps a step's progress. Requests that
are not idempotent (machine creates) are never retried here: their callers look for what
a lost answer may have created instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRetry:
    attempts: int = 4  # in all, the first included
    initial_delay: float = 0.2
    max_delay: float = 5.0
    # A Retry-After longer than this is left to the caller's own (durable) retry policy.
    max_retry_after: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up."""
        if attempt >= self.attempts:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        backoff = min(self.max_delay, self.initial_delay * 2.0 ** (attempt - 1))
        # Jitter spreads the retries of many concurrent deploys apart.
        return backoff * (0.5 + random.random() / 2)
