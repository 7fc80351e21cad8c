"""Per-client-address limits on offers: a rate, and calls not yet connected.

An offer is the most expensive request there is (an aiortc peer, ICE sockets, an
upstream session): without these, one address sending offers that never connect
held every call slot and as many upstream sessions. The operator's own
credential (`BRIDGE_AUTH_TOKEN`) is exempt: a backend relaying offers for many
users comes from one address.

Addresses are the TCP peer's; behind a reverse proxy every client shares the
proxy's address, so raise or disable the limits there (0) and limit at the proxy.
"""

from __future__ import annotations

import time
from typing import Optional

#: Addresses remembered at most; the idle ones are forgotten first.
MAX_ADDRESSES = 10_000


class OfferLimits:
    def __init__(self, per_minute: int, pending_max: int) -> None:
        self.per_minute = per_minute
        self.pending_max = pending_max
        self._buckets: dict[str, list[float]] = {}  # address → [tokens, last refill]
        self.pending: dict[str, int] = {}
        self.refused_rate = 0
        self.refused_pending = 0

    def check(self, address: str) -> Optional[tuple[str, int]]:
        """None if an offer from `address` may go ahead (and count it), else (reason, retry after s)."""
        if self.pending_max and self.pending.get(address, 0) >= self.pending_max:
            self.refused_pending += 1
            return (f"{self.pending_max} calls from your address have not connected yet", 5)
        if self.per_minute:
            now = time.monotonic()
            rate = self.per_minute / 60.0
            bucket = self._buckets.get(address)
            if bucket is None:
                if len(self._buckets) >= MAX_ADDRESSES:
                    self._forget(now)
                bucket = self._buckets[address] = [float(self.per_minute), now]
            bucket[0] = min(float(self.per_minute), bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
            if bucket[0] < 1.0:
                self.refused_rate += 1
                return (f"more than {self.per_minute} offers a minute from your address",
                        max(1, int((1.0 - bucket[0]) / rate + 0.999)))
            bucket[0] -= 1.0
        return None

    def _forget(self, now: float) -> None:
        """Drop addresses whose bucket has refilled (they would start full anyway)."""
        full_after = 60.0
        self._buckets = {a: b for a, b in self._buckets.items() if now - b[1] < full_after}
        if len(self._buckets) >= MAX_ADDRESSES:  # all active: drop the oldest half
            keep = sorted(self._buckets.items(), key=lambda kv: kv[1][1])[MAX_ADDRESSES // 2:]
            self._buckets = dict(keep)

    def started(self, address: str) -> None:
        self.pending[address] = self.pending.get(address, 0) + 1

    def settled(self, address: str) -> None:
        """The call from `address` connected or ended: no longer pending."""
        left = self.pending.get(address, 0) - 1
        if left > 0:
            self.pending[address] = left
        else:
            self.pending.pop(address, None)
