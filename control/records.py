"""Call records: what happened in a call, kept after it ends.

`CallRecord` is built in memory as the call runs (no I/O: the call feeds it the
events it already handles). `RecordStore` keeps ended records, and the webhook
outbox, in SQLite (aiosqlite: the sqlite3 calls run on its own thread, so a
write never blocks the event loop). Several worker processes share one file (WAL
journal, a busy timeout). `PostgresStore` is the same for several nodes sharing
one database (asyncpg), chosen by a `postgresql://` RECORDS_DB. A record is
written when its call starts (status "active") and again when it ends, so a
crash leaves a trace.

A record (JSON, the shape `GET /v1/realtime/calls/{id}` returns):

    id, object="realtime.call", status (active|ended), created_at, connected_at,
    ended_at (Unix seconds), duration_s, end_reason, end_category,
    upstream_sessions [ids], handoffs, reattaches,
    transcript  [{role, item_id, text, at, truncated, audio_end_ms?}]
    barge_ins   [{at, cause, items: [{item_id, audio_end_ms}]}]
    truncations [{at, item_id, audio_end_ms}]
    tool_calls  [{call_id, name, arguments, runner (bridge|page|sideband; null while
                  pending), started_at, duration_ms, status, output}]
    usage       token counts summed over response.done events (+ responses)
    audio       uplink/downlink counters at the end (loss, recovery, lateness) and the
                playback's (frames, late frames, worst lateness, re-anchors)
    recording   path of the Ogg/Opus file, when RECORD_AUDIO is set
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

import aiosqlite

from realtime.events import Client, Event, Server

#: Longest text kept per transcript entry or tool output (a record stays a few hundred KiB at most).
MAX_TEXT = 8192
MAX_ENTRIES = 2000

#: An end reason is free text; metrics and list filters use its category.
_CATEGORIES = (
    ("hangup", ("hung up",)),
    ("page_closed", ("data channel closed", "peer connection closed")),
    ("network_lost", ("did not re-attach", "peer connection failed")),
    ("connect_failed", ("ice/dtls", "did not connect")),
    ("no_audio", ("no audio from the caller", "audio track ended")),
    ("max_duration", ("maximum duration",)),
    ("shutdown", ("shutting down",)),
    ("setup_failed", ("set-up failed",)),
    ("upstream", ("upstream",)),
    ("operator", ("sideband",)),
)


def end_category(reason: Optional[str]) -> str:
    text = (reason or "").lower()
    for category, needles in _CATEGORIES:
        if any(n in text for n in needles):
            return category
    return "other"


def _dict(value: Any) -> dict:
    """`value` if it is an object (events from a page or an upstream can hold anything)."""
    return value if isinstance(value, dict) else {}


def _now() -> float:
    return round(time.time(), 3)


def _clip(text: Any) -> str:
    text = text if isinstance(text, str) else json.dumps(text)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"


class CallRecord:
    def __init__(self, call_id: str) -> None:
        self.data: dict[str, Any] = {
            "id": call_id, "object": "realtime.call", "status": "active",
            "created_at": _now(), "connected_at": None, "ended_at": None, "duration_s": None,
            "end_reason": None, "end_category": None,
            "upstream_sessions": [], "handoffs": 0, "reattaches": 0,
            "transcript": [], "barge_ins": [], "truncations": [], "tool_calls": [],
            "usage": {"responses": 0}, "audio": {}, "recording": None,
        }
        self._transcripts: dict[tuple[str, str], dict] = {}  # (role, item id) → entry
        self._tools: dict[str, dict] = {}  # function call_id → entry

    # -- fed by the call ------------------------------------------------------------

    def connected(self) -> None:
        if self.data["connected_at"] is None:
            self.data["connected_at"] = _now()

    def upstream_event(self, event: Event) -> None:
        """An upstream event whose shape was checked."""
        kind = event.get("type")
        if kind == Server.SESSION_CREATED:
            sid = _dict(event.get("session")).get("id")
            if isinstance(sid, str) and sid not in self.data["upstream_sessions"]:
                self.data["upstream_sessions"].append(sid)
        elif kind == Server.INPUT_TRANSCRIPTION_COMPLETED:
            self._say("user", event.get("item_id"), event.get("transcript"))
        elif kind in (Server.OUTPUT_TRANSCRIPT_DONE, Server.OUTPUT_TEXT_DONE):
            self._say("assistant", event.get("item_id"),
                      event.get("transcript") if kind == Server.OUTPUT_TRANSCRIPT_DONE else event.get("text"))
        elif kind == Server.FUNCTION_ARGS_DONE:
            call_id = event.get("call_id")
            if isinstance(call_id, str) and call_id not in self._tools and len(self._tools) < MAX_ENTRIES:
                entry = {"call_id": call_id, "name": str(event.get("name") or ""),
                         "arguments": _clip(event.get("arguments") or ""), "runner": None,
                         "started_at": _now(), "duration_ms": None, "status": "pending", "output": None}
                self._tools[call_id] = entry
                self.data["tool_calls"].append(entry)
        elif kind == Server.RESPONSE_DONE:
            self.data["usage"]["responses"] += 1
            usage = _dict(event.get("response")).get("usage")
            if isinstance(usage, dict):
                _add_counts(self.data["usage"], usage)

    def client_event(self, event: Event, source: str = "bridge") -> None:
        """An event sent upstream; `source`: page, sideband or bridge."""
        kind = event.get("type")
        if kind == Client.ITEM_TRUNCATE:
            item_id, end_ms = event.get("item_id"), event.get("audio_end_ms")
            if not isinstance(item_id, str) or not isinstance(end_ms, int):
                return
            if len(self.data["truncations"]) < MAX_ENTRIES:
                self.data["truncations"].append({"at": _now(), "item_id": item_id, "audio_end_ms": end_ms})
            entry = self._transcripts.get(("assistant", item_id))
            if entry is not None:
                entry["truncated"], entry["audio_end_ms"] = True, end_ms
            else:  # its transcript comes later: remember the cut
                self._transcripts[("cut", item_id)] = {"audio_end_ms": end_ms}
        elif kind == Client.ITEM_CREATE:
            item = _dict(event.get("item"))
            if item.get("type") == "function_call_output":
                entry = self._tools.get(str(item.get("call_id")))
                if entry is not None and entry["status"] == "pending":  # the page or a sideband ran it
                    entry["runner"], entry["status"] = source, "completed"
                    entry["output"] = _clip(item.get("output") or "")
                    entry["duration_ms"] = round((_now() - entry["started_at"]) * 1000)
            elif item.get("type") == "message" and item.get("role") == "user":
                content = item.get("content") if isinstance(item.get("content"), list) else []
                texts = [c.get("text") for c in content if isinstance(c, dict) and isinstance(c.get("text"), str)]
                item_id = item.get("id") if isinstance(item.get("id"), str) else f"typed_{len(self.data['transcript'])}"
                if texts:
                    self._say("user", item_id, " ".join(texts))

    def barge_in(self, cause: str, cut: list[tuple[str, int]]) -> None:
        """Playback was cut: `cause` speech (the user spoke over the model), page_clear or
        sideband_clear (output_audio_buffer.clear), network_lost (the call was held)."""
        if len(self.data["barge_ins"]) < MAX_ENTRIES:
            self.data["barge_ins"].append({"at": _now(), "cause": cause,
                                           "items": [{"item_id": i, "audio_end_ms": ms} for i, ms in cut]})

    def tool_ran(self, call_id: str, name: str, status: str, output: str, duration_ms: int) -> None:
        """A tool the bridge ran (its endpoint answered, failed or timed out)."""
        entry = self._tools.get(call_id)
        if entry is None:
            entry = {"call_id": call_id, "name": name, "arguments": "", "started_at": _now()}
            self._tools[call_id] = entry
            self.data["tool_calls"].append(entry)
        entry.update(runner="bridge", status=status, output=_clip(output), duration_ms=duration_ms)

    def finish(self, reason: str, audio: dict, *, handoffs: int, reattaches: int) -> dict[str, Any]:
        d = self.data
        d.update(status="ended", ended_at=_now(), end_reason=reason, end_category=end_category(reason),
                 audio=audio, handoffs=handoffs, reattaches=reattaches)
        d["duration_s"] = round(d["ended_at"] - d["created_at"], 3)
        return d

    # -- internals ------------------------------------------------------------------

    def _say(self, role: str, item_id: Any, text: Any) -> None:
        if not isinstance(text, str) or not isinstance(item_id, str) or len(self.data["transcript"]) >= MAX_ENTRIES:
            return
        entry = self._transcripts.get((role, item_id))
        if entry is None:
            entry = {"role": role, "item_id": item_id, "text": "", "at": _now(), "truncated": False}
            cut = self._transcripts.pop(("cut", item_id), None)
            if cut is not None:
                entry["truncated"], entry["audio_end_ms"] = True, cut["audio_end_ms"]
            self._transcripts[(role, item_id)] = entry
            self.data["transcript"].append(entry)
        entry["text"] = _clip(text)


def _add_counts(into: dict, counts: dict) -> None:
    for key, value in counts.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            _add_counts(into.setdefault(key, {}), value)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, ended_at REAL, status TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS calls_created ON calls (created_at);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id TEXT PRIMARY KEY, call_id TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, claimed_until REAL NOT NULL DEFAULT 0,
    delivered_at REAL, last_error TEXT);
CREATE INDEX IF NOT EXISTS outbox_due ON webhook_outbox (delivered_at, next_attempt_at);
"""

