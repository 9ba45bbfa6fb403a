"""A small IPv4 host for the guest net driver: ARP, ICMP echo, UDP.

Enough for ping and throughput workloads against the responder gateway or
another guest: it answers ARP for its own address and pings to it, resolves
peers with ARP, and sends/receives UDP datagrams on bound ports.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional

from simvirt.drivers.net import VirtioNetDriver
from simvirt.net import packets as pk

ARP_REQUEST, ARP_REPLY = 1, 2
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8


class GuestStack:
    def __init__(self, driver: VirtioNetDriver, ip: str = "10.0.2.15") -> None:
        self.drv = driver
        self.ip = pk.ip_bytes(ip)
        self.arp: dict[bytes, bytes] = {}
        self._arp_wait: dict[bytes, list[asyncio.Future]] = {}
        self._pings: dict[tuple[int, int], asyncio.Future] = {}
        self.udp_handlers: dict[int, Callable[[bytes, int, bytes], None]] = {}
        self.counters: dict[str, int] = {}
        self._ident = 0x5356
        driver.on_frame = self.receive

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1

    # -- input ------------------------------------------------------------
    def receive(self, frame: bytes) -> None:
        if (len(frame) >= 42 and frame[23] == pk.IPPROTO_ICMP and frame[34] == ICMP_ECHO_REPLY
                and frame[12:14] == b"\x08\x00" and frame[14] == 0x45 and frame[30:34] == self.ip):
            # An echo reply for a ping in flight, found by offsets (no options): the
            # latency path.  Anything else, or no matching ping, takes the full parse.
            fut = self._pings.pop((int.from_bytes(frame[38:40], "big"), int.from_bytes(frame[40:42], "big")), None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(time.perf_counter_ns())
                return
        try:
            info = pk.parse_frame(frame)
        except ValueError:
            self._count("rx_malformed")
            return
        eth = info.eth
        if eth.ethertype == pk.ETH_P_ARP:
            self._arp_in(frame, info)
        elif isinstance(info.ip, pk.IPv4) and info.ip.dst == self.ip:
            if info.l4_proto == pk.IPPROTO_ICMP:
                self._icmp_in(frame, info)
            elif info.l4_proto == pk.IPPROTO_UDP:
                u = pk.parse_udp(frame, info.l4_offset)
                handler = self.udp_handlers.get(u.dport)
                payload = frame[info.l4_offset + 8:info.l4_offset + u.length]
                if handler is None:
                    self._count("udp_no_listener")
                else:
                    handler(info.ip.src, u.sport, payload)
            else:
                self._count("rx_unhandled_proto")
        else:
            self._count("rx_not_for_us")

    def _arp_in(self, frame: bytes, info: pk.FrameInfo) -> None:
        a = pk.parse_arp(frame, info.l3_offset)
        self.arp[bytes(a.spa)] = bytes(a.sha)
        for fut in self._arp_wait.pop(bytes(a.spa), []):
            if not fut.done():
                fut.set_result(bytes(a.sha))
        if a.op == ARP_REQUEST and bytes(a.tpa) == self.ip:
            self.drv.try_send(pk.pad_frame(pk.arp_frame(ARP_REPLY, self.drv.mac, self.ip, bytes(a.sha), bytes(a.spa))))

    def _icmp_in(self, frame: bytes, info: pk.FrameInfo) -> None:
        e = pk.parse_icmp_echo(frame, info.l4_offset)
        payload = frame[info.l4_offset + 8:info.l3_end]
        if e.type == ICMP_ECHO_REPLY:
            fut = self._pings.pop((e.ident, e.seq), None)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter_ns())
        elif e.type == ICMP_ECHO_REQUEST:
            assert isinstance(info.ip, pk.IPv4)
            self.drv.try_send(pk.icmp_echo_frame(self.drv.mac, bytes(info.eth.src), self.ip, bytes(info.ip.src),
                                                 ICMP_ECHO_REPLY, e.ident, e.seq, payload))

    # -- output -----------------------------------------------------------
    async def resolve(self, ip: bytes, timeout: float = 2.0, retries: int = 3) -> bytes:
        if ip in self.arp:
            return self.arp[ip]
        loop = asyncio.get_running_loop()
        for _ in range(retries):
            fut = loop.create_future()
            self._arp_wait.setdefault(ip, []).append(fut)
            await self.drv.send(pk.pad_frame(pk.arp_frame(ARP_REQUEST, self.drv.mac, self.ip, bytes(6), ip)))
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                continue
        raise TimeoutError(f"no ARP reply from {pk.ip_str(ip)}")

    async def ping(self, ip: bytes, seq: int, payload: bytes = b"simvirt-ping" * 4, timeout: float = 2.0,
                   busy_poll_us: float = 0.0) -> Optional[int]:
        """One echo request; round-trip time in ns, or None if lost.

        ``busy_poll_us`` > 0 spins on the receive ring that long for the reply
        (see :meth:`VirtioNetDriver.busy_poll_rx`) before falling back to the
        interrupt.
        """
        mac = await self.resolve(ip)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        key = (self._ident, seq & 0xFFFF)
        self._pings[key] = fut
        frame = pk.icmp_echo_frame(self.drv.mac, mac, self.ip, ip, ICMP_ECHO_REQUEST, self._ident, seq & 0xFFFF, payload)
        drv = self.drv
        if busy_poll_us > 0:
            drv.quiet_rx()
        t0 = time.perf_counter_ns()
        if not drv.try_send(frame):
            await drv.send(frame)
        if busy_poll_us > 0:
            budget = int(busy_poll_us * 1000)
            deadline = t0 + budget
            try:
                while not fut.done() and time.perf_counter_ns() < deadline:
                    drv.busy_poll_rx(budget)
            finally:
                drv.end_busy_poll()
        try:
            t1 = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pings.pop(key, None)
            return None
        return t1 - t0

    async def udp_send(self, ip: bytes, dport: int, sport: int, payload: bytes) -> None:
        mac = await self.resolve(ip)
        await self.drv.send(pk.udp_frame(self.drv.mac, mac, self.ip, ip, sport, dport, payload))
