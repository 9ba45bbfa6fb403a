"""Scenario files (TOML) in, checked :mod:`simvirt.scenario.spec` dataclasses out.

A scenario runs several processes for minutes, so a typo found halfway wastes
the run: everything is checked before anything starts, and every complaint
says where, as ``file:LINE: phase[1].job[0].iodepth: expected an integer
1..256, got 0``. tomllib keeps no positions, so :class:`_Locator` recovers
line numbers from the text itself.
"""
from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from simvirt.devices.net.peers import parse_backend
from simvirt.machine.config import BalloonDeviceConfig, BlkDeviceConfig, NetDeviceConfig, is_blk_backend
from simvirt.net.packets import ip_bytes, parse_mac
from simvirt.scenario.spec import (
    BalloonJob,
    BlkImpairment,
    BlkJob,
    DeviceSpec,
    Fault,
    Job,
    NetImpairment,
    Phase,
    PingJob,
    PressureJob,
    Scenario,
    StreamJob,
    UdpRRJob,
    VmSpec,
)
from simvirt.sizes import format_size, parse_size


class ScenarioError(ValueError):
    pass


# --------------------------------------------------------------------------
# Where things are: line numbers for key paths
# --------------------------------------------------------------------------
KeyPath = tuple[tuple[str, Optional[int]], ...]  # (("phase", 1), ("job", 0)); index None: a plain table

_HEADER = re.compile(r"^\s*(\[\[?)([^\[\]]+)\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]""")


@dataclass
class _Node:
    """One table as written: its header's line, its keys' lines, its sub-tables in file order."""

    line: int
    keys: dict[str, int] = field(default_factory=dict)
    tables: dict[str, list["_Node"]] = field(default_factory=dict)


class _Locator:
    """Line numbers for key paths, from a light scan of the text.

    It follows ``[table]`` / ``[[array]]`` headers and ``key =`` lines, which
    is all scenario files need; anything more exotic (inline tables, dotted
    keys) falls back to the nearest enclosing line it knows, then to line 1.
    """

    def __init__(self, text: str) -> None:
        self.root = _Node(1)
        current, in_string = self.root, False
        for n, line in enumerate(text.splitlines(), 1):
            toggles = (line.count('"""') + line.count("'''")) % 2 == 1
            if in_string:  # inside a multi-line string: nothing here is a header or key
                in_string = not toggles
                continue
            in_string = toggles
            if m := _HEADER.match(line):
                current = self._open(m[2], m[1] == "[[", n)
            elif m := _KEY.match(line):
                current.keys.setdefault(m[1].strip("\"'"), n)

    def _open(self, dotted: str, array: bool, line: int) -> _Node:
        *parents, last = (s.strip().strip("\"'") for s in dotted.split("."))
        node = self.root
        for name in parents:  # [[phase.job]] belongs to the latest [[phase]]
            kids = node.tables.setdefault(name, [])
            if not kids:
                kids.append(_Node(line))
            node = kids[-1]
        kids = node.tables.setdefault(last, [])
        if array or not kids:
            kids.append(_Node(line))
        else:  # a parent created implicitly above, now given its own header
            kids[-1].line = line
        return kids[-1]

    def line(self, path: KeyPath, key: Optional[str]) -> int:
        node = self.root
        for name, index in path:
            kids = node.tables.get(name, [])
            if (index or 0) >= len(kids):  # an inline table or array: its key's line
                return node.keys.get(name, node.line)
            node = kids[index or 0]
        if key in node.tables:
            return node.tables[key][0].line
        return node.keys.get(key, node.line) if key else node.line


@dataclass
class _Where:
    """A table's key path, able to word an error about one of its keys."""

    source: str
    locator: _Locator
    path: KeyPath = ()

    def item(self, name: str, index: Optional[int] = None) -> "_Where":
        return _Where(self.source, self.locator, self.path + ((name, index),))

    def label(self, key: Optional[str] = None) -> str:
        parts = [n if i is None else f"{n}[{i}]" for n, i in self.path]
        return ".".join(parts + ([key] if key else []))

    def error(self, key: Optional[str], message: str) -> ScenarioError:
        line = self.locator.line(self.path, key)
        return ScenarioError(f"{self.source}:{line}: {self.label(key)}: {message}")


