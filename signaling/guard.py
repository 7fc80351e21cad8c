"""What an HTTP connection may hold before it has done anything useful.

Measured before this existed: 20,000 connections that never sent a byte ran the
process out of file descriptors; `/healthz` and new calls timed out.

- A connection that has not sent a complete request within `IDLE_TIMEOUT_S` of
  opening (or of its last response) is closed by aiohttp's keep-alive timer,
  however slowly it trickles header bytes (the timer is not reset by data,
  only by a complete request).
- A request body must arrive within `BODY_TIMEOUT_S` (`read_deadline`).
- At most `max_connections` connections are open at once. When one more
  arrives, the connection idle the longest (no request in progress: one that
  never sent a request, or a kept-alive one) is closed to make room, so a flood
  of silent connections cannot lock out a client that sends its request at
  once; if every connection is busy the new one is closed. The cap also stays
  below the process's file-descriptor limit, which is raised to its hard limit.

aiohttp has no connection cap of its own; its `web.Server` tells its
`connection_made`/`connection_lost` about every connection, which is where this
counts them (wrapped on the instance, no aiohttp subclass).
"""

from __future__ import annotations

import logging
import resource
import time
from typing import Awaitable, Callable

from aiohttp import web

logger = logging.getLogger(__name__)

#: Seconds a request's body may take to arrive once its headers are in.
BODY_TIMEOUT_S = 10.0
#: File descriptors kept out of the cap for calls (UDP sockets, upstream sockets), logs, models.
FD_RESERVE_PER_CALL = 12
FD_RESERVE = 200


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 65536)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int, max_calls: int, fd_limit: int) -> int:
    """The connection cap that leaves room in the fd limit for the calls."""
    room = fd_limit - FD_RESERVE - FD_RESERVE_PER_CALL * max_calls
    return max(16, min(wanted, room))


class ConnectionGuard:
    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self._idle: dict[web.RequestHandler, object] = {}  # handler → transport; oldest idle first
        self._busy: dict[web.RequestHandler, object] = {}
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # new connections closed because every slot was busy
        self._last_report = 0.0

    @property
    def open(self) -> int:
        return len(self._idle) + len(self._busy)

    def attach(self, server: web.Server) -> None:
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler, transport) -> None:
            made(handler, transport)
            self._idle[handler] = transport
            if self.open > self.max_connections:
                self._make_room(handler, transport)

        def connection_lost(handler, exc) -> None:
            self._idle.pop(handler, None)
            self._busy.pop(handler, None)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _make_room(self, newcomer, transport) -> None:
        victim = next((h for h in self._idle if h is not newcomer), None)
        if victim is not None:
            self._idle.pop(victim).close()  # type: ignore[attr-defined]
            self.evicted += 1
        else:
            self._idle.pop(newcomer, None)
            transport.close()
            self.refused += 1
        now = time.monotonic()
        if now - self._last_report >= 10.0:  # one summary line per interval, never one per connection
            self._last_report = now
            logger.warning("HTTP connections at the cap of %d: %d idle ones closed to make room, %d new ones "
                           "refused so far", self.max_connections, self.evicted, self.refused)

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        protocol = request.protocol
        transport = self._idle.pop(protocol, None)  # type: ignore[call-overload]
        if transport is not None:
            self._busy[protocol] = transport  # type: ignore[index]
        try:
            return await handler(request)
        finally:
            transport = self._busy.pop(protocol, None)  # type: ignore[call-overload]
            if transport is not None:
                self._idle[protocol] = transport  # type: ignore[index]  # the newest idle one

    def stats(self) -> dict:
        return {"open": self.open, "busy": len(self._busy), "cap": self.max_connections,
                "evicted": self.evicted, "refused": self.refused}
