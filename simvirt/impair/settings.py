"""Impairment settings as the control socket carries them, validated.

The fields and meanings are those of :class:`simvirt.scenario.spec.NetImpairment`
and :class:`~simvirt.scenario.spec.BlkImpairment` without ``vm``/``device``
(which device is the socket's business), plus an optional ``seed`` for the
loss/error draws. A request map is parsed strictly: an unknown key or a
value of the wrong type or range is a ``ValueError`` naming the field, so a
typo in a scenario never silently means "no impairment".
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from simvirt.impair.blk import BlkLimiter
from simvirt.impair.netem import NetEm

# Keys a request may carry that are not settings: the command itself and the
# scenario's addressing (so a runner can send a spec dataclass as it is).
_IGNORED = frozenset({"cmd", "vm", "device"})
DIRECTIONS = ("tx", "rx", "both")


def _number(name: str, v: Any, *, optional: bool = False, positive: bool = False, fraction: bool = False) -> Optional[float]:
    if v is None:
        if optional:
            return None
        raise ValueError(f"{name} must be a number, not null")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, not {v!r}")
    if fraction and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a fraction 0..1, not {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, not {v}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, not {v}")
    return v


def _fields(cls: type, req: Mapping[str, Any], kind: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    unknown = []
    for k, v in req.items():
        if k in _IGNORED:
            continue
        if k == "kind":
            if v != kind:
                raise ValueError(f"kind {v!r}: this is a {kind} device")
            continue
        if k not in names:
            unknown.append(k)
            continue
        out[k] = v
    if unknown:
        raise ValueError(f"unknown {kind} impairment field(s) {', '.join(sorted(map(str, unknown)))} "
                         f"(known: {', '.join(sorted(names))})")
    return out


def _seed(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"seed must be an integer, not {v!r}")
    return v


@dataclass(frozen=True)
class NetSettings:
    """netem on a net device: ``direction`` tx (frames the guest sends), rx (frames it receives) or both."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    rate: Optional[float] = None  # bits per second
    direction: str = "tx"
    seed: int = 1

    @classmethod
    def from_request(cls, req: Mapping[str, Any]) -> "NetSettings":
        f = _fields(cls, req, "net")
        s = cls(
            delay=float(_number("delay", f.get("delay", 0.0))),  # type: ignore[arg-type]
            jitter=float(_number("jitter", f.get("jitter", 0.0))),  # type: ignore[arg-type]
            loss=float(_number("loss", f.get("loss", 0.0), fraction=True)),  # type: ignore[arg-type]
            rate=_number("rate", f.get("rate"), optional=True, positive=True),
            direction=f.get("direction", "tx"),
            seed=_seed(f.get("seed", 1)),
        )
        if s.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {s.direction!r}")
        return s

    @property
    def active(self) -> bool:
        """False when every condition is at its default: no impairment at all."""
        return bool(self.delay or self.jitter or self.loss or self.rate is not None)

    def applies(self, direction: str) -> bool:
        return self.active and self.direction in (direction, "both")

    def netem(self, direction: str) -> NetEm:
        """A fresh model for one direction; each direction draws from its own seeded stream."""
        rng = random.Random(f"{self.seed}/{direction}")
        return NetEm(self.delay, self.jitter, self.loss, self.rate, rng)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if self.active else {}


@dataclass(frozen=True)
class BlkSettings:
    """Disk conditions: added latency, Firecracker-style ops/bandwidth buckets, injected errors."""

    latency: float = 0.0
    iops: Optional[float] = None
    iops_burst: Optional[float] = None
    bandwidth: Optional[float] = None  # bytes per second
    bandwidth_burst: Optional[float] = None
    error_rate: float = 0.0
    seed: int = 1

    @classmethod
    def from_request(cls, req: Mapping[str, Any]) -> "BlkSettings":
        f = _fields(cls, req, "blk")
        s = cls(
            latency=float(_number("latency", f.get("latency", 0.0))),  # type: ignore[arg-type]
            iops=_number("iops", f.get("iops"), optional=True, positive=True),
            iops_burst=_number("iops_burst", f.get("iops_burst"), optional=True),
            bandwidth=_number("bandwidth", f.get("bandwidth"), optional=True, positive=True),
            bandwidth_burst=_number("bandwidth_burst", f.get("bandwidth_burst"), optional=True),
            error_rate=float(_number("error_rate", f.get("error_rate", 0.0), fraction=True)),  # type: ignore[arg-type]
            seed=_seed(f.get("seed", 1)),
        )
        if s.iops_burst is not None and s.iops is None:
            raise ValueError("iops_burst needs iops")
        if s.bandwidth_burst is not None and s.bandwidth is None:
            raise ValueError("bandwidth_burst needs bandwidth")
        return s

    @property
    def active(self) -> bool:
        return bool(self.latency or self.iops is not None or self.bandwidth is not None or self.error_rate)

    def limiter(self) -> BlkLimiter:
        return BlkLimiter(self.latency, self.iops, self.iops_burst, self.bandwidth, self.bandwidth_burst,
                          self.error_rate, random.Random(f"{self.seed}/blk"))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if self.active else {}