# --------------------------------------------------------------------------
# Typed values: each converter says what it expects and refuses the rest
# --------------------------------------------------------------------------
class _Bad(Exception):
    """A converter's refusal; without a message it reads 'expected <expect>, got <value>'."""


class _Conv(NamedTuple):
    expect: str
    fn: Callable[[Any], Any]  # returns the converted value or raises _Bad


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "a table" if isinstance(v, dict) else repr(v)


def _or(options: tuple[str, ...]) -> str:
    return ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]


def _conv(expect: str, ok: Callable[[Any], bool]) -> _Conv:
    def fn(v: Any) -> Any:
        if not ok(v):
            raise _Bad()
        return v
    return _Conv(expect, fn)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int, hi: Optional[int] = None) -> _Conv:
    expect = f"an integer {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
    return _conv(expect, lambda v: _is_int(v) and lo <= v and (hi is None or v <= hi))


_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_STR = _conv("a string", lambda v: isinstance(v, str))
_TEXT = _conv("a non-empty string", lambda v: isinstance(v, str) and v != "")
_NAME = _conv("a name of letters, digits, '_' and '-'", lambda v: isinstance(v, str) and bool(_NAME_RE.fullmatch(v)))
_BOOL = _conv("true or false", lambda v: isinstance(v, bool))


def _choice(options: tuple[str, ...], noun: str = "", aliases: Optional[dict[str, str]] = None) -> _Conv:
    def fn(v: Any) -> str:
        v = (aliases or {}).get(v, v) if isinstance(v, str) else v
        if v in options:
            return v
        raise _Bad(f"unknown {noun} {v!r} (expected {_or(options)})" if noun and isinstance(v, str) else "")
    return _Conv(_or(options), fn)


def _size(minimum: int = 0, multiple: int = 1) -> _Conv:
    expect = "a size like 4K or 1M"
    expect += f", at least {format_size(minimum)}" if minimum > 1 else ", > 0" if minimum == 1 else ""
    expect += f", a multiple of {format_size(multiple)}" if multiple > 1 else ""

    def fn(v: Any) -> int:
        try:
            n = parse_size(v)
        except ValueError:
            raise _Bad() from None
        if n < minimum or n % multiple:
            raise _Bad()
        return n
    return _Conv(expect, fn)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*$")
_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(positive: bool = False) -> _Conv:
    """Seconds, from a number or a string with a unit (a bare string would hide a unit mistake)."""
    def fn(v: Any) -> float:
        if _is_int(v) or isinstance(v, float):
            s = float(v)
        elif isinstance(v, str) and (m := _DURATION_RE.match(v)):
            s = float(m[1]) / 1000 if m[2] == "ms" else float(m[1]) * _SECONDS[m[2]]
        else:
            raise _Bad()
        if not math.isfinite(s) or s < 0 or (positive and s == 0):
            raise _Bad()
        return s
    return _Conv("a duration like 5s or 500ms" + (", > 0" if positive else ""), fn)


def _fraction_fn(v: Any) -> float:
    """0..1 as a number, or a percentage string: tc writes loss as ``1%``."""
    if _is_int(v) or isinstance(v, float):
        f = float(v)
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*%\s*", v)):
        f = float(m[1]) / 100
    else:
        raise _Bad()
    if not 0 <= f <= 1:
        raise _Bad()
    return f


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(bit|kbit|mbit|gbit)\s*$", re.IGNORECASE)
_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}  # SI, as tc reads them


