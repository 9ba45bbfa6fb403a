"""Machine configuration: TOML in, validated dataclasses out.

Every mistake is reported with its location (``device[1].size: ...``) before
anything starts, so a bad config never leaves half a machine running.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

from simvirt.sizes import parse_size


class ConfigError(ValueError):
    pass


def is_blk_backend(v: object) -> bool:
    """null, memory, scratch or file:PATH."""
    return isinstance(v, str) and (v in ("null", "memory", "scratch") or (v.startswith("file:") and len(v) > 5))


@dataclass
class BlkDeviceConfig:
    name: str
    backend: str = "memory"  # null | memory | file:PATH | scratch (a file in the run's directory, removed after)
    size: int = 64 << 20
    serial: str = ""
    num_queues: int = 1
    readonly: bool = False
    event_idx: bool = True   # the driver negotiates VIRTIO_F_EVENT_IDX (off: every kick and interrupt is sent)
    type: str = "blk"

    def scratch_path(self, workdir: str) -> str:
        """Where a ``scratch`` disk's image lives (the machine creates and removes it)."""
        return os.path.join(workdir, f"{self.name}.img")

    def device_args(self, workdir: str = ".") -> list[str]:
        args = []
        if self.backend == "scratch":
            args += ["--image", self.scratch_path(workdir), "--size", str(self.size)]
        elif self.backend == "null":
            args += ["--null", str(self.size)]
        elif self.backend == "memory":
            args += ["--memory", str(self.size)]
        else:
            args += ["--image", self.backend[5:], "--size", str(self.size)]
        args += ["--serial", self.serial or self.name, "--num-queues", str(self.num_queues)]
        if self.readonly:
            args.append("--readonly")
        return args


@dataclass
class NetDeviceConfig:
    name: str
    backend: str = "responder"
    mac: str = ""
    mtu: int = 1500
    ip: str = "10.0.2.15"
    pcap: Optional[str] = None
    event_idx: bool = True
    type: str = "net"

    def device_args(self) -> list[str]:
        args = ["--backend", self.backend, "--mtu", str(self.mtu)]
        if self.mac:
            args += ["--mac", self.mac]
        if self.pcap:
            args += ["--pcap", self.pcap]
        return args


@dataclass
class NetWorkloadConfig:
    """ping: ICMP echo to ``target``; udp-tx: UDP to the discard port as fast as the ring allows."""

    device: str
    mode: str = "ping"
    target: str = "10.0.2.2"
    interval: float = 0.01
    frame_size: int = 1514


@dataclass
class BalloonDeviceConfig:
    name: str
    stats_interval: float = 2.0
    report_interval: float = 2.0  # guest free page reporting pass (0 = off)
    event_idx: bool = True
    type: str = "balloon"

    def device_args(self) -> list[str]:
        return ["--stats-interval", str(self.stats_interval)]


@dataclass
class BalloonStep:
    at: float  # seconds after the workloads start
    size: int  # target guest memory (QEMU's `balloon SIZE`)


@dataclass
class BalloonWorkloadConfig:
    """A scripted sequence of balloon targets."""

    device: str
    steps: list[BalloonStep] = field(default_factory=list)


@dataclass
class BlkWorkloadConfig:
    device: str
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 16
    verify: bool = False
    mix: int = 50
    size: Optional[int] = None


@dataclass
class MachineConfig:
    name: str = "sim"
    ram: int = 256 << 20
    duration: float = 10.0
    metrics_port: Optional[int] = None
    control: Optional[str] = None
    devices: list[Any] = field(default_factory=list)  # BlkDeviceConfig | BalloonDeviceConfig
    workloads: list[Any] = field(default_factory=list)  # BlkWorkloadConfig | BalloonWorkloadConfig
    source: str = "<default>"


_RW = {"read", "write", "randread", "randwrite", "randrw"}


