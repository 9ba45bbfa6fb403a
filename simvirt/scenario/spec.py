"""What a scenario file says, as typed data (the parser builds it; the runner reads it).

A scenario is a set of VMs (each one driver process with its own guest RAM
and device processes) and a timeline of phases. Each phase lasts a fixed
time and runs, in parallel, its jobs (I/O load), impairments (conditions on
a device's path) and faults (a device process killed or stopped). Times are
seconds, sizes bytes, rates per second, after parsing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from simvirt.machine.config import BalloonDeviceConfig, BlkDeviceConfig, NetDeviceConfig

DeviceSpec = Union[BlkDeviceConfig, NetDeviceConfig, BalloonDeviceConfig]


@dataclass
class VmSpec:
    """One guest: its RAM and devices. ``switch:NAME`` net backends join a switch the runner starts."""

    name: str
    ram: int = 256 << 20
    devices: list[DeviceSpec] = field(default_factory=list)


@dataclass
class BlkJob:
    """A disk load with fio's option names and meanings.

    ``size`` and ``offset`` bound the region (fio's ``size``/``offset``);
    ``runtime`` stops the job before the phase ends; ``rate_iops`` caps it
    (fio's ``rate_iops``, spread evenly); ``numjobs`` clones it, each clone
    with its own seed, reported together (fio's ``group_reporting``).
    """

    name: str
    vm: str
    device: str
    rw: str = "randread"          # read | write | randread | randwrite | randrw | rw
    bs: int = 4096
    iodepth: int = 1
    size: Optional[int] = None
    offset: int = 0
    runtime: Optional[float] = None
    rate_iops: Optional[int] = None
    verify: bool = False
    numjobs: int = 1
    rwmixread: int = 50
    seed: int = 0                 # derived from the scenario seed and the job's place unless given
    kind: str = "blk"


@dataclass
class PingJob:
    """ICMP echo requests to ``target`` every ``interval`` seconds (0: back to back)."""

    name: str
    vm: str
    device: str
    target: str = "10.0.2.2"
    interval: float = 0.01
    size: int = 56                # ICMP payload bytes, as ping -s
    kind: str = "ping"


@dataclass
class StreamJob:
    """``tx``: UDP from the guest to ``target``:``port`` (discard) as fast as allowed;
    ``rx``: the peer streams UDP into the guest (responder backend, or another VM's tx)."""

    name: str
    vm: str
    device: str
    kind: str = "tx"              # tx | rx
    target: str = "10.0.2.2"
    port: int = 9
    frame_size: int = 1514
    rate_pps: Optional[int] = None


@dataclass
class UdpRRJob:
    """UDP request/response (netperf UDP_RR): one request in flight to the echo port."""

    name: str
    vm: str
    device: str
    target: str = "10.0.2.2"
    port: int = 7
    size: int = 64
    kind: str = "udp-rr"


@dataclass
class BalloonJob:
    """Set the balloon so the guest keeps ``target`` bytes of RAM, ``at`` seconds into the phase."""

    name: str
    vm: str
    device: str
    target: int
    at: float = 0.0
    kind: str = "balloon"


@dataclass
class PressureJob:
    """Memory pressure in the guest: allocate and touch ``size`` bytes of guest RAM at ``at``, hold to the phase end."""

    name: str
    vm: str
    size: int
    at: float = 0.0
    kind: str = "pressure"


Job = Union[BlkJob, PingJob, StreamJob, UdpRRJob, BalloonJob, PressureJob]


@dataclass
class NetImpairment:
    """netem-like conditions on a net device's path for the phase.

    ``direction`` ``tx`` delays frames the guest sends (netem on the guest's
    interface), ``rx`` frames delivered to it, ``both`` each way.
    """

    vm: str
    device: str
    delay: float = 0.0            # seconds
    jitter: float = 0.0           # seconds, uniform +-
    loss: float = 0.0             # fraction 0..1
    rate: Optional[float] = None  # bits per second
    direction: str = "tx"
    kind: str = "net"


@dataclass
class BlkImpairment:
    """Disk conditions for the phase: added latency, Firecracker-style token buckets, injected errors."""

    vm: str
    device: str
    latency: float = 0.0          # seconds added to each request
    iops: Optional[int] = None    # ops bucket refill per second
    iops_burst: Optional[int] = None      # ops bucket one-time burst (on top of one second's worth)
    bandwidth: Optional[int] = None       # bytes per second
    bandwidth_burst: Optional[int] = None
    error_rate: float = 0.0       # fraction of requests failed with VIRTIO_BLK_S_IOERR
    kind: str = "blk"


Impairment = Union[NetImpairment, BlkImpairment]


@dataclass
class Fault:
    """A device process killed (SIGKILL, then restarted by the supervisor) or stopped
    (SIGSTOP for ``duration``, then SIGCONT), ``at`` seconds into the phase."""

    vm: str
    device: str
    action: str = "kill"          # kill | stop
    at: float = 0.0
    duration: float = 1.0         # stop only


@dataclass
class Phase:
    name: str
    duration: float
    jobs: list[Job] = field(default_factory=list)
    impairments: list[Impairment] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)


@dataclass
class Scenario:
    name: str
    description: str = ""
    seed: int = 1
    vms: list[VmSpec] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    source: str = "<string>"

    def switches(self) -> dict[str, list[tuple[str, str]]]:
        """Each switch name -> the (vm, device) ports on it, in file order."""
        out: dict[str, list[tuple[str, str]]] = {}
        for vm in self.vms:
            for d in vm.devices:
                if isinstance(d, NetDeviceConfig) and d.backend.startswith("switch:"):
                    out.setdefault(d.backend[len("switch:"):], []).append((vm.name, d.name))
        return out

    def scaled(self, factor: float) -> "Scenario":
        """The same scenario with every phase and in-phase time multiplied by ``factor`` (CI runs)."""
        import copy
        s = copy.deepcopy(self)
        for ph in s.phases:
            ph.duration *= factor
            for j in ph.jobs:
                if isinstance(j, BlkJob) and j.runtime is not None:
                    j.runtime *= factor
                if isinstance(j, (BalloonJob, PressureJob)):
                    j.at *= factor
            for f in ph.faults:
                f.at *= factor
                f.duration *= factor
        return s
