"""One node's part in a cluster: its registry entry, its calls' entries, shared call slots.

Redis holds (every key under `bridge:`):

    node:{id}     JSON {id, url, active, cpu, lag_p95, overload, draining, max_calls}, with a TTL
                  (NODE_TTL_S) the node refreshes every HEARTBEAT_S: a node that dies vanishes
    nodes         set of node ids (entries whose node key is gone are dropped when read)
    call:{id}     the node holding a live call, refreshed with the heartbeat (same TTL): the
                  calls of a dead node vanish with it, and their ids answer 404 at once
    record:{id}   the node whose record store has an ended call (RECORD_TTL_S)
    slots         hash node id → calls it holds; a Lua script takes a slot only while the
                  live nodes' sum is below MAX_CALLS (one atomic check for the whole cluster),
                  dropping the fields of nodes that are gone

Any node accepts any request. A new offer is placed on the least-loaded node that
is neither draining nor overloaded (`placement`); the node that received it
forwards it there and relays the answer, so a client sees one address. Every later
request for a call (hangup, reconnect, its record, the sideband) is forwarded to
the node that holds it. Nodes talk to each other over HTTP at their NODE_URL, with
an HMAC of CLUSTER_SECRET in `X-Bridge-Cluster` (requests without it are never
treated as another node's).

Redis is the engine (the issue asked for an existing one, not a home-made protocol);
this module is the handful of keys the bridge keeps in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import redis.asyncio as redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

PREFIX = "bridge:"
HEARTBEAT_S = 1.0
NODE_TTL_S = 5
RECORD_TTL_S = 7 * 24 * 3600
CLUSTER_HEADER = "X-Bridge-Cluster"
NODE_HEADER = "X-Bridge-Node"

# KEYS[1] slots hash, KEYS[2] node key prefix; ARGV[1] this node, ARGV[2] the limit
_TAKE = """
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if redis.call('EXISTS', KEYS[2] .. fields[i]) == 1 or fields[i] == ARGV[1] then
    total = total + tonumber(fields[i + 1])
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
if total >= tonumber(ARGV[2]) then return -1 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return total + 1
"""
_GIVE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
return n
"""


@dataclass
class NodeInfo:
    id: str
    url: str
    active: int = 0
    cpu: float = 0.0
    lag_p95: float = 0.0
    overload: Optional[str] = None
    draining: bool = False
    at: float = 0.0  # when it said so (Unix time)

    @classmethod
    def from_json(cls, text: str) -> "NodeInfo":
        d = json.loads(text)
        return cls(d["id"], d["url"], int(d.get("active", 0)), float(d.get("cpu", 0.0)),
                   float(d.get("lag_p95", 0.0)), d.get("overload"), bool(d.get("draining")), float(d.get("at", 0.0)))


def cluster_token(secret: str) -> str:
    """What a node presents to another: an HMAC of the shared secret (the secret itself
    never travels)."""
    return hmac.new(secret.encode(), b"bridge-cluster-v1", hashlib.sha256).hexdigest()


