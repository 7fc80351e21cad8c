"""Each ended call's record POSTed to `WEBHOOK_URL`, signed per Standard Webhooks.

Headers: `webhook-id` (the same on every retry, so receivers can drop duplicates),
`webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
(`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with the base64 part of
`whsec_…`). Body: `{"type": "realtime.call.ended", "timestamp", "data": record}`.

The signature is a few lines of `hmac` (written here rather than importing the
`standardwebhooks` package for one function; the tests verify it with that package).

Messages wait in the record store's outbox (SQLite): a delivery is tried at once,
then again after each delay of RETRY_DELAYS_S, and given up after the last. A
message not delivered when the server stops is sent after it starts again. Each
worker runs a `Deliverer`; a message is leased to one of them at a time. Nothing
here runs on a call's path: a call only adds a row.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
from typing import Any, Optional

import aiohttp

from realtime import events
from realtime.redaction import redact

from .records import RecordStore

logger = logging.getLogger(__name__)

#: Seconds before each retry (the first attempt is immediate); then it is given up.
RETRY_DELAYS_S = (2.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 3600.0 * 6)
ATTEMPT_TIMEOUT_S = 15.0
POLL_S = 1.0
EVENT_TYPE = "realtime.call.ended"


class SecretError(ValueError):
    pass


def signing_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    body = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("must be whsec_ followed by base64 (e.g. whsec_$(openssl rand -base64 32))") from None
    if len(key) < 16:
        raise SecretError("must hold at least 16 bytes of key (24+ base64 characters)")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: str) -> str:
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def payload(record: dict[str, Any]) -> str:
    return json.dumps({"type": EVENT_TYPE, "timestamp": round(time.time(), 3), "data": record},
                      separators=(",", ":"))


class Deliverer:
    def __init__(self, store: RecordStore, url: str, secret: str) -> None:
        self.store = store
        self.url = url
        self.key = signing_key(secret)
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self.delivered = 0
        self.failed_attempts = 0

    async def enqueue(self, record: dict[str, Any]) -> None:
        await self.store.enqueue_webhook(events.new_id("msg"), record["id"], redact(payload(record)))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S)) as http:
            while True:
                try:
                    due = await self.store.claim_webhooks(lease_s=ATTEMPT_TIMEOUT_S * 2)
                except Exception as exc:  # the database is busy or gone: try again shortly
                    logger.warning("webhooks: could not read the outbox: %s", exc)
                    due = []
                if due:
                    await asyncio.gather(*(self._attempt(http, *m) for m in due))
                    continue
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                except asyncio.TimeoutError:
                    pass

    async def _attempt(self, http: aiohttp.ClientSession, message_id: str, body: str, attempts: int) -> None:
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(timestamp), "webhook-signature": sign(self.key, message_id, timestamp, body)}
        error: Optional[str] = None
        try:
            async with http.post(self.url, data=body.encode(), headers=headers) as r:
                await r.read()
                if not 200 <= r.status < 300:
                    error = f"HTTP {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if error is None:
            await self.store.webhook_delivered(message_id)
            self.delivered += 1
            return
        self.failed_attempts += 1
        retry_at = time.time() + RETRY_DELAYS_S[attempts] if attempts < len(RETRY_DELAYS_S) else None
        await self.store.webhook_failed(message_id, redact(error), retry_at)
        logger.warning("webhook %s: attempt %d failed (%s); %s", message_id, attempts + 1, redact(error),
                       f"next in {RETRY_DELAYS_S[attempts]:g} s" if retry_at else "given up")
