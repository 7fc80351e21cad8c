"""What the local backend says back.

`EchoResponder` (default) answers with what it understood, honest about being a
local stand-in. `ChatResponder` streams from any OpenAI-compatible
chat-completions server (Ollama, llama.cpp server, vLLM) with the session's
instructions, the conversation so far and the session's function tools: what
the model says comes as text, a tool it calls as a `ToolCall` (the session turns
it into a Realtime `function_call` item, as OpenAI's does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Protocol, Union

import aiohttp


class ResponderError(Exception):
    pass


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


Said = Union[str, ToolCall]


class Responder(Protocol):
    def respond(self, instructions: str, messages: list[dict[str, Any]],
                tools: Optional[list[dict[str, Any]]] = None, tool_choice: Any = "auto") -> AsyncIterator[Said]: ...


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Realtime function tools (`{type, name, description, parameters}`) in chat-completions' shape."""
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}}
            for t in tools if isinstance(t, dict) and t.get("type", "function") == "function" and t.get("name")]


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice if choice in ("auto", "none", "required") else "auto"


class EchoResponder:
    async def respond(self, instructions: str, messages: list[dict[str, Any]],
                      tools: Optional[list[dict[str, Any]]] = None, tool_choice: Any = "auto") -> AsyncIterator[Said]:
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

    async def respond(self, instructions: str, messages: list[dict[str, Any]],
                      tools: Optional[list[dict[str, Any]]] = None, tool_choice: Any = "auto") -> AsyncIterator[Said]:
        body: dict[str, Any] = {
            "model": self.model, "stream": True,
            "messages": ([{"role": "system", "content": instructions}] if instructions else []) + messages}
        functions = chat_tools(tools or [])
        if functions and tool_choice != "none":
            body["tools"], body["tool_choice"] = functions, chat_tool_choice(tool_choice)
        calls: dict[int, dict[str, str]] = {}  # streamed tool calls, by index, their arguments in pieces
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
                            break
                        try:
                            choice = json.loads(data)["choices"][0]
                        except (ValueError, KeyError, IndexError, TypeError):
                            continue
                        delta = choice.get("delta") or {}
                        text = delta.get("content")
                        if text:
                            yield text
                        for piece in delta.get("tool_calls") or []:
                            if not isinstance(piece, dict):
                                continue
                            call = calls.setdefault(int(piece.get("index", len(calls))), {"id": "", "name": "", "arguments": ""})
                            fn = piece.get("function") or {}
                            call["id"] = piece.get("id") or call["id"]
                            call["name"] = fn.get("name") or call["name"]
                            call["arguments"] += fn.get("arguments") or ""
        except aiohttp.ClientError as exc:
            raise ResponderError(f"chat server unreachable: {type(exc).__name__}") from None
        for index in sorted(calls):
            call = calls[index]
            if call["name"]:
                yield ToolCall(call["id"] or f"call_{index}", call["name"], call["arguments"] or "{}")


def make_responder(spec: str, model: str) -> Responder:
    if spec == "echo":
        return EchoResponder()
    if spec.startswith(("http://", "https://")):
        return ChatResponder(spec, model)
    raise ValueError("must be 'echo' or an http(s):// chat-completions base URL")
