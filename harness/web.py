"""Small real HTTP services for tests (a tool's endpoint, a webhook receiver, a chat model):
an aiohttp app served on a free loopback port."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on 127.0.0.1; returns its runner (to clean up) and its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def tools_toml(url: str, *, timeout: float = 5, secret_var: str = "ORDERS_TOKEN") -> str:
    """A tools file with one `lookup_order` tool at `url`/lookup, its token from `secret_var`."""
    return f'''
[[tool]]
name = "lookup_order"
description = "Look up an order by its number."
url = "{url}/lookup"
timeout_seconds = {timeout}
headers = {{ Authorization = "Bearer ${{{secret_var}}}" }}
parameters = {{ type = "object", properties = {{ number = {{ type = "string" }} }}, required = ["number"] }}
'''


def chat_delta(delta: dict[str, Any]) -> bytes:
    """One server-sent chunk of a streamed chat completion, as OpenAI-compatible servers send it."""
    return f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n".encode()
