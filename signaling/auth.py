"""Optional access control in OpenAI's own shape.

With `--auth-token` set, creating a call needs `Authorization: Bearer <token>` or
an ephemeral key minted by `POST /v1/realtime/client_secrets` (which itself needs
the token). An app server holds the token and hands browsers short-lived keys,
exactly as with OpenAI; a key may carry a session config (filtered by the
operator's policy) that calls made with it start with. Without a token, calls
are open (the default, for local use).
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, Optional

from aiohttp import web

MIN_TTL_S, MAX_TTL_S, DEFAULT_TTL_S = 10, 7200, 600


@dataclass
class EphemeralKey:
    value: str
    expires_at: float  # unix time
    session: Optional[dict[str, Any]]


class KeyRing:
    def __init__(self, token: Optional[str]) -> None:
        self.token = token
        self._keys: dict[str, EphemeralKey] = {}

    @property
    def required(self) -> bool:
        return bool(self.token)

    def mint(self, ttl_s: int, session: Optional[dict[str, Any]]) -> EphemeralKey:
        now = time.time()
        self._keys = {k: v for k, v in self._keys.items() if v.expires_at > now}
        key = EphemeralKey("ek_" + secrets.token_urlsafe(24), now + ttl_s, session)
        self._keys[key.value] = key
        return key

    def is_token(self, presented: Optional[str]) -> bool:
        return bool(self.token and presented and hmac.compare_digest(presented, self.token))

    def ephemeral(self, presented: Optional[str]) -> Optional[EphemeralKey]:
        key = self._keys.get(presented or "")
        if key is None or key.expires_at <= time.time():
            return None
        return key


def bearer(request: web.Request) -> Optional[str]:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None
