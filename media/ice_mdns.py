"""Browsers that hide their addresses behind mDNS names (`<uuid>.local` host candidates).

Firefox does this by default, and Chromium and Safari do it whenever the page has no
camera or microphone permission yet. A server is almost never on the browser's link, so it
cannot resolve those names; the call can only work on the peer-reflexive path: the
browser's own connectivity checks arrive from its real address and teach it to us
(RFC 8445 §7.3.1.3, RFC 8838 §11). aioice 0.13 has that path, but three things keep a call
from reaching it when every remote candidate is an mDNS name:

1. *No local candidates at all.* When end-of-candidates arrives and no remote candidate
   was usable, aioice prunes every component (`_prune_components`), and the gathering that
   follows iterates the components: our answer then carries no candidate, so the browser
   has nowhere to send its checks ("ICE failed, add a STUN server"). A component is
   pruned here only when another component has candidates (what the pruning is for).
2. *Failure before the first check.* `connect()` with an empty check list reports failure
   at once; with only mDNS names the check list stays empty until the browser's first
   check arrives, which is after it has read our answer. `connect()` here waits for that
   first check (or a late-resolved candidate) for up to `PRFLX_WAIT_S`.
3. *A second lost to resolution.* aiortc awaits each remote candidate while applying the
   offer, and an mDNS query nobody answers takes aioice's full 1 s timeout: a second added to
   every such call's set-up before the answer is even sent. The resolution runs in the
   background here; a name that does resolve is paired when it does (aioice's trickle
   bookkeeping, `_remote_candidates_resolving`, keeps failure from being declared meanwhile).

Only aioice's `Connection` methods are wrapped; the fallbacks call aioice's own code.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Optional

import aioice.ice
from aioice import mdns
from aioice.candidate import Candidate

logger = logging.getLogger(__name__)

#: How long `connect()` waits for the browser's first check when nothing can be paired yet.
#: The call's own set-up watchdog (15 s) ends a call that never connects before this does.
PRFLX_WAIT_S = 20.0

Connection = aioice.ice.Connection
_original_add_remote_candidate = Connection.add_remote_candidate
_original_prune_components = Connection._prune_components
_original_connect = Connection.connect
_original_close = Connection.close
_installed = False


async def _add_remote_candidate(self: Connection, remote_candidate: Optional[Candidate]) -> None:
    if (remote_candidate is None or not mdns.is_mdns_hostname(remote_candidate.host)
            or self._remote_candidates_end or self._closing
            or self._transport_policy == aioice.ice.TransportPolicy.RELAY):
        return await _original_add_remote_candidate(self, remote_candidate)
    # Counted before returning, so an end-of-candidates right after waits for it.
    self._remote_candidates_resolving += 1
    task = asyncio.ensure_future(_resolve(self, copy.copy(remote_candidate)))
    tasks = self.__dict__.setdefault("_mdns_tasks", set())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def _resolve(self: Connection, remote_candidate: Candidate) -> None:
    try:
        protocol = await aioice.ice.get_or_create_mdns_protocol(self)
        address = await protocol.resolve(remote_candidate.host)
        if address is None:
            logger.debug("ICE: mDNS candidate %s not resolved: waiting for the browser's checks",
                         remote_candidate.host)
        elif not self._closing:
            self._add_remote_candidate(remote_candidate, address)
    except Exception as exc:  # a resolver failure must not end the call: checks may still come
        logger.debug("ICE: mDNS resolution of %s failed: %s", remote_candidate.host, exc)
    finally:
        self._remote_candidates_resolving -= 1
        if self._remote_candidates_end and not self._remote_candidates_resolving and not self._closing:
            self._end_remote_candidates()


def _prune_components(self: Connection) -> None:
    if not self._remote_candidates:
        return  # nothing usable signalled: every component waits for peer-reflexive candidates
    _original_prune_components(self)


async def _connect(self: Connection) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PRFLX_WAIT_S
    while (not self._remote_candidates and not self._early_checks and not self._closing
           and loop.time() < deadline):
        await asyncio.sleep(0.02)
    await _original_connect(self)


async def _close(self: Connection) -> None:
    for task in list(self.__dict__.get("_mdns_tasks", ())):
        task.cancel()
    await _original_close(self)


def install() -> None:
    global _installed
    if _installed:
        return
    Connection.add_remote_candidate = _add_remote_candidate
    Connection._prune_components = _prune_components
    Connection.connect = _connect
    Connection.close = _close
    _installed = True
