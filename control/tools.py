"""Function tools the bridge runs itself, declared by the operator (`TOOLS_CONFIG`).

A TOML (or YAML) file lists tools; each has a name, a description, JSON-schema
parameters and an HTTP endpoint (with headers that may hold secrets, and a
timeout). They are added to every session; a page's `session.update` with its
own `tools` gets them appended (a page tool with the same name is dropped), so
the model always has them. Page-declared tools still go to the page, as with
OpenAI: the bridge only answers calls to the tools it declared.

When the model calls one (`response.function_call_arguments.done`) and the
response that called it completes, the bridge POSTs the arguments (the JSON object
the model wrote) to the endpoint, then sends each result as a
`conversation.item.create` with a `function_call_output`, then one
`response.create`. A response that was cancelled or cut short runs no tool. A timeout, a refused connection, an error status or arguments
that are not JSON become an output telling the model what failed. The page sees
all of it as ordinary events; the endpoint's URL and headers never leave the
server (they are added to the redactor).

    [[tool]]
    name = "lookup_order"
    description = "Look up an order by its number."
    url = "https://orders.internal/lookup"
    timeout_seconds = 5
    headers = { Authorization = "Bearer ${ORDERS_TOKEN}" }   # ${VAR}: from the environment
    parameters = { type = "object", properties = { number = { type = "string" } }, required = ["number"] }
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlsplit

import aiohttp

from realtime import events
from realtime.events import Client, Event, Server

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: Longest tool answer passed to the model (the rest is cut, and the model told).
MAX_OUTPUT_BYTES = 16 * 1024
MAX_TIMEOUT_S = 120.0
#: How long finished tool results wait for the model's current response to end before
#: `response.create` is sent anyway.
MAX_WAIT_FOR_RESPONSE_S = 30.0
_KEYS = {"name", "description", "url", "headers", "timeout_seconds", "parameters"}


class ToolsError(Exception):
    """The tools file is invalid; the message is one line."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    url: str
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout_s: float = 10.0

    def definition(self) -> dict[str, Any]:
        """The tool as the model is told of it (no URL, no headers)."""
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters}


@dataclass(frozen=True)
class ToolSet:
    tools: tuple[Tool, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.tools)

    def get(self, name: Any) -> Optional[Tool]:
        return next((t for t in self.tools if t.name == name), None)

    def definitions(self) -> list[dict[str, Any]]:
        return [t.definition() for t in self.tools]

    def secrets(self) -> list[str]:
        """What must never leave the server: header values and the endpoints' URLs."""
        return [v for t in self.tools for _, v in t.headers] + [t.url for t in self.tools]

    def with_server_tools(self, event: Event) -> Event:
        """A session.update whose `tools` (if it sets them) keeps the server's tools."""
        session = event.get("session")
        if not self.tools or not isinstance(session, dict) or "tools" not in session:
            return event
        page_tools = session.get("tools") if isinstance(session.get("tools"), list) else []
        names = {t.name for t in self.tools}
        kept = [t for t in page_tools if not (isinstance(t, dict) and t.get("name") in names)]
        return {**event, "session": {**session, "tools": kept + self.definitions()}}


