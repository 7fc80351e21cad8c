"""The WebSocket to the Realtime server: OpenAI, Azure, the local backend or any
compatible server, all through this one client.

Sends go through one queue drained by one writer, so events leave in the order
they were produced (audio, then the truncate that refers to it) and callers that
live in synchronous callbacks (data channel, playback) can send without awaiting.
Events queued before the socket is open wait for it; `session.update` always
goes first.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Optional
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from . import events
from .events import Event

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Queued events before the socket opens or while it is slow (~20 s of audio).
MAX_QUEUED = 1000


class UpstreamError(Exception):
    """The upstream refused, could not be reached or dropped the connection.

    Messages name the host and the status, never the key or the query string.
    `close_code`: the WebSocket close code when an open session ended (1006: dropped).
    """

    def __init__(self, message: str, close_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.close_code = close_code


#: Close codes after which a new session is worth opening: going away (OpenAI's 60-minute
#: limit is 1001), dropped, internal error, restart, try again later.
RETRYABLE_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013})


class UpstreamBusy(UpstreamError):
    """The upstream is rate-limiting (HTTP 429) or overloaded (503): try again later."""

    def __init__(self, message: str, retry_after: str = "5") -> None:
        super().__init__(message)
        self.retry_after = retry_after


def redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


class UpstreamSession:
    def __init__(self, url: str, headers: dict[str, str], *, open_timeout: float = 10.0) -> None:
        self.url = url
        self._headers = headers
        self._open_timeout = open_timeout
        self._ws: Optional[ClientConnection] = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self.sent_events = 0
        self.received_events = 0
        self.malformed_events = 0  # not JSON, not an object, or no string `type`: dropped

    def fresh(self) -> "UpstreamSession":
        """A new, unopened session to the same server with the same credentials."""
        return UpstreamSession(self.url, self._headers, open_timeout=self._open_timeout)

    async def connect(self, first: Event) -> None:
        """Open the socket and send `first` (the session.update) before anything queued."""
        where = redact(self.url)
        try:
            self._ws = await connect(
                self.url,
                additional_headers=self._headers,
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=self._open_timeout,
                compression=None,  # base64 audio does not deflate; save the CPU
                user_agent_header="realtime-webrtc-bridge",
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (429, 503):
                retry = exc.response.headers.get("Retry-After", "5")
                raise UpstreamBusy(f"upstream {where} is busy: HTTP {status}",
                                   retry if retry.isdigit() else "5") from None
            raise UpstreamError(f"upstream {where} refused the connection: HTTP {status}") from None
        except (InvalidHandshake, ValueError) as exc:
            raise UpstreamError(f"upstream {where} handshake failed: {type(exc).__name__}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or type(exc).__name__)
            raise UpstreamError(f"could not reach upstream {where}: {reason}") from None
        await self._ws.send(events.dumps(first))
        self.sent_events += 1

    def send(self, event: Event) -> None:
        """Queue an event for the upstream (never blocks)."""
        if self._queue.qsize() >= MAX_QUEUED:
            raise UpstreamError(f"upstream is not keeping up ({MAX_QUEUED} events queued)")
        self._queue.put_nowait(events.dumps(event))

    async def write_loop(self) -> None:
        assert self._ws is not None
        try:
            while True:
                message = await self._queue.get()
                await self._ws.send(message)
                self.sent_events += 1
        except ConnectionClosed as exc:
            raise UpstreamError(*_closed_reason(exc)) from None

    async def read(self) -> AsyncIterator[Event]:
        """Server events (beta names mapped to GA). Ends when the upstream closes."""
        assert self._ws is not None
        try:
            async for message in self._ws:
                try:
                    event = json.loads(message)
                except (ValueError, RecursionError):
                    event = None
                if not isinstance(event, dict) or not isinstance(event.get("type"), str) or not event["type"]:
                    self.malformed_events += 1
                    if self.malformed_events in (1, 10, 100, 1000):  # a summary, never a line per event
                        logger.warning("upstream sent %d malformed event(s) so far (dropped; latest %d bytes)",
                                       self.malformed_events, len(message))
                    continue
                self.received_events += 1
                yield events.normalize_server_event(event)
        except ConnectionClosed as exc:
            raise UpstreamError(*_closed_reason(exc)) from None
        raise UpstreamError(*_closed_reason(None, self._ws))

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()


def _closed_reason(exc: Optional[ConnectionClosed], ws: Optional[ClientConnection] = None) -> tuple[str, int]:
    """Why the upstream went away, from the close frame it sent (websockets' `rcvd`, or the
    connection's `close_code`/`close_reason` after a clean end of the stream)."""
    code, reason = None, ""
    if exc is not None and exc.rcvd is not None:
        code, reason = exc.rcvd.code, exc.rcvd.reason
    elif ws is not None and ws.close_code is not None:
        code, reason = ws.close_code, ws.close_reason or ""
    if code is None:
        return "upstream connection dropped", 1006
    reason = reason[:200]
    return f"upstream closed the connection (code {code}{': ' + reason if reason else ''})", code