_URL_SCHEMES = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


class StoreError(Exception):
    pass


def open_store(where: str) -> "RecordStore | PostgresStore":
    """The store `RECORDS_DB` names: a PostgreSQL URL (shared by several nodes), or an SQLite file."""
    if where.startswith(("postgres://", "postgresql://")):
        return PostgresStore(where)
    if _URL_SCHEMES.match(where):
        raise StoreError(f"{where.split(':', 1)[0]}:// is not a database this bridge knows: give an SQLite file path "
                         "or a postgresql:// URL")
    return RecordStore(where)


class RecordStore:
    """Records and the webhook outbox in one SQLite file (`RECORDS_DB`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: Optional[aiosqlite.Connection] = None

    async def open(self) -> None:
        Path(self.path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, timeout=10.0)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(_SCHEMA)
        await self._db.commit()

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("the record store is not open")
        return self._db

    async def save(self, record: dict[str, Any]) -> None:
        await self.db.execute(
            "INSERT INTO calls (id, created_at, ended_at, status, data) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET ended_at=excluded.ended_at, status=excluded.status, data=excluded.data",
            (record["id"], record["created_at"], record.get("ended_at"), record["status"], json.dumps(record)))
        await self.db.commit()

    async def get(self, call_id: str) -> Optional[dict[str, Any]]:
        async with self.db.execute("SELECT data FROM calls WHERE id = ?", (call_id,)) as cur:
            row = await cur.fetchone()
        return json.loads(row[0]) if row else None

    async def list(self, since: float, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Records created at or after `since` (oldest first), and whether more follow."""
        async with self.db.execute("SELECT data FROM calls WHERE created_at >= ? ORDER BY created_at, id LIMIT ?",
                                   (since, limit + 1)) as cur:
            rows = await cur.fetchall()
        return [json.loads(r[0]) for r in rows[:limit]], len(rows) > limit

    async def prune(self, before: float) -> int:
        """Forget ended records created before `before`, and the sent (or given-up) webhooks of
        calls no longer recorded; a webhook still to be sent stays."""
        cur = await self.db.execute("DELETE FROM calls WHERE created_at < ? AND status = 'ended'", (before,))
        await self.db.execute("DELETE FROM webhook_outbox WHERE call_id NOT IN (SELECT id FROM calls) AND "
                              "(delivered_at IS NOT NULL OR next_attempt_at = 9e999)")
        await self.db.commit()
        return cur.rowcount

    # -- webhook outbox -------------------------------------------------------------

    async def enqueue_webhook(self, message_id: str, call_id: str, payload: str) -> None:
        await self.db.execute("INSERT OR IGNORE INTO webhook_outbox (id, call_id, payload, created_at, next_attempt_at) "
                              "VALUES (?, ?, ?, ?, ?)", (message_id, call_id, payload, time.time(), time.time()))
        await self.db.commit()

    async def claim_webhooks(self, lease_s: float, limit: int = 20) -> list[tuple[str, str, int]]:
        """Due, undelivered messages (id, payload, attempts so far), leased to this process for
        `lease_s` so another worker or node does not send them at the same time."""
        now = time.time()
        async with self.db.execute(
                "UPDATE webhook_outbox SET claimed_until = ? WHERE id IN (SELECT id FROM webhook_outbox WHERE "
                "delivered_at IS NULL AND next_attempt_at <= ? AND claimed_until <= ? ORDER BY next_attempt_at "
                "LIMIT ?) RETURNING id, payload, attempts", (now + lease_s, now, now, limit)) as cur:
            rows = await cur.fetchall()
        await self.db.commit()
        return [(r[0], r[1], r[2]) for r in rows]

    async def webhook_delivered(self, message_id: str) -> None:
        await self.db.execute("UPDATE webhook_outbox SET delivered_at = ?, attempts = attempts + 1, last_error = NULL "
                              "WHERE id = ?", (time.time(), message_id))
        await self.db.commit()

    async def webhook_failed(self, message_id: str, error: str, retry_at: Optional[float]) -> None:
        """A failed attempt; `retry_at` None: given up (kept, with the error, never retried)."""
        await self.db.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, claimed_until = 0 "
            "WHERE id = ?", (error[:500], retry_at if retry_at is not None else float("inf"), message_id))
        await self.db.commit()

    async def webhook_status(self, call_id: str) -> list[dict[str, Any]]:
        async with self.db.execute("SELECT id, attempts, delivered_at, last_error, next_attempt_at FROM webhook_outbox "
                                   "WHERE call_id = ? ORDER BY created_at", (call_id,)) as cur:
            return [_delivery(r) for r in await cur.fetchall()]


