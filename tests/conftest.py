"""Fixtures: a real Realtime stub over WebSocket, the real bridge app on a real port,
real aiortc callers. Nothing here mocks aiortc, aiohttp or websockets."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import pytest
from aiohttp import web

import settings as config
from harness.caller import Caller
from harness.stub import RealtimeStub
from signaling.app import build_app
from signaling.admission import NEVER
from signaling.routes import ADMISSION, GUARD, REGISTRY, CallRegistry

for noisy in ("aioice", "aiortc"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class Bridge:
    url: str
    app: web.Application
    settings: config.Settings

    @property
    def registry(self) -> CallRegistry:
        return self.app[REGISTRY]

    async def wait_no_calls(self, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.registry.calls:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"calls still active: {list(self.registry.calls)}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def stub() -> AsyncIterator[RealtimeStub]:
    async with RealtimeStub() as s:
        yield s


@pytest.fixture
async def start_bridge(tmp_path) -> AsyncIterator[Callable[..., "asyncio.Future[Bridge]"]]:
    runners: list[web.AppRunner] = []

    async def start(upstream_url: str, host: str = "127.0.0.1", **overrides: str) -> Bridge:
        raw = {"realtime_url": upstream_url, "records_db": str(tmp_path / "records.db"), **overrides}
        settings = config.from_raw(raw)
        app = build_app(settings, settings.upstream_url())
        # This loop also runs the test's callers, speech synthesis and checks: its lag is not a
        # server's load. Admission is tested on its own (test_hardening).
        app[ADMISSION].thresholds = NEVER
        runner = web.AppRunner(app)
        await runner.setup()
        app[GUARD].attach(runner.server)
        await web.TCPSite(runner, host, 0).start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return Bridge(f"http://{host}:{port}", app, settings)

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def bridge(stub: RealtimeStub, start_bridge) -> Bridge:
    return await start_bridge(stub.url)


@pytest.fixture
async def new_caller() -> AsyncIterator[Callable[[str], Caller]]:
    callers: list[Caller] = []

    def make(url: str) -> Caller:
        c = Caller(url)
        callers.append(c)
        return c

    yield make
    for c in callers:
        await c.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def connected_call(bridge: Bridge, stub: RealtimeStub, new_caller, freq=None):
    """A caller connected through `bridge` to `stub`, its channel open and its session updated."""
    caller = new_caller(bridge.url)
    caller.source.freq = freq
    await caller.connect()
    session = await stub.wait_session()
    await asyncio.wait_for(caller.channel_open.wait(), 10)
    await caller.wait_event("session.updated")
    return caller, session
