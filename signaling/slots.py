"""The server's call limit, shared by all its worker processes.

`MAX_CALLS` is a limit for the whole server. Splitting it per worker refuses calls
while slots are free (the kernel spreads connections by hash, not by load: with
--workers 2 and 10 slots, a worker could refuse its 6th call while the other held
2). So the count lives in shared memory, created before the workers fork, and each
worker takes a slot for a call and gives it back when the call has closed.
"""

from __future__ import annotations

import multiprocessing


class CallSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = multiprocessing.RawValue("i", 0)
        self._lock = multiprocessing.Lock()

    def take(self) -> bool:
        """One slot for a new call; False if the server is full."""
        with self._lock:
            if self._used.value >= self.limit:
                return False
            self._used.value += 1
            return True

    def give(self) -> None:
        with self._lock:
            self._used.value = max(0, self._used.value - 1)

    @property
    def used(self) -> int:
        return self._used.value

    @property
    def full(self) -> bool:
        return self._used.value >= self.limit
