"""Short-lived TURN credentials, the TURN REST scheme coturn implements
(`use-auth-secret` + `static-auth-secret`): username `<expiry unix time>:<label>`,
password `base64(HMAC-SHA1(secret, username))`. The bridge and coturn share the
secret; each page gets credentials that expire (`TURN_TTL`), so a leaked one is
worth little, and nothing is stored anywhere.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Any, Optional


def default_urls(host: str) -> tuple[str, ...]:
    """TURN over UDP and TCP on 3478 and over TLS on 443: a browser on a network that blocks
    UDP, or everything but HTTPS, still gets through."""
    return (f"turn:{host}:3478?transport=udp", f"turn:{host}:3478?transport=tcp", f"turns:{host}:443?transport=tcp")


def credentials(secret: str, ttl_s: int, urls: tuple[str, ...], *, now: Optional[float] = None,
                label: Optional[str] = None) -> dict[str, Any]:
    """An RTCIceServer entry with fresh credentials."""
    expiry = int((now if now is not None else time.time()) + ttl_s)
    username = f"{expiry}:{label or secrets.token_hex(6)}"
    password = base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()
    return {"urls": list(urls), "username": username, "credential": password}