def _take(d: dict[str, Any], where: str, key: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
    if key not in d:
        if required:
            raise ConfigError(f"{where}: missing required key '{key}'")
        return default
    v = d.pop(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise ConfigError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(v).__name__} {v!r}")
    return v


def _size(d: dict[str, Any], where: str, key: str, default: Optional[int]) -> Optional[int]:
    v = _take(d, where, key, (str, int), None)
    if v is None:
        return default
    try:
        return parse_size(v)
    except ValueError as e:
        raise ConfigError(f"{where}.{key}: {e}") from None


def _no_extra(d: dict[str, Any], where: str) -> None:
    if d:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(d))}")


def parse_config(text: str, source: str = "<string>") -> MachineConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    cfg = MachineConfig(source=source)
    m = dict(raw.pop("machine", {}))
    cfg.name = _take(m, "machine", "name", str, "sim")
    cfg.ram = _size(m, "machine", "ram", cfg.ram) or 0
    cfg.metrics_port = _take(m, "machine", "metrics_port", int, None)
    cfg.control = _take(m, "machine", "control", str, None)
    _no_extra(m, "machine")
    if cfg.ram < 16 << 20 or cfg.ram % 4096:
        raise ConfigError("machine.ram: must be a multiple of 4K and at least 16M")
    r = dict(raw.pop("run", {}))
    dur = _take(r, "run", "duration", (int, float), 10)
    if dur <= 0:
        raise ConfigError("run.duration: must be positive")
    cfg.duration = float(dur)
    _no_extra(r, "run")
    names: set[str] = set()
    for i, d in enumerate(raw.pop("device", [])):
        where = f"device[{i}]"
        d = dict(d)
        typ = _take(d, where, "type", str, required=True)
        if typ not in ("blk", "balloon", "net"):
            raise ConfigError(f"{where}.type: unknown device type {typ!r} (supported: blk, net, balloon)")
        name = _take(d, where, "name", str, required=True)
        if name in names:
            raise ConfigError(f"{where}.name: duplicate device name {name!r}")
        names.add(name)
        if typ == "net":
            from simvirt.devices.net.peers import parse_backend
            from simvirt.net.packets import ip_bytes, parse_mac
            net = NetDeviceConfig(name=name, backend=_take(d, where, "backend", str, "responder"),
                                  mac=_take(d, where, "mac", str, ""), mtu=_take(d, where, "mtu", int, 1500),
                                  ip=_take(d, where, "ip", str, "10.0.2.15"), pcap=_take(d, where, "pcap", str, None))
            try:
                parse_backend(net.backend)
                if net.mac:
                    parse_mac(net.mac)
                ip_bytes(net.ip)
            except (ValueError, OSError) as e:
                raise ConfigError(f"{where}: {e}") from None
            if net.backend.startswith("switch:"):
                raise ConfigError(f"{where}.backend: switch ports are started with `simvirt device net`, not by run")
            if not 68 <= net.mtu <= 65535:
                raise ConfigError(f"{where}.mtu: must be 68..65535")
            _no_extra(d, where)
            cfg.devices.append(net)
            continue
        if typ == "balloon":
            if any(isinstance(x, BalloonDeviceConfig) for x in cfg.devices):
                raise ConfigError(f"{where}: a machine has at most one balloon")
            bal = BalloonDeviceConfig(name=name,
                                      stats_interval=float(_take(d, where, "stats_interval", (int, float), 2.0)),
                                      report_interval=float(_take(d, where, "report_interval", (int, float), 2.0)))
            if bal.stats_interval < 0 or bal.report_interval < 0:
                raise ConfigError(f"{where}: intervals must be >= 0")
            _no_extra(d, where)
            cfg.devices.append(bal)
            continue
        backend = _take(d, where, "backend", str, "memory")
        if not is_blk_backend(backend):
            raise ConfigError(f"{where}.backend: {backend!r} is not null, memory, scratch or file:PATH")
        dev = BlkDeviceConfig(name=name, backend=backend, size=_size(d, where, "size", 64 << 20) or 0,
                              serial=_take(d, where, "serial", str, name),
                              num_queues=_take(d, where, "num_queues", int, 1),
                              readonly=_take(d, where, "readonly", bool, False))
        if dev.size < 512 or dev.size % 512:
            raise ConfigError(f"{where}.size: must be a positive multiple of 512")
        if not 1 <= dev.num_queues <= 64:
            raise ConfigError(f"{where}.num_queues: must be 1..64")
        _no_extra(d, where)
        cfg.devices.append(dev)
    for i, w in enumerate(raw.pop("workload", [])):
        where = f"workload[{i}]"
        w = dict(w)
        dev_name = _take(w, where, "device", str, required=True)
        if dev_name not in names:
            raise ConfigError(f"{where}.device: no device named {dev_name!r}")
        target = next(d for d in cfg.devices if d.name == dev_name)
        if isinstance(target, NetDeviceConfig):
            nw = NetWorkloadConfig(device=dev_name, mode=_take(w, where, "mode", str, "ping"),
                                   target=_take(w, where, "target", str, "10.0.2.2"),
                                   interval=float(_take(w, where, "interval", (int, float), 0.01)),
                                   frame_size=_take(w, where, "frame_size", int, 1514))
            if nw.mode not in ("ping", "udp-tx"):
                raise ConfigError(f"{where}.mode: {nw.mode!r} is not ping or udp-tx")
            if nw.interval < 0 or not 64 <= nw.frame_size <= 1514:
                raise ConfigError(f"{where}: interval >= 0 and frame_size 64..1514")
            _no_extra(w, where)
            cfg.workloads.append(nw)
            continue
        if isinstance(target, BalloonDeviceConfig):
            steps = []
            for j, st in enumerate(_take(w, where, "steps", list, required=True)):
                if not isinstance(st, dict):
                    raise ConfigError(f"{where}.steps[{j}]: expected a table {{at = SECONDS, size = SIZE}}")
                st = dict(st)
                at = _take(st, f"{where}.steps[{j}]", "at", (int, float), required=True)
                size = _size(st, f"{where}.steps[{j}]", "size", None)
                _no_extra(st, f"{where}.steps[{j}]")
                if at < 0 or not size or size > cfg.ram:
                    raise ConfigError(f"{where}.steps[{j}]: need at >= 0 and 0 < size <= machine.ram")
                steps.append(BalloonStep(float(at), size))
            _no_extra(w, where)
            cfg.workloads.append(BalloonWorkloadConfig(dev_name, sorted(steps, key=lambda x: x.at)))
            continue
        wl = BlkWorkloadConfig(device=dev_name, rw=_take(w, where, "rw", str, "randread"),
                               bs=_size(w, where, "bs", 4096) or 0, iodepth=_take(w, where, "iodepth", int, 16),
                               verify=_take(w, where, "verify", bool, False), mix=_take(w, where, "mix", int, 50),
                               size=_size(w, where, "size", None))
        if wl.rw not in _RW:
            raise ConfigError(f"{where}.rw: {wl.rw!r} is not one of {', '.join(sorted(_RW))}")
        if wl.bs <= 0 or wl.bs % 512:
            raise ConfigError(f"{where}.bs: must be a positive multiple of 512")
        if not 1 <= wl.iodepth <= 256:
            raise ConfigError(f"{where}.iodepth: must be 1..256")
        if not 0 <= wl.mix <= 100:
            raise ConfigError(f"{where}.mix: must be 0..100")
        dev = target
        if dev.readonly and wl.rw not in ("read", "randread"):
            raise ConfigError(f"{where}: device {dev_name!r} is read-only but rw is {wl.rw!r}")
        _no_extra(w, where)
        cfg.workloads.append(wl)
    if raw:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(raw))}")
    if not cfg.devices:
        raise ConfigError(f"{source}: no [[device]] defined")
    return cfg


def load_config(path: Optional[str]) -> MachineConfig:
    if path is None:
        text = resources.files("simvirt").joinpath("configs/machine.toml").read_text()
        return parse_config(text, "<embedded machine.toml>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    return parse_config(text, path)
