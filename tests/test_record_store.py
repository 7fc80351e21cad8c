"""The record store, the same checks on both engines: an SQLite file and a real PostgreSQL
server (started by the test): records, listing, the webhook outbox and its leases."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

import settings as config
from control.records import PostgresStore, RecordStore, open_store
from harness.postgres import Postgres
from harness.stub import RealtimeStub

PG_WHY_NOT = Postgres.unavailable()


@pytest.fixture(scope="module")
def postgres():
    if PG_WHY_NOT:
        pytest.skip(PG_WHY_NOT)
    with Postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = RecordStore(str(tmp_path / "r.db"))
    else:
        pg = request.getfixturevalue("postgres")
        s = PostgresStore(pg.url)
    await s.open()
    if request.param == "postgres":  # each test starts empty
        await s.pool.execute("TRUNCATE calls, webhook_outbox")
    yield s
    await s.close()


def _record(i: int, **kw) -> dict:
    return {"id": f"rtc_{i:022x}", "created_at": 1000.0 + i, "ended_at": None, "status": "active",
            "transcript": [{"role": "user", "text": "héllo"}], **kw}


async def test_records_are_saved_updated_got_and_listed_in_order(store):
    for i in range(5):
        await store.save(_record(i))
    await store.save(_record(2, status="ended", ended_at=1010.0))
    got = await store.get(_record(2)["id"])
    assert got["status"] == "ended" and got["transcript"][0]["text"] == "héllo"
    assert await store.get("rtc_nope") is None
    first, more = await store.list(since=1001.0, limit=2)
    assert [r["created_at"] for r in first] == [1001.0, 1002.0] and more
    rest, more = await store.list(since=1003.0, limit=10)
    assert [r["created_at"] for r in rest] == [1003.0, 1004.0] and not more


async def test_the_outbox_leases_retries_and_gives_up(store):
    await store.enqueue_webhook("msg_1", "rtc_a", '{"x":1}')
    await store.enqueue_webhook("msg_1", "rtc_a", '{"x":1}')  # the same message once
    assert await store.claim_webhooks(lease_s=30) == [("msg_1", '{"x":1}', 0)]
    assert await store.claim_webhooks(lease_s=30) == []  # leased
    await store.webhook_failed("msg_1", "HTTP 500", retry_at=time.time() - 1)
    assert [m[0] for m in await store.claim_webhooks(lease_s=30)] == ["msg_1"]  # due again
    await store.webhook_failed("msg_1", "HTTP 500", retry_at=None)  # given up
    assert await store.claim_webhooks(lease_s=30) == []
    status = await store.webhook_status("rtc_a")
    assert status[0]["attempts"] == 2 and status[0]["last_error"] == "HTTP 500" and status[0]["next_attempt_at"] is None
    await store.enqueue_webhook("msg_2", "rtc_b", "{}")
    await store.claim_webhooks(lease_s=30)
    await store.webhook_delivered("msg_2")
    assert (await store.webhook_status("rtc_b"))[0]["delivered_at"] is not None


async def test_two_nodes_sharing_postgres_never_claim_the_same_webhook(postgres):
    a, b = PostgresStore(postgres.url), PostgresStore(postgres.url)
    await asyncio.gather(a.open(), b.open())  # both create the tables at once: one does
    try:
        await a.pool.execute("TRUNCATE calls, webhook_outbox")
        for i in range(40):
            await a.enqueue_webhook(f"msg_{i}", "rtc_x", "{}")
        got = await asyncio.gather(*(s.claim_webhooks(lease_s=30, limit=3) for s in (a, b) for _ in range(10)))
        ids = [m[0] for batch in got for m in batch]
        assert len(ids) == len(set(ids)) == 40
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_a_bridge_keeps_its_records_in_postgres_for_every_node(postgres, start_bridge, new_caller):
    token = "operator-token-for-pg-0123456789"
    async with RealtimeStub() as stub:
        bridge = await start_bridge(stub.url, records_db=postgres.url, auth_token=token)
        caller = new_caller(bridge.url)
        await caller.connect(headers={"Authorization": f"Bearer {token}"})
        await stub.wait_session()
        assert await caller.hangup() == 200
        await bridge.wait_no_calls()
    async with RealtimeStub() as stub2:
        other = await start_bridge(stub2.url, records_db=postgres.url, auth_token=token)  # another node
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # the final write is a task of its own
                async with http.get(f"{other.url}/v1/realtime/calls/{caller.call_id}",
                                    headers={"Authorization": f"Bearer {token}"}) as r:
                    record = await r.json()
                if r.status == 200 and record["status"] == "ended":
                    break
                await asyncio.sleep(0.05)
    assert r.status == 200 and record["status"] == "ended" and record["end_reason"] == "hung up by the client"
    assert "bridge-pw-0123" not in str(other.settings)


def test_an_unknown_database_url_is_refused_at_start():
    with pytest.raises(config.ConfigError, match="RECORDS_DB.*mysql"):
        config.from_raw({"records_db": "mysql://x/y"})
    assert isinstance(open_store("/tmp/x.db"), RecordStore)


async def test_old_ended_records_are_pruned_and_live_ones_kept(store):
    await store.save(_record(1, status="ended", ended_at=1002.0))
    await store.save(_record(2))  # still active: kept whatever its age
    await store.save(_record(3, created_at=5000.0, status="ended"))
    await store.enqueue_webhook("msg_old", _record(1)["id"], "{}")
    await store.claim_webhooks(lease_s=30)
    await store.webhook_delivered("msg_old")
    assert await store.prune(before=2000.0) == 1
    kept, _ = await store.list(since=0, limit=10)
    assert [r["id"] for r in kept] == [_record(2)["id"], _record(3)["id"]]
    assert await store.webhook_status(_record(1)["id"]) == []  # its delivered webhook went with it
