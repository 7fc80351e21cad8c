"""ICE for real networks: the server's candidates in a UDP port range, a 1:1 NAT address
advertised, the interfaces chosen; real aiortc callers, real calls."""

from __future__ import annotations

import asyncio

import pytest

import settings as config
from tests.conftest import eventually


def _candidates(sdp: str) -> list[dict]:
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            out.append({"host": parts[4], "port": int(parts[5]), "type": parts[7]})
    return out


async def test_every_server_candidate_uses_a_port_in_the_range_and_calls_connect(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, rtc_port_range="20100-20104")
    callers = []
    for _ in range(3):
        caller = new_caller(bridge.url)
        caller.source.freq = 440
        await caller.connect()
        callers.append(caller)
        candidates = _candidates(caller.pc.remoteDescription.sdp)
        assert candidates and all(20100 <= c["port"] <= 20104 for c in candidates), candidates
    for caller in callers:
        await asyncio.wait_for(caller.channel_open.wait(), 10)
    await eventually(lambda: len(stub.sessions) == 3 and all(len(s.audio) > 9600 for s in stub.sessions), 10,
                     "audio from every caller")
    # the ports of different calls differ (one per call and address)
    ports = [{c["port"] for c in _candidates(c.pc.remoteDescription.sdp)} for c in callers]
    assert not (ports[0] & ports[1]) and not (ports[1] & ports[2])


async def test_a_full_port_range_refuses_the_offer_with_503_and_frees_ports_when_calls_end(stub, start_bridge,
                                                                                         new_caller):
    bridge = await start_bridge(stub.url, rtc_port_range="20110-20110")
    first = new_caller(bridge.url)
    await first.connect()
    second = new_caller(bridge.url)
    with pytest.raises(RuntimeError, match="503.*rtc_ports_exhausted"):
        await second.connect()
    assert await first.hangup() == 200
    await bridge.wait_no_calls()
    third = new_caller(bridge.url)
    await third.connect()  # the port came back
    assert {c["port"] for c in _candidates(third.pc.remoteDescription.sdp)} == {20110}


async def test_a_public_ip_is_advertised_with_each_host_candidate_s_port(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url, public_ip="203.0.113.7", rtc_interfaces="192.0.2.0/24,127.0.0.1")
    caller = new_caller(bridge.url)
    await caller.connect()
    candidates = _candidates(caller.pc.remoteDescription.sdp)
    hosts = [c for c in candidates if c["type"] == "host"]
    public = [c for c in candidates if c["host"] == "203.0.113.7"]
    assert {c["host"] for c in hosts} <= {"192.0.2.2", "127.0.0.1"} and hosts
    assert public and all(c["type"] == "srflx" for c in public)
    assert {c["port"] for c in public} <= {c["port"] for c in hosts}
    await asyncio.wait_for(caller.channel_open.wait(), 10)  # still connects (on the host candidate)


@pytest.mark.parametrize("raw, message", [
    ({"rtc_port_range": "5000-4000"}, "RTC_PORT_RANGE"),
    ({"rtc_port_range": "80-90"}, "from 1024"),
    ({"rtc_interfaces": "nope0"}, "neither an address"),
    ({"public_ip": "my.host"}, "not an IP address"),
])
def test_bad_ice_settings_stop_start_up_with_one_line(raw, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_raw(raw)


def _hide_addresses(sdp: str) -> str:
    """What Firefox (by default) and Chromium (before a media permission) offer: every host
    candidate named by an mDNS `<uuid>.local` name the server cannot resolve."""
    import re
    import uuid

    names: dict[str, str] = {}
    return re.sub(r"^(a=candidate:\S+ \d+ \S+ \d+ )(\S+)", lambda m: m.group(1) + names.setdefault(
        m.group(2), f"{uuid.uuid4()}.local"), sdp, flags=re.M)


async def test_a_caller_whose_candidates_are_all_mdns_names_connects_peer_reflexively(stub, start_bridge, new_caller):
    bridge = await start_bridge(stub.url)
    caller = new_caller(bridge.url)
    caller.source.freq = 440
    await caller.connect(offer_filter=_hide_addresses)
    answer = _candidates(caller.pc.remoteDescription.sdp)
    assert answer and all(not c["host"].endswith(".local") for c in answer)  # somewhere to send checks to
    await asyncio.wait_for(caller.channel_open.wait(), 10)
    await eventually(lambda: stub.sessions and len(stub.sessions[0].audio) > 9600, 10, "the caller's audio upstream")
    call = next(iter(bridge.registry.calls.values()))
    remote = call.pc.getTransceivers()[0].receiver.transport.transport.getRemoteCandidates()
    assert [c.type for c in remote] == ["prflx"]  # learned from the caller's own checks
    assert await caller.hangup() == 200
    await bridge.wait_no_calls()
