"""The delay lines' timers on a real loop: a timerfd fires after its delay, never before; cancel holds."""
from __future__ import annotations

import asyncio
import os
import time

import uvloop

from simvirt.impair.delayline import DelayLine
from simvirt.impair.timer import LoopTimer, TimerFd, clock_and_timers, new_timer


def test_timerfd_fires_after_the_delay_and_cancel_prevents_it():
    async def main():
        t = new_timer()
        assert isinstance(t, TimerFd)
        loop = asyncio.get_running_loop()
        lat = []
        for _ in range(20):
            f = loop.create_future()
            s = time.monotonic()
            t.call_later(0.002, lambda f=f, s=s: f.set_result(time.monotonic() - s))
            lat.append(await f)
        fired = []
        t.call_later(0.001, lambda: fired.append(1)).cancel()
        await asyncio.sleep(0.01)
        fd = t.fd
        t.close()
        return lat, fired, fd

    lat, fired, fd = uvloop.run(main())
    assert min(lat) >= 0.002 and fired == []
    assert not os.path.exists(f"/proc/self/fd/{fd}")


def test_a_delay_line_on_each_timer_releases_in_order_on_time():
    async def main(make):
        loop = asyncio.get_running_loop()
        out = []
        done = loop.create_future()
        t0 = time.monotonic()

        def release(items):
            out.extend((time.monotonic() - t0, i) for i in items)
            if len(out) == 5:
                done.set_result(None)
        line = DelayLine(release, time.monotonic, make(loop))
        for k in range(5):
            line.push(t0 + 0.001 * (k + 1), k)
        await asyncio.wait_for(done, 2)
        line.close()
        return out

    for make in (TimerFd, LoopTimer):
        out = uvloop.run(main(make))
        assert [i for _, i in out] == list(range(5))
        assert all(t >= 0.001 * (i + 1) for t, i in out)


def test_clock_and_timers_default_to_the_monotonic_clock_and_timerfds_on_the_running_loop():
    mine = lambda: 1.0  # noqa: E731
    fake = lambda: LoopTimer(None)  # noqa: E731
    assert clock_and_timers(mine, fake) == (mine, fake)  # given ones are kept (no loop needed)

    async def main():
        clock, timers = clock_and_timers(None, None)
        t = timers()
        try:
            return clock, type(t), t.loop is asyncio.get_running_loop()
        finally:
            t.close()
    assert uvloop.run(main()) == (time.monotonic, TimerFd, True)
