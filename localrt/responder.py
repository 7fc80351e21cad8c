"""What the local backend says back.

`EchoResponder` (default) answers with what it understood, honest about being a
local stand-in. `ChatResponder` streams from any OpenAI-compatible
chat-completions server (Ollama, llama.cpp server, vLLM) with the session's
instructions and the conversation so far.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Protocol

import aiohttp


class ResponderError(Exception):
    pass


class Responder(Protocol):
    def respond(self, instructions: str, messages: list[dict[str, str]]) -> AsyncIterator[str]: ...


class EchoResponder:
    async def respond(self, instructions: str, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "").strip()
        if last:
            yield f"You said: {last}."
        else:
            yield "Sorry, I did not catch that."


class ChatResponder:
    def __init__(self, base_url: str, model: str, *, api_key: str = "", timeout: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)

    async def respond(self, instructions: str, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        body = {"model": self.model, "stream": True,
                "messages": ([{"role": "system", "content": instructions}] if instructions else []) + messages}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with aiohttp.ClientSession(timeout=self.timeout) as http:
                async with http.post(self.url, json=body, headers=headers) as resp:
                    if resp.status != 200:
                        raise ResponderError(f"chat server answered HTTP {resp.status}")
                    async for raw in resp.content:
                        line = raw.decode("utf-8", "replace").strip()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        try:
                            choice = json.loads(data)["choices"][0]
                        except (ValueError, KeyError, IndexError):
                            continue
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except aiohttp.ClientError as exc:
            raise ResponderError(f"chat server unreachable: {type(exc).__name__}") from None


def make_responder(spec: str, model: str) -> Responder:
    if spec == "echo":
        return EchoResponder()
    if spec.startswith(("http://", "https://")):
        return ChatResponder(spec, model)
    raise ValueError("must be 'echo' or an http(s):// chat-completions base URL")
