"""Optional access control in OpenAI's own shape.

With `--auth-token` set, creating a call needs `Authorization: Bearer <token>` or
an ephemeral key minted by `POST /v1/realtime/client_secrets` (which itself needs
the token). An app server holds the token and hands browsers short-lived keys,
exactly as with OpenAI; a key may carry a session config (filtered by the
operator's policy) that calls made with it start with. Without a token, calls
are open (the default, for local use).

Ephemeral keys are stateless: `ek_` + the key's claims (expiry, a nonce, the
session) + an HMAC-SHA256 over them, keyed from the operator token. Any worker
process, and any machine given the same token, verifies a key without a shared
store; nothing is kept per key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import zlib
from dataclasses import dataclass
from typing import Any, Optional

from aiohttp import web

MIN_TTL_S, MAX_TTL_S, DEFAULT_TTL_S = 10, 7200, 600
#: Keys travel in an Authorization header (aiohttp's limit is 8 KiB a line).
MAX_KEY_CHARS = 6000
_PREFIX = "ek_"


class KeyTooLarge(ValueError):
    pass


@dataclass
class EphemeralKey:
    value: str
    expires_at: float  # unix time
    session: Optional[dict[str, Any]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyRing:
    def __init__(self, token: Optional[str]) -> None:
        self.token = token
        # a key of its own for signing, derived from the token: the token itself never signs
        self._secret = hashlib.sha256(b"realtime-bridge ephemeral keys\0" + token.encode()).digest() if token else b""

    @property
    def required(self) -> bool:
        return bool(self.token)

    def _sign(self, claims: str) -> str:
        return _b64(hmac.new(self._secret, claims.encode("ascii"), hashlib.sha256).digest())

    def mint(self, ttl_s: int, session: Optional[dict[str, Any]]) -> EphemeralKey:
        expires = int(time.time()) + ttl_s
        body = json.dumps({"e": expires, "n": secrets.token_urlsafe(12), "s": session},
                          separators=(",", ":")).encode()
        claims = _b64(zlib.compress(body, 9))
        value = f"{_PREFIX}{claims}.{self._sign(claims)}"
        if len(value) > MAX_KEY_CHARS:
            raise KeyTooLarge(f"the key's session is too large ({len(value)} characters as a key; "
                              f"at most {MAX_KEY_CHARS}): keep only what the calls need")
        return EphemeralKey(value, float(expires), session)

    def is_token(self, presented: Optional[str]) -> bool:
        if not (self.token and presented):
            return False
        return hmac.compare_digest(presented.encode("utf-8", "replace"), self.token.encode("utf-8", "replace"))

    def ephemeral(self, presented: Optional[str]) -> Optional[EphemeralKey]:
        """The key's claims if it is ours, intact and unexpired; else None."""
        if not self._secret or not presented or not presented.startswith(_PREFIX) or len(presented) > MAX_KEY_CHARS:
            return None
        claims, _, signature = presented[len(_PREFIX):].partition(".")
        if not claims or not claims.isascii() or not hmac.compare_digest(signature.encode("utf-8", "replace"),
                                                 self._sign(claims).encode("ascii")):
            return None
        try:
            body = json.loads(zlib.decompress(_unb64(claims), bufsize=MAX_KEY_CHARS * 4))
            expires, session = float(body["e"]), body.get("s")
        except (ValueError, KeyError, TypeError, zlib.error):
            return None
        if expires <= time.time() or (session is not None and not isinstance(session, dict)):
            return None
        return EphemeralKey(presented, expires, session)


def bearer(request: web.Request) -> Optional[str]:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None