class ClusterNode:
    def __init__(self, url: str, node_id: str, node_url: str, secret: str, max_calls: int,
                 load: Callable[[], dict[str, Any]]) -> None:
        self.redis = redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.id = node_id
        self.url = node_url.rstrip("/")
        self.token = cluster_token(secret)
        self.max_calls = max_calls
        self._load = load  # {active, cpu, lag_p95, overload, calls: [ids]}
        self.draining = False
        self._task: Optional[asyncio.Task] = None
        self._take = self.redis.register_script(_TAKE)
        self._give = self.redis.register_script(_GIVE)
        self.healthy = False
        self._placed: list[tuple[float, str]] = []

    def trusted(self, presented: Optional[str]) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    # -- lifetime -------------------------------------------------------------------

    async def start(self) -> None:
        await self.redis.hset(PREFIX + "slots", self.id, 0)  # a restarted node holds no calls
        await self._beat()
        self._task = asyncio.get_running_loop().create_task(self._heartbeat(), name="cluster-heartbeat")
        logger.info("cluster: node %s registered at %s", self.id, self.url)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            pipe = self.redis.pipeline()
            pipe.delete(PREFIX + "node:" + self.id)
            pipe.srem(PREFIX + "nodes", self.id)
            pipe.hdel(PREFIX + "slots", self.id)
            await pipe.execute()
        except RedisError as exc:
            logger.warning("cluster: could not deregister: %s", exc)
        await self.redis.aclose()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._beat()
            try:
                await self.nodes()  # drops the ids of nodes that are gone from the set
            except (RedisError, OSError):
                pass  # _beat has said Redis is unreachable

    def me(self, draining: bool) -> NodeInfo:
        """This node as the registry will see it, measured now (not at the last heartbeat), by the
        same measures as every other node's entry: placement compares like with like."""
        load = self._load()
        return NodeInfo(self.id, self.url, active=load["active"], cpu=load["cpu"], lag_p95=load["lag_p95"],
                        overload=load["overload"], draining=draining, at=time.time())

    async def beat_now(self) -> None:
        """Publish the node's state at once (draining must not wait a heartbeat)."""
        await self._beat()

    async def _beat(self) -> None:
        load = self._load()
        info = {"id": self.id, "url": self.url, "active": load["active"], "cpu": round(load["cpu"], 3),
                "lag_p95": load["lag_p95"], "overload": load["overload"], "draining": self.draining,
                "max_calls": self.max_calls, "at": time.time()}
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(PREFIX + "node:" + self.id, json.dumps(info), ex=NODE_TTL_S)
            pipe.sadd(PREFIX + "nodes", self.id)
            for call_id in load["calls"]:
                pipe.set(PREFIX + "call:" + call_id, self.id, ex=NODE_TTL_S)
            await pipe.execute()
            if not self.healthy:
                logger.info("cluster: Redis reachable")
            self.healthy = True
        except (RedisError, OSError) as exc:
            if self.healthy:
                logger.warning("cluster: Redis unreachable: %s", exc)
            self.healthy = False

    # -- the registry ---------------------------------------------------------------

    async def nodes(self) -> list[NodeInfo]:
        ids = sorted(m.decode() for m in await self.redis.smembers(PREFIX + "nodes"))
        if not ids:
            return []
        values = await self.redis.mget([PREFIX + "node:" + i for i in ids])
        out, gone = [], []
        for node_id, value in zip(ids, values):
            if value is None:
                gone.append(node_id)
            else:
                out.append(NodeInfo.from_json(value))
        if gone:
            await self.redis.srem(PREFIX + "nodes", *gone)
        return out

    def placement(self, nodes: list[NodeInfo], me: NodeInfo) -> list[NodeInfo]:
        """Nodes to try for a new call, best first: not draining, not overloaded, fewest
        calls, then least CPU (ties broken at random, so equal nodes share the load)."""
        by_id = {n.id: n for n in nodes}
        by_id[me.id] = me  # this node's own view is fresher than its last heartbeat
        now = time.time()
        self._placed = [(t, n) for t, n in self._placed if now - t < NODE_TTL_S]
        # calls this node placed since a node's last heartbeat are not in its count yet
        pending = {n.id: sum(1 for t, i in self._placed if i == n.id and t > n.at) for n in by_id.values()}
        ready = [n for n in by_id.values() if not n.draining and not n.overload]
        random.shuffle(ready)
        return sorted(ready, key=lambda n: (n.active + (pending[n.id] if n.id != me.id else 0), round(n.cpu, 1)))

    def placed(self, node_id: str) -> None:
        """An offer was placed on `node_id` (counted there until its heartbeat says so)."""
        self._placed.append((time.time(), node_id))

    async def take_slot(self) -> bool:
        """One of the cluster's MAX_CALLS for a call on this node (atomic across nodes)."""
        n = await self._take(keys=[PREFIX + "slots", PREFIX + "node:"], args=[self.id, self.max_calls])
        return int(n) >= 0

    async def give_slot(self) -> None:
        await self._give(keys=[PREFIX + "slots"], args=[self.id])

    async def call_started(self, call_id: str) -> None:
        """A call made here: its entry and this node's count, published at once (a heartbeat
        can be a second old, and other nodes place offers by it); `_beat` writes both."""
        await self._beat()

    async def call_ended(self, call_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(PREFIX + "call:" + call_id)
        pipe.set(PREFIX + "record:" + call_id, self.id, ex=RECORD_TTL_S)
        await pipe.execute()
        await self._beat()

    async def owner(self, call_id: str, *, ended: bool = False) -> Optional[NodeInfo]:
        """The live node holding a call (or, `ended`, whose store has its record); None if
        none does (its node is gone, or the call never was)."""
        node_id = await self.redis.get(PREFIX + ("record:" if ended else "call:") + call_id)
        if node_id is None:
            return None
        value = await self.redis.get(PREFIX + "node:" + node_id.decode())
        return NodeInfo.from_json(value) if value is not None else None
