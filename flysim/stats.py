"""Counters of what the emulator was asked to do, for tests and for rate-limit budgets."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

# (unix time, method, path without query, status; 0 when the connection was dropped)
LogEntry = tuple[float, str, str, int]


@dataclass
class SimStats:
    total_requests: int = 0
    by_route: Counter[tuple[str, str]] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    faults_injected: Counter[str] = field(default_factory=Counter)
    lease_conflicts: int = 0
    rate_limited: int = 0
    proxy_requests: int = 0
    proxy_wakeups: int = 0
    max_rps_observed: int = 0
    _window: deque[float] = field(default_factory=deque, repr=False)

    def arrival(self, now: float) -> None:
        """Count an API request and keep the busiest one-second window seen so far."""
        self.total_requests += 1
        self._window.append(now)
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        self.max_rps_observed = max(self.max_rps_observed, len(self._window))

    def to_json(self) -> dict[str, Any]:
        return {
            "total_requests": self.total_requests,
            "by_route": {f"{m} {r}": n for (m, r), n in sorted(self.by_route.items())},
            "by_status": {str(s): n for s, n in sorted(self.by_status.items())},
            "faults_injected": dict(self.faults_injected),
            "lease_conflicts": self.lease_conflicts,
            "rate_limited": self.rate_limited,
            "proxy_requests": self.proxy_requests,
            "proxy_wakeups": self.proxy_wakeups,
            "max_rps_observed": self.max_rps_observed,
        }
