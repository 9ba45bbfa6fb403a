"""VirtioNetDriver (in process, asyncio) against a ``simvirt device net`` child: notification economy.

Transmit completions are reclaimed on send, so transmitting costs the device
no interrupt; a sender that finds the ring full turns them on until a slot
frees; a busy-polled ping keeps the receive interrupt off.
"""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from simvirt.bench.procs import DeviceProcess
from simvirt.drivers.net import VirtioNetDriver
from simvirt.drivers.netstack import GuestStack
from simvirt.drivers.transport import VhostUserTransport
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.net import packets as pk

GW = pk.ip_bytes("10.0.2.2")
RAM = 32 << 20


@pytest.fixture
def device():
    d = DeviceProcess("net", [])
    d.wait_ready()
    yield d
    if d.proc.poll() is None:
        os.kill(d.proc.pid, signal.SIGCONT)
    d.stop()


def run(coro, timeout: float = 30):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


async def _guest(sock: str) -> tuple[GuestStack, GuestMemory]:
    mem = GuestMemory.create_shared(RAM)
    drv = VirtioNetDriver(VhostUserTransport(sock, mem, PageAllocator(0, RAM), device_label="net0"))
    drv.probe(asyncio.get_running_loop())
    stack = GuestStack(drv)
    await stack.resolve(GW)
    return stack, mem


async def _settle(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_transmitting_costs_no_interrupt_and_every_frame_arrives(device):
    """600 UDP echoes through a 128-slot transmit ring: all answered, at most one tx interrupt.

    The device's first notification always fires (it has no earlier used
    index to compare with); after that, used_event stays behind.
    """
    async def go():
        stack, mem = await _guest(device.socket_path)
        drv = stack.drv
        try:
            got = []
            stack.udp_handlers[40000] = lambda src, sport, payload: got.append(payload)
            mac = stack.arp[GW]
            sent = 0
            while sent < 600:
                frame = pk.udp_frame(drv.mac, mac, stack.ip, GW, 40000, 7, sent.to_bytes(4, "big"))
                if drv.try_send(frame):
                    sent += 1
                else:
                    await asyncio.sleep(0.001)  # the ring is full: the device is still draining
            await _settle(lambda: len(got) == 600)
            assert sorted(int.from_bytes(p[:4], "big") for p in got) == list(range(600))
            assert drv.tx is not None and drv.tx.interrupts <= 1
        finally:
            drv.close()
            mem.close()
    run(go())


def test_a_sender_waiting_for_a_slot_is_woken_by_the_interrupt(device):
    async def go():
        stack, mem = await _guest(device.socket_path)
        drv = stack.drv
        try:
            mac = stack.arp[GW]
            frame = pk.udp_frame(drv.mac, mac, stack.ip, GW, 40000, 9, b"x" * 64)
            os.kill(device.proc.pid, signal.SIGSTOP)
            n = 0
            while drv.try_send(frame):
                n += 1
            assert n == len(drv.tx_slots)
            waiter = asyncio.ensure_future(drv.send(frame))
            await asyncio.sleep(0.3)
            assert not waiter.done(), "send() returned while every slot was in flight"
            before = drv.tx.interrupts
            os.kill(device.proc.pid, signal.SIGCONT)
            await asyncio.wait_for(waiter, 5)
            assert drv.tx.interrupts > before  # woken by the interrupt it asked for
            # Nobody waits any more: interrupts are off again, so a burst costs none.
            await asyncio.sleep(0.3)
            after = drv.tx.interrupts
            for _ in range(50):
                assert drv.try_send(frame)
            await asyncio.sleep(0.3)
            assert drv.tx.interrupts == after
        finally:
            drv.close()
            mem.close()
    run(go())


def test_busy_polled_pings_take_no_receive_interrupt(device):
    async def go():
        stack, mem = await _guest(device.socket_path)
        drv = stack.drv
        try:
            assert drv.rx is not None
            before = drv.rx.interrupts
            # A budget far above any round trip: the reply is always found by the poll.
            rtts = [await stack.ping(GW, seq, busy_poll_us=2_000_000) for seq in range(30)]
            assert all(r is not None for r in rtts)
            assert drv.rx.interrupts == before
            # Interrupts are back on afterwards: an interrupt-driven ping is answered.
            assert await stack.ping(GW, 99) is not None
            assert drv.rx.interrupts > before
        finally:
            drv.close()
            mem.close()
    run(go())
