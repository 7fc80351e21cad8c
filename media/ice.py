"""ICE for real networks: a UDP port range, a 1:1 NAT address, the interfaces to gather on.

aioice (0.13) binds each host candidate to a random port of every interface and has
no setting for any of this, so a firewall rule or a Kubernetes `hostPort` range
cannot be written for the bridge. This module adds three things to the
gathering aioice does, without copying it:

- `ports` (`--rtc-port-range 40000-40999`): host candidates are bound to a free port
  of the range. aioice's ICE module asks `asyncio.get_running_loop()` for the loop
  it binds on; that module alone is given a stand-in `asyncio` whose loop binds
  `(address, 0)` to a port of the range instead (everything else passes through).
  A range with no free port raises `PortsExhausted` (the offer gets a 503).
- `public_ips` (`--public-ip`): a server behind a 1:1 NAT (a cloud VM's elastic
  address, LiveKit's `node_ip`) also advertises each host candidate's port on the
  public address, as a server-reflexive candidate: what a STUN server would have
  found, without one.
- `interfaces` (`--rtc-interfaces eth0,10.0.0.0/8`): only addresses of those
  interfaces (by name, address or network) become candidates.

The policy applies only where it is set (a context variable, set by the call
around its own SDP work): other aioice users in the process (the tests' callers)
are untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import ipaddress
import itertools
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import aioice.ice
import ifaddr
from aioice.candidate import Candidate, candidate_foundation, candidate_priority

from media import ice_mdns


class PortsExhausted(OSError):
    pass


@dataclass(frozen=True)
class IcePolicy:
    ports: Optional[tuple[int, int]] = None  # inclusive
    public_ips: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ports or self.public_ips or self.interfaces)

    def allows(self, address: str) -> bool:
        if not self.interfaces:
            return True
        ip = ipaddress.ip_address(address.split("%")[0])
        for entry in self.interfaces:
            if "/" in entry:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            elif _is_address(entry):
                if ip == ipaddress.ip_address(entry):
                    return True
            elif address in _interface_addresses(entry):
                return True
        return False


def parse_port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError("must be two port numbers, like 40000-40999") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError("must be ports from 1024 to 65535, the lower first")
    return lo, hi


def check_interfaces(entries: tuple[str, ...]) -> None:
    names = {a.nice_name for a in ifaddr.get_adapters()} | {a.name for a in ifaddr.get_adapters()}
    for entry in entries:
        if "/" in entry:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not a network (like 10.0.0.0/8)") from None
        elif not _is_address(entry) and entry not in names:
            raise ValueError(f"{entry!r} is neither an address, a network nor an interface here "
                             f"({', '.join(sorted(names))})")


_policy: contextvars.ContextVar[Optional[IcePolicy]] = contextvars.ContextVar("ice_policy", default=None)
_next_port = itertools.count()


@contextmanager
def applied(policy: Optional[IcePolicy]) -> Iterator[None]:
    """Gather with `policy` in this block (and in the tasks it starts)."""
    token = _policy.set(policy if policy else None)
    try:
        yield
    finally:
        _policy.reset(token)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _interface_addresses(name: str) -> set[str]:
    out: set[str] = set()
    for adapter in ifaddr.get_adapters():
        if name in (adapter.nice_name, adapter.name):
            for ip in adapter.ips:
                out.add(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return out


# -- what aioice is given ---------------------------------------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses
_original_get_component_candidates = aioice.ice.Connection.get_component_candidates


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _original_get_host_addresses(use_ipv4, use_ipv6)
    policy = _policy.get()
    return [a for a in addresses if policy.allows(a)] if policy else addresses


async def _get_component_candidates(self, component: int, addresses: list[str], timeout: int = 5) -> list[Candidate]:
    candidates = await _original_get_component_candidates(self, component, addresses, timeout)
    policy = _policy.get()
    if not policy:
        return candidates
    hosts = [c for c in candidates if c.type == "host"]
    if policy.ports and addresses and not hosts:
        raise PortsExhausted(errno.EADDRINUSE, f"no free UDP port in {policy.ports[0]}-{policy.ports[1]}")
    for public in policy.public_ips:
        family = ipaddress.ip_address(public).version
        for host in hosts:
            if ipaddress.ip_address(host.host.split("%")[0]).version == family and host.host != public:
                candidates.append(Candidate(
                    foundation=candidate_foundation("srflx", "udp", host.host), component=component,
                    transport="udp", priority=candidate_priority(component, "srflx"), host=public, port=host.port,
                    type="srflx", related_address=host.host, related_port=host.port))
    return candidates


class _Loop:
    """The running loop, but `create_datagram_endpoint(local_addr=(a, 0))` binds in the range."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ports: tuple[int, int]) -> None:
        self._loop, self._ports = loop, ports

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def create_datagram_endpoint(self, factory, local_addr=None, **kwargs):
        if local_addr is None or local_addr[1] != 0:
            return await self._loop.create_datagram_endpoint(factory, local_addr=local_addr, **kwargs)
        address = local_addr[0]
        lo, hi = self._ports
        size = hi - lo + 1
        start = next(_next_port) % size  # spread over the range: a port just freed is not taken again at once
        for i in range(size):
            port = lo + (start + i) % size
            try:
                transport, protocol = await self._loop.create_datagram_endpoint(
                    factory, local_addr=(address, port), **kwargs)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return transport, protocol
        raise PortsExhausted(errno.EADDRINUSE, f"no free UDP port in {lo}-{hi} on {address}")


def _get_running_loop() -> Any:
    loop = asyncio.get_running_loop()
    policy = _policy.get()
    return _Loop(loop, policy.ports) if policy and policy.ports else loop


_asyncio_for_aioice = types.ModuleType("asyncio_for_aioice")
_asyncio_for_aioice.__dict__.update(asyncio.__dict__)
_asyncio_for_aioice.get_running_loop = _get_running_loop  # type: ignore[attr-defined]

_installed = False


def install() -> None:
    """Give aioice's ICE module the policy-aware parts (once per process)."""
    global _installed
    if _installed:
        return
    aioice.ice.get_host_addresses = _get_host_addresses
    aioice.ice.Connection.get_component_candidates = _get_component_candidates
    aioice.ice.asyncio = _asyncio_for_aioice
    ice_mdns.install()  # browsers whose candidates are all mDNS names connect peer-reflexively
    _installed = True
