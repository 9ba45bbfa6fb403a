"""The decision core of an L2 learning switch, sans-IO.

Ports are plain ints (a device process, a responder, a pcap tap...); the
caller moves the bytes.  Behaviour follows a transparent bridge (IEEE
802.1D, Linux ``br_forward``): learn the source MAC on the ingress port,
send known unicast to its port, flood unknown unicast, broadcast and
multicast to every other port, and never send a frame back where it came
from -- including unicast whose destination was learned on the ingress
port, which is filtered (both ends already share that segment).

Aging is optional and clock-free: pass ``now`` (any monotonic seconds) to
:meth:`L2Switch.forward`/:meth:`L2Switch.learn` and call :meth:`L2Switch.age`;
with ``max_age=None`` entries live until their port is removed.  A group
(multicast) source address is never learned: it is invalid as a source
and would otherwise hijack a group's traffic.
"""
from __future__ import annotations

from collections import Counter
from typing import Union

Buffer = Union[bytes, bytearray, memoryview]

ETH_ALEN = 6
MIN_FRAME = 14


class L2Switch:
    def __init__(self, ports: tuple[int, ...] | list[int] = (), *, max_age: float | None = 300.0) -> None:
        self.ports: set[int] = set(ports)
        self.max_age = max_age
        self.fdb: dict[bytes, tuple[int, float]] = {}  # mac -> (port, last seen)
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------- ports
    def add_port(self, port: int) -> None:
        self.ports.add(port)

    def remove_port(self, port: int) -> None:
        """Forget the port and every address learned on it."""
        self.ports.discard(port)
        for mac in [m for m, (p, _) in self.fdb.items() if p == port]:
            del self.fdb[mac]

    # ---------------------------------------------------------- learning
    def learn(self, port: int, src_mac: Buffer, now: float = 0.0) -> bool:
        """Record that ``src_mac`` lives behind ``port``; True if that is new or a move."""
        if port not in self.ports:
            raise KeyError(f"unknown port {port}")
        if src_mac[0] & 1:
            self.counters["bad_src_mac"] += 1
            return False
        mac = bytes(src_mac)
        old = self.fdb.get(mac)
        self.fdb[mac] = (port, now)
        if old is None:
            self.counters["learned"] += 1
            return True
        if old[0] != port:
            self.counters["moved"] += 1
            return True
        return False

    def lookup(self, mac: Buffer, now: float | None = None) -> int | None:
        """Port for ``mac``, or None if unknown (or expired when ``now`` is given)."""
        entry = self.fdb.get(bytes(mac))
        if entry is None:
            return None
        port, seen = entry
        if now is not None and self.max_age is not None and now - seen > self.max_age:
            return None
        return port

    def age(self, now: float) -> int:
        """Drop entries idle for more than ``max_age``; return how many."""
        if self.max_age is None:
            return 0
        limit = now - self.max_age
        stale = [m for m, (_, seen) in self.fdb.items() if seen < limit]
        for mac in stale:
            del self.fdb[mac]
        self.counters["aged"] += len(stale)
        return len(stale)

    # -------------------------------------------------------- forwarding
    def forward(self, in_port: int, frame: Buffer, now: float = 0.0) -> list[int]:
        """Learn from ``frame`` and return the ports it must go out of (sorted)."""
        if in_port not in self.ports:
            raise KeyError(f"unknown port {in_port}")
        if len(frame) < MIN_FRAME:
            self.counters["runt"] += 1
            return []
        dst = bytes(frame[:ETH_ALEN])
        self.learn(in_port, frame[ETH_ALEN : 2 * ETH_ALEN], now)
        if dst[0] & 1:  # broadcast or multicast
            self.counters["flooded"] += 1
            return sorted(self.ports - {in_port})
        out = self.lookup(dst, now)
        if out is None or out not in self.ports:
            self.counters["flooded"] += 1
            return sorted(self.ports - {in_port})
        if out == in_port:
            self.counters["filtered"] += 1
            return []
        self.counters["forwarded"] += 1
        return [out]
