"""Impairments as sans-IO models: netem-like net conditions, Firecracker-like disk limits.

Nothing here reads a clock, sleeps or touches a socket: every call is given
``now`` (seconds, any monotonic origin) and answers with times. The device
processes own the clock and the loop timers (see :mod:`simvirt.impair.delayline`,
which takes them as arguments), so the models are exact and testable in
simulated time.
"""
from simvirt.impair.blk import BlkLimiter
from simvirt.impair.bucket import TokenBucket
from simvirt.impair.delayline import DelayLine, Timer
from simvirt.impair.netem import NetEm
from simvirt.impair.settings import BlkSettings, NetSettings

__all__ = ["BlkLimiter", "BlkSettings", "DelayLine", "NetEm", "NetSettings", "Timer", "TokenBucket"]