def load_tools(path: str) -> ToolSet:
    """Read and check a tools file; every problem is one line naming the file and the tool."""
    p = Path(path).expanduser()
    where = p.name
    try:
        text = p.read_text()
    except OSError as exc:
        raise ToolsError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text) or {}
        else:
            doc = tomllib.loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
        raise ToolsError(f"{where}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'TOML'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or set(doc) - {"tool"}:
        raise ToolsError(f"{where}: the file holds a list named 'tool' ([[tool]] tables) and nothing else")
    entries = doc.get("tool") or []
    if not isinstance(entries, list):
        raise ToolsError(f"{where}: 'tool' must be a list of tables ([[tool]])")
    tools: list[Tool] = []
    for i, entry in enumerate(entries):
        tool = _check_tool(entry, f"{where}: tool[{i}]")
        if any(t.name == tool.name for t in tools):
            raise ToolsError(f"{where}: tool[{i}]: the name '{tool.name}' is declared twice")
        tools.append(tool)
    return ToolSet(tuple(tools))


def _check_tool(entry: Any, where: str) -> Tool:
    if not isinstance(entry, dict):
        raise ToolsError(f"{where}: must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolsError(f"{where}: 'name' must be 1-64 letters, digits, '_' or '-'")
    where = f"{where} ({name})"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ToolsError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_KEYS))})")
    description = entry.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ToolsError(f"{where}: 'description' must be a non-empty string (the model reads it)")
    url = _expand(entry.get("url"), where, "url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolsError(f"{where}: 'url' must be an http:// or https:// URL")
    headers = entry.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise ToolsError(f"{where}: 'headers' must be a table of strings")
    timeout = entry.get("timeout_seconds", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ToolsError(f"{where}: 'timeout_seconds' must be a number above 0 and at most {MAX_TIMEOUT_S:g}")
    parameters = entry.get("parameters", {"type": "object", "properties": {}})
    _check_schema(parameters, f"{where}: 'parameters'")
    return Tool(name, description.strip(), parameters, url,
                tuple((k, _expand(v, where, f"headers.{k}")) for k, v in headers.items()), float(timeout))


def _expand(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ToolsError(f"{where}: '{key}' must be a non-empty string")

    def one(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise ToolsError(f"{where}: '{key}' uses ${{{m.group(1)}}}, which is not set in the environment")
        return os.environ[m.group(1)]

    return _VAR.sub(one, value)


def _check_schema(schema: Any, where: str) -> None:
    """The checks the Realtime API makes of a function's parameters: a JSON-schema object."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ToolsError(f"{where} must be a JSON-schema object with type = \"object\"")
    props = schema.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
        raise ToolsError(f"{where}: 'properties' must map each parameter name to a schema table")
    for pname, prop in props.items():
        kind = prop.get("type")
        allowed = ("string", "number", "integer", "boolean", "object", "array", "null")
        kinds = kind if isinstance(kind, list) else [kind]
        if kind is not None and not all(k in allowed for k in kinds):
            raise ToolsError(f"{where}: parameter '{pname}' has an unknown type {kind!r}")
        if prop.get("type") == "object":
            _check_schema(prop, f"{where}.{pname}")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) and r in props for r in required):
        raise ToolsError(f"{where}: 'required' must list names from 'properties'")
    try:
        json.dumps(schema)
    except (TypeError, ValueError):  # a TOML date, say
        raise ToolsError(f"{where}: must hold only JSON values") from None


@dataclass
class _Batch:
    """The bridge's tool calls made by one response, answered together once it is done."""

    calls: list[tuple[Tool, str, Any]] = field(default_factory=list)  # (tool, call_id, arguments)
    response_done: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = "completed"  # the response's, at response.done


class CallTools:
    """Runs a call's server tool calls (the asyncio part; the call gives it its I/O)."""

    def __init__(self, toolset: ToolSet, http: aiohttp.ClientSession, call_id: str, *,
                 send: Callable[[Event], None], spawn: Callable[[Awaitable[None], str], Any],
                 busy: Callable[[], bool], ran: Callable[[str, str, str, str, int], None]) -> None:
        self.toolset = toolset
        self.http = http
        self.call_id = call_id
        self._send, self._spawn, self._busy, self._ran = send, spawn, busy, ran
        self._batches: dict[str, _Batch] = {}

    def with_server_tools(self, event: Event) -> Event:
        return self.toolset.with_server_tools(event)

    def on_upstream_event(self, event: Event) -> None:
        kind = event.get("type")
        if kind == Server.FUNCTION_ARGS_DONE:
            tool = self.toolset.get(event.get("name"))
            if tool is None:
                return  # the page's tool: the page answers it
            rid = str(event.get("response_id") or "")
            batch = self._batches.get(rid)
            if batch is None:
                batch = self._batches[rid] = _Batch()
                self._spawn(self._answer(rid, batch), "tools")
            batch.calls.append((tool, str(event.get("call_id") or ""), event.get("arguments")))
        elif kind == Server.RESPONSE_DONE:
            response = event.get("response")
            batch = self._batches.get(str(response.get("id") or "")) if isinstance(response, dict) else None
            if batch is not None:
                batch.status = str(response.get("status") or "completed")
                batch.response_done.set()

    async def _answer(self, rid: str, batch: _Batch) -> None:
        """Once the response that called the tools is done: run them (side by side), then give
        the model their results and ask it to go on. A response cut short (the caller spoke
        over it, it was cancelled or failed) may hold half-written arguments, and the caller
        has moved on: its tools are not run."""
        tasks: list[asyncio.Task] = []
        try:
            await batch.response_done.wait()
            if batch.status != "completed":
                for tool, call_id, _ in batch.calls:
                    self._ran(call_id, tool.name, f"not_run_response_{batch.status}", "", 0)
                return
            tasks = [asyncio.ensure_future(self._run(*c)) for c in batch.calls]
            results = await asyncio.gather(*tasks)
            deadline = time.monotonic() + MAX_WAIT_FOR_RESPONSE_S
            while self._busy() and time.monotonic() < deadline:  # another response started meanwhile
                await asyncio.sleep(0.05)
            for call_id, output in results:
                self._send({"type": Client.ITEM_CREATE, "event_id": events.event_id(),
                            "item": {"type": "function_call_output", "call_id": call_id, "output": output}})
            self._send({"type": Client.RESPONSE_CREATE, "event_id": events.event_id()})
        finally:
            self._batches.pop(rid, None)
            for task in tasks:
                task.cancel()

    async def _run(self, tool: Tool, call_id: str, arguments: Any) -> tuple[str, str]:
        started = time.monotonic()
        status, output = await self._call(tool, call_id, arguments)
        self._ran(call_id, tool.name, status, output, round((time.monotonic() - started) * 1000))
        return call_id, output

    async def _call(self, tool: Tool, call_id: str, arguments: Any) -> tuple[str, str]:
        try:
            args = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
        except ValueError:
            return "invalid_arguments", _failure(tool, "its arguments were not valid JSON; call it again with a JSON object")
        headers = {**dict(tool.headers), "Content-Type": "application/json",
                   "X-Bridge-Call-Id": self.call_id, "X-Tool-Call-Id": call_id}
        try:
            async with self.http.post(tool.url, data=json.dumps(args), headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=tool.timeout_s)) as r:
                body = bytearray()
                async for chunk in r.content.iter_chunked(8192):
                    body += chunk
                    if len(body) > MAX_OUTPUT_BYTES:
                        break
                if r.status >= 300:
                    return "http_error", _failure(tool, f"its service answered HTTP {r.status}")
        except asyncio.TimeoutError:
            return "timeout", _failure(tool, f"its service did not answer within {tool.timeout_s:g} s")
        except aiohttp.ClientError as exc:
            return "unreachable", _failure(tool, f"its service could not be reached ({type(exc).__name__})")
        text = body[:MAX_OUTPUT_BYTES].decode("utf-8", "replace")
        if len(body) > MAX_OUTPUT_BYTES:
            text += f" [cut: the answer was longer than {MAX_OUTPUT_BYTES} bytes]"
        return "completed", text


def _failure(tool: Tool, what: str) -> str:
    return json.dumps({"error": f"The tool '{tool.name}' failed: {what}."})