def _rate_fn(v: Any) -> float:
    """Bits per second from tc-style units only: a bare number means bytes/s to tc, bits to others."""
    m = _RATE_RE.match(v) if isinstance(v, str) else None
    if not m or float(m[1]) <= 0:
        raise _Bad()
    return float(m[1]) * _BITS[m[2].lower()]


def _checked(expect: str, check: Callable[[str], object]) -> _Conv:
    """A string that ``check`` (a simvirt parser raising ValueError) accepts."""
    def fn(v: Any) -> str:
        if not isinstance(v, str):
            raise _Bad()
        try:
            check(v)
        except ValueError:
            raise _Bad() from None
        return v
    return _Conv(expect, fn)


def _net_backend_fn(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad()
    try:
        kind, args = parse_backend(v)
    except ValueError as e:
        raise _Bad(str(e)) from None
    if kind == "switch" and not _NAME_RE.fullmatch(args[0]):
        raise _Bad(f"expected a switch name of letters, digits, '_' and '-', got {args[0]!r}")
    return v


_FRACTION = _Conv("a fraction 0..1 or a percentage like '1%'", _fraction_fn)
_RATE = _Conv("a rate like 100mbit or 1gbit (bit, kbit, mbit or gbit)", _rate_fn)
_IPV4 = _checked("an IPv4 address like 10.0.2.2", ipaddress.IPv4Address)
_IP = _checked("an IP address like 10.0.2.15", ip_bytes)
_MAC = _checked("a MAC address like 52:54:00:12:34:56", parse_mac)
_NET_BACKEND = _Conv("a net backend like responder or switch:NAME", _net_backend_fn)
_BLK_BACKEND = _conv("null, memory, scratch or file:PATH", is_blk_backend)
_RAM = _size(16 << 20, 4096)
_REQUIRED: Any = object()


class _Table:
    """One TOML table being read: typed reads whose errors carry file, line and key path."""

    def __init__(self, raw: dict[str, Any], where: _Where) -> None:
        self.raw, self.where = raw, where

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def fail(self, key: Optional[str], message: str) -> ScenarioError:
        return self.where.error(key, message)

    def get(self, key: str, conv: _Conv, default: Any = _REQUIRED) -> Any:
        if key not in self.raw:
            if default is _REQUIRED:
                raise self.fail(key, f"missing (expected {conv.expect})")
            return default
        v = self.raw[key]
        try:
            return conv.fn(v)
        except _Bad as e:
            raise self.fail(key, str(e) or f"expected {conv.expect}, got {_show(v)}") from None

    def read(self, fields: dict[str, _Conv], required: tuple[str, ...] = ()) -> dict[str, Any]:
        """The converted values of the keys present: the dataclass supplies the defaults."""
        return {k: self.get(k, c) for k, c in fields.items() if k in self.raw or k in required}

    def only(self, allowed: tuple[str, ...], what: str = "key") -> None:
        for key in self.raw:  # file order: the first stray key is the one reported
            if key not in allowed:
                raise self.fail(key, f"unknown {what} (expected one of: {', '.join(allowed)})")

    def table(self, key: str) -> "_Table":
        v = self.raw.get(key, {})
        if not isinstance(v, dict):
            raise self.fail(key, f"expected a [{key}] table, got {_show(v)}")
        return _Table(v, self.where.item(key))

    def tables(self, key: str) -> list["_Table"]:
        """The ``[[key]]`` array of tables, empty when absent."""
        v = self.raw.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            header = ".".join([n for n, _ in self.where.path] + [key])
            raise self.fail(key, f"expected [[{header}]] tables, got {_show(v)}")
        return [_Table(x, self.where.item(key, i)) for i, x in enumerate(v)]


# --------------------------------------------------------------------------
# VMs and devices (the rules of simvirt.machine.config, plus switches and event_idx)
# --------------------------------------------------------------------------
_DEVICE_TYPES: dict[str, tuple[type, dict[str, _Conv]]] = {
    "blk": (BlkDeviceConfig, {"backend": _BLK_BACKEND, "size": _size(512, 512), "serial": _STR,
                              "num_queues": _int(1, 64), "readonly": _BOOL, "event_idx": _BOOL}),
    "net": (NetDeviceConfig, {"backend": _NET_BACKEND, "mac": _MAC, "mtu": _int(68, 65535), "ip": _IP,
                              "pcap": _STR, "event_idx": _BOOL}),
    "balloon": (BalloonDeviceConfig, {"stats_interval": _duration(), "report_interval": _duration(),
                                      "event_idx": _BOOL}),
}


def _devices(owner: _Table) -> list[DeviceSpec]:
    devices: list[DeviceSpec] = []
    for t in owner.tables("device"):
        typ = t.get("type", _choice(tuple(_DEVICE_TYPES), "device type"))
        cls, fields = _DEVICE_TYPES[typ]
        t.only(("type", "name", *fields), f"key for a {typ} device")
        name = t.get("name", _TEXT)
        if any(d.name == name for d in devices):
            raise t.fail("name", f"duplicate device name {name!r} in this VM")
        if typ == "balloon" and any(d.type == "balloon" for d in devices):
            raise t.fail("type", "expected at most one balloon device per VM")
        values = t.read(fields)
        if typ == "blk":
            values.setdefault("serial", name)  # as simvirt.machine.config does
        devices.append(cls(name=name, **values))
    if not devices:
        raise owner.fail("device", "missing (expected at least one device)")
    return devices


def _vms(root: _Table) -> list[VmSpec]:
    """The [[vm]] tables, or the one VM ``vm0`` of the single-VM ``[[device]]`` shorthand."""
    if "vm" not in root:
        if "device" not in root:
            raise root.fail("vm", "missing (expected [[vm]] tables, or [[device]] tables for a single VM)")
        machine = root.table("machine")
        machine.only(("ram",))
        return [VmSpec("vm0", machine.get("ram", _RAM, VmSpec.ram), _devices(root))]
    for key in ("device", "machine"):
        if key in root:
            raise root.fail(key, f"expected no top-level [{key}] with [[vm]] tables (it is the single-VM "
                                 "shorthand; use [[vm.device]] and vm.ram)")
    vms: list[VmSpec] = []
    for t in root.tables("vm"):
        t.only(("name", "ram", "device"))
        name = t.get("name", _NAME)
        if any(v.name == name for v in vms):
            raise t.fail("name", f"duplicate VM name {name!r}")
        vms.append(VmSpec(name, t.get("ram", _RAM, VmSpec.ram), _devices(t)))
    if not vms:
        raise root.fail("vm", "expected at least one [[vm]] table")
    return vms


def _target_vm(t: _Table, vms: dict[str, VmSpec]) -> VmSpec:
    """The ``vm`` key, which may be left out only when there is no choice."""
    if "vm" not in t and len(vms) == 1:
        return next(iter(vms.values()))
    if "vm" not in t:
        raise t.fail("vm", f"missing (expected one of the VMs {', '.join(vms)}; required with several VMs)")
    name = t.get("vm", _STR)
    if name not in vms:
        raise t.fail("vm", f"no VM {name!r} (VMs: {', '.join(vms)})")
    return vms[name]


def _target_device(t: _Table, vm: VmSpec) -> DeviceSpec:
    name = t.get("device", _STR)
    for d in vm.devices:
        if d.name == name:
            return d
    raise t.fail("device", f"VM {vm.name!r} has no device {name!r} (it has: {', '.join(d.name for d in vm.devices)})")


# --------------------------------------------------------------------------
# Phases: jobs, impairments, faults
# --------------------------------------------------------------------------
_TARGET: dict[str, _Conv] = {"target": _IPV4}
_STREAM = {**_TARGET, "port": _int(1, 65535), "frame_size": _int(64, 1514), "rate_pps": _int(1)}
_JOB_KINDS: dict[str, tuple[type, Optional[str], dict[str, _Conv]]] = {  # class, device type, keys
    "blk": (BlkJob, "blk", {
        "rw": _choice(("read", "write", "randread", "randwrite", "randrw", "rw"), aliases={"readwrite": "rw"}),
        "bs": _size(512, 512), "iodepth": _int(1, 256), "size": _size(1), "offset": _size(),
        "runtime": _duration(positive=True), "rate_iops": _int(1), "verify": _BOOL, "numjobs": _int(1, 64),
        "rwmixread": _int(0, 100), "seed": _int(0)}),
    "ping": (PingJob, "net", {**_TARGET, "interval": _duration(), "size": _int(0, 1472)}),
    "tx": (StreamJob, "net", _STREAM),
    "rx": (StreamJob, "net", _STREAM),
    "udp-rr": (UdpRRJob, "net", {**_TARGET, "port": _int(1, 65535), "size": _int(1, 1472)}),
    "balloon": (BalloonJob, "balloon", {"target": _size(1), "at": _duration()}),
    "pressure": (PressureJob, None, {"size": _size(1), "at": _duration()}),
}
_REQUIRED_JOB_KEYS = {"balloon": ("target",), "pressure": ("size",)}


def _job(t: _Table, index: int, vms: dict[str, VmSpec], phase: Phase, seed: int) -> Job:
    kind = t.get("kind", _choice(tuple(_JOB_KINDS), "job kind"))
    cls, device_type, fields = _JOB_KINDS[kind]
    common = ("kind", "name", "vm") + (("device",) if device_type else ())
    t.only(common + tuple(fields), f"key for a {kind} job")
    vm = _target_vm(t, vms)
    base: dict[str, Any] = {"vm": vm.name}
    dev = None
    if device_type:
        dev = _target_device(t, vm)
        if dev.type != device_type:
            raise t.fail("device", f"{dev.name!r} is a {dev.type} device but a {kind} job needs a {device_type} device")
        base["device"] = dev.name
    if cls is StreamJob:
        base["kind"] = kind
    base["name"] = t.get("name", _TEXT, f"{kind}-{dev.name if dev else 'mem'}-{index}")
    job = cls(**base, **t.read(fields, _REQUIRED_JOB_KEYS.get(kind, ())))
    if isinstance(job, BlkJob) and isinstance(dev, BlkDeviceConfig):
        _check_blk_job(t, job, dev, phase.duration)
        if "seed" not in t:
            job.seed = seed
    if isinstance(job, (BalloonJob, PressureJob)):
        _check_at(t, job.at, phase.duration)
    ram = f"VM {vm.name!r}'s RAM ({format_size(vm.ram)})"
    if isinstance(job, BalloonJob) and job.target > vm.ram:
        raise t.fail("target", f"expected at most {ram}, got {format_size(job.target)}")
    if isinstance(job, PressureJob) and job.size >= vm.ram:  # the guest needs some memory of its own
        raise t.fail("size", f"expected less than {ram}, got {format_size(job.size)}")
    return job


def _check_blk_job(t: _Table, job: BlkJob, disk: BlkDeviceConfig, phase_duration: float) -> None:
    """What fio would refuse at run time: a region off the disk, writes to a read-only disk, overruns."""
    if job.offset % job.bs:
        raise t.fail("offset", f"expected a multiple of bs ({job.bs}), got {job.offset}")
    end = job.offset + (job.size or 0)
    if end > disk.size or job.offset >= disk.size:
        raise t.fail("size" if job.size else "offset",
                     f"expected offset + size within disk {disk.name!r} ({format_size(disk.size)}), "
                     f"got {job.offset} + {job.size or 0} = {end}")
    if disk.readonly and job.rw not in ("read", "randread"):
        raise t.fail("rw", f"expected read or randread: disk {disk.name!r} is read-only, got {job.rw!r}")
    if job.runtime is not None and job.runtime > phase_duration:
        raise t.fail("runtime", f"expected at most the phase's {phase_duration:g}s, got {job.runtime:g}s")


def _check_at(t: _Table, at: float, phase_duration: float) -> None:
    if at >= phase_duration:
        raise t.fail("at", f"expected a time before the phase ends (< {phase_duration:g}s), got {at:g}s")


_IMPAIRMENTS: dict[str, tuple[type, dict[str, _Conv]]] = {
    "net": (NetImpairment, {"delay": _duration(), "jitter": _duration(), "loss": _FRACTION, "rate": _RATE,
                            "direction": _choice(("tx", "rx", "both"))}),
    "blk": (BlkImpairment, {"latency": _duration(), "iops": _int(1), "iops_burst": _int(0),
                            "bandwidth": _size(1), "bandwidth_burst": _size(), "error_rate": _FRACTION}),
}


def impairment_keys(kind: str) -> set[str]:
    """The keys of a ``net`` or ``blk`` impairment."""
    return set(_IMPAIRMENTS[kind][1])


def impairment_values(kind: str, pairs: dict[str, str]) -> dict[str, Any]:
    """``KEY=VALUE`` words from a command line (``simvirt ctl SOCKET impair delay=2ms loss=1%``),
    converted as the same keys in a scenario file are: one syntax for both."""
    if kind not in _IMPAIRMENTS:
        raise ScenarioError(f"no impairments for a {kind} device (expected net or blk)")
    fields = _IMPAIRMENTS[kind][1]
    out: dict[str, Any] = {}
    for key, text in pairs.items():
        conv = fields.get(key)
        if conv is None:
            raise ScenarioError(f"{key}: unknown {kind} impairment key (expected one of: {', '.join(fields)})")
        value: Any = text
        for number in (int, float):     # 500 and 0.05 are numbers, as in TOML
            try:
                value = number(text)
                break
            except ValueError:
                continue
        try:
            out[key] = conv.fn(value)
        except _Bad as e:
            raise ScenarioError(f"{key}: {str(e) or f'expected {conv.expect}, got {_show(value)}'}") from None
    return out


def _impairment(t: _Table, vms: dict[str, VmSpec], phase: Phase) -> NetImpairment | BlkImpairment:
    vm = _target_vm(t, vms)
    dev = _target_device(t, vm)
    if dev.type not in _IMPAIRMENTS:
        raise t.fail("device", f"{dev.name!r} is a {dev.type} device (expected a net or blk device)")
    other = "blk" if dev.type == "net" else "net"
    for key in t.raw:  # a key of the other kind is a mix-up of devices, not a typo: say so
        if key in _IMPAIRMENTS[other][1]:
            raise t.fail(key, f"{key} is a {other} impairment but {dev.name!r} is a {dev.type} device")
    cls, fields = _IMPAIRMENTS[dev.type]
    t.only(("vm", "device", *fields), f"key for a {dev.type} impairment")
    if any(i.vm == vm.name and i.device == dev.name for i in phase.impairments):
        raise t.fail("device", f"expected one impairment per device per phase; {vm.name}/{dev.name} has one already")
    imp = cls(vm=vm.name, device=dev.name, **t.read(fields))
    if isinstance(imp, BlkImpairment) and imp.iops_burst is not None and imp.iops is None:
        raise t.fail("iops_burst", "expected only with iops (a burst tops up a rate)")
    if isinstance(imp, BlkImpairment) and imp.bandwidth_burst is not None and imp.bandwidth is None:
        raise t.fail("bandwidth_burst", "expected only with bandwidth (a burst tops up a rate)")
    return imp


def _fault(t: _Table, vms: dict[str, VmSpec], phase: Phase) -> Fault:
    t.only(("vm", "device", "action", "at", "duration"))
    vm = _target_vm(t, vms)
    dev = _target_device(t, vm)
    if isinstance(dev, NetDeviceConfig) and dev.backend.startswith("switch:"):
        raise t.fail("device", f"{dev.name!r} is a port of {dev.backend!r}, whose process every port shares "
                               "(expected a device with a process of its own)")
    action = t.get("action", _choice(("kill", "stop"), "fault action"))
    if action == "kill" and "duration" in t:
        raise t.fail("duration", "expected no duration for a kill fault (only stop lasts)")
    times = t.read({"at": _duration(), "duration": _duration(positive=True)})
    fault = Fault(vm=vm.name, device=dev.name, action=action, **times)
    _check_at(t, fault.at, phase.duration)
    if action == "stop" and fault.at + fault.duration > phase.duration:
        raise t.fail("duration" if "duration" in t else "at",
                     f"expected the stop to end within the phase's {phase.duration:g}s, "
                     f"got at {fault.at:g}s + duration {fault.duration:g}s")
    return fault


def _phase(t: _Table, index: int, vms: dict[str, VmSpec], seed: int, earlier: list[Phase]) -> Phase:
    t.only(("name", "duration", "job", "impair", "fault"))
    name = t.get("name", _TEXT)
    if any(p.name == name for p in earlier):
        raise t.fail("name", f"duplicate phase name {name!r}")
    phase = Phase(name, t.get("duration", _duration(positive=True)))
    for j, jt in enumerate(t.tables("job")):
        job = _job(jt, j, vms, phase, seed * 1_000_003 + index * 1009 + j)
        if any(x.name == job.name for x in phase.jobs):
            raise jt.fail("name", f"duplicate job name {job.name!r} in phase {name!r}")
        phase.jobs.append(job)
    for it in t.tables("impair"):
        phase.impairments.append(_impairment(it, vms, phase))
    for ft in t.tables("fault"):
        phase.faults.append(_fault(ft, vms, phase))
    return phase


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------
def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise ScenarioError(f"{source}:{m[1] if m else 1}: invalid TOML: {e}") from None


def parse_scenario(text: str, source: str = "<string>") -> Scenario:
    """The scenario in ``text``; ``source`` names it in errors and gives the default name (its stem)."""
    root = _Table(_toml(text, source), _Where(source, _Locator(text)))
    root.only(("scenario", "machine", "vm", "device", "phase"), "top-level table")
    head = root.table("scenario")
    head.only(("name", "description", "seed"))
    sc = Scenario(name=head.get("name", _TEXT, Path(source).stem if source.endswith(".toml") else "scenario"),
                  description=head.get("description", _STR, ""), seed=head.get("seed", _int(0), 1),
                  vms=_vms(root), source=source)
    vms = {vm.name: vm for vm in sc.vms}
    for i, t in enumerate(root.tables("phase")):
        sc.phases.append(_phase(t, i, vms, sc.seed, sc.phases))
    if not sc.phases:
        raise root.fail("phase", "missing (expected at least one [[phase]] table)")
    return sc


def _shipped_dir() -> Any:
    return resources.files("simvirt").joinpath("configs", "scenarios")


def shipped_scenarios() -> list[str]:
    """Names of the scenarios in the package (``simvirt/configs/scenarios/NAME.toml``)."""
    d = _shipped_dir()
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".toml")) if d.is_dir() else []


def load_scenario(name_or_path: str | None) -> Scenario:
    """A scenario file by path, or a shipped one by name (None: ``default``)."""
    name = name_or_path or "default"
    if Path(name).is_file():
        try:
            text = Path(name).read_text(encoding="utf-8")
        except OSError as e:
            raise ScenarioError(f"cannot read scenario {name}: {e.strerror}") from None
        return parse_scenario(text, name)
    shipped = _shipped_dir().joinpath(f"{name}.toml")
    if _NAME_RE.fullmatch(name) and shipped.is_file():
        return parse_scenario(shipped.read_text(encoding="utf-8"), f"simvirt/configs/scenarios/{name}.toml")
    raise ScenarioError(f"no scenario file or shipped scenario {name!r} "
                        f"(shipped: {', '.join(shipped_scenarios()) or 'none'})")