def _delivery(row) -> dict[str, Any]:
    """A webhook attempt's state as a record shows it (a given-up one has no next attempt)."""
    return {"id": row[0], "attempts": row[1], "delivered_at": row[2], "last_error": row[3],
            "next_attempt_at": None if row[4] == float("inf") else row[4]}


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION, status TEXT NOT NULL,
    data JSONB NOT NULL);
CREATE INDEX IF NOT EXISTS calls_created ON calls (created_at);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id TEXT PRIMARY KEY, call_id TEXT NOT NULL, payload TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at DOUBLE PRECISION NOT NULL,
    claimed_until DOUBLE PRECISION NOT NULL DEFAULT 0, delivered_at DOUBLE PRECISION, last_error TEXT);
CREATE INDEX IF NOT EXISTS outbox_due ON webhook_outbox (next_attempt_at) WHERE delivered_at IS NULL;
"""


class PostgresStore:
    """The same store in PostgreSQL (asyncpg), for several nodes sharing one: every node
    finds every record, and a webhook is claimed by one node at a time (SKIP LOCKED)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = url.split("@")[-1]  # for messages: no password
        self._pool = None

    async def open(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4, command_timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"PostgreSQL at {self.path} refused: {type(exc).__name__}: {exc}") from None
        async with self._pool.acquire() as db:
            await db.execute("SELECT pg_advisory_lock(7301)")  # nodes starting together create the tables once
            try:
                await db.execute(_PG_SCHEMA)
            finally:
                await db.execute("SELECT pg_advisory_unlock(7301)")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self):
        if self._pool is None:
            raise StoreError("the record store is not open")
        return self._pool

    async def save(self, record: dict[str, Any]) -> None:
        await self.pool.execute(
            "INSERT INTO calls (id, created_at, ended_at, status, data) VALUES ($1, $2, $3, $4, $5::jsonb) "
            "ON CONFLICT (id) DO UPDATE SET ended_at = EXCLUDED.ended_at, status = EXCLUDED.status, data = EXCLUDED.data",
            record["id"], record["created_at"], record.get("ended_at"), record["status"], json.dumps(record))

    async def get(self, call_id: str) -> Optional[dict[str, Any]]:
        text = await self.pool.fetchval("SELECT data::text FROM calls WHERE id = $1", call_id)
        return json.loads(text) if text else None

    async def list(self, since: float, limit: int) -> tuple[list[dict[str, Any]], bool]:
        rows = await self.pool.fetch("SELECT data::text FROM calls WHERE created_at >= $1 ORDER BY created_at, id "
                                     "LIMIT $2", since, limit + 1)
        return [json.loads(r[0]) for r in rows[:limit]], len(rows) > limit

    async def prune(self, before: float) -> int:
        result = await self.pool.execute("DELETE FROM calls WHERE created_at < $1 AND status = 'ended'", before)
        await self.pool.execute("DELETE FROM webhook_outbox WHERE call_id NOT IN (SELECT id FROM calls) AND "
                                "(delivered_at IS NOT NULL OR next_attempt_at = 'Infinity'::float8)")
        return int(result.split()[-1])

    async def enqueue_webhook(self, message_id: str, call_id: str, payload: str) -> None:
        now = time.time()
        await self.pool.execute("INSERT INTO webhook_outbox (id, call_id, payload, created_at, next_attempt_at) "
                                "VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING", message_id, call_id, payload, now)

    async def claim_webhooks(self, lease_s: float, limit: int = 20) -> list[tuple[str, str, int]]:
        now = time.time()
        rows = await self.pool.fetch(
            "UPDATE webhook_outbox SET claimed_until = $1 WHERE id IN (SELECT id FROM webhook_outbox WHERE "
            "delivered_at IS NULL AND next_attempt_at <= $2 AND claimed_until <= $2 ORDER BY next_attempt_at "
            "LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING id, payload, attempts", now + lease_s, now, limit)
        return [(r[0], r[1], r[2]) for r in rows]

    async def webhook_delivered(self, message_id: str) -> None:
        await self.pool.execute("UPDATE webhook_outbox SET delivered_at = $1, attempts = attempts + 1, "
                                "last_error = NULL WHERE id = $2", time.time(), message_id)

    async def webhook_failed(self, message_id: str, error: str, retry_at: Optional[float]) -> None:
        await self.pool.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, "
            "claimed_until = 0 WHERE id = $3", error[:500], retry_at if retry_at is not None else float("inf"),
            message_id)

    async def webhook_status(self, call_id: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT id, attempts, delivered_at, last_error, next_attempt_at FROM "
                                     "webhook_outbox WHERE call_id = $1 ORDER BY created_at", call_id)
        return [_delivery(r) for r in rows]
