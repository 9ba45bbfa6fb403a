"""Scenario files: the contract of the TOML format, and errors that point at the file, line and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from simvirt.machine.config import BalloonDeviceConfig, BlkDeviceConfig, NetDeviceConfig
from simvirt.scenario import parse
from simvirt.scenario.parse import ScenarioError, load_scenario, parse_scenario, shipped_scenarios
from simvirt.scenario.spec import (
    BalloonJob,
    BlkImpairment,
    BlkJob,
    Fault,
    NetImpairment,
    Phase,
    PingJob,
    PressureJob,
    StreamJob,
    UdpRRJob,
    VmSpec,
)

MiB = 1 << 20

FULL = '''\
[scenario]
name = "noisy-neighbour"
description = """Two VMs on a switch;
a's disk is throttled while b streams."""
seed = 7

[[vm]]
name = "a"
ram = "512M"

[[vm.device]]
type = "blk"
name = "vda"
backend = "scratch"
size = "64M"
num_queues = 2
event_idx = false

[[vm.device]]
type = "net"
name = "net0"
backend = "switch:lan0"
ip = "10.0.0.1"
mac = "52:54:00:00:00:01"

[[vm.device]]
type = "balloon"
name = "bal0"
stats_interval = "500ms"

[[vm]]
name = "b"

[[vm.device]]
type = "net"
name = "net0"
backend = "switch:lan0"
ip = "10.0.0.2"
mtu = 9000

[[vm.device]]
type = "blk"
name = "vdb"
backend = "null"

[[phase]]
name = "warmup"
duration = "500ms"

[[phase.job]]
kind = "blk"
name = "randread"
vm = "a"
device = "vda"
rw = "readwrite"
bs = "8K"
iodepth = 32
size = "16M"
offset = "1M"
runtime = 0.25
rate_iops = 1000
verify = true
numjobs = 4
rwmixread = 70
seed = 42

[[phase.job]]
kind = "ping"
vm = "a"
device = "net0"
target = "10.0.0.2"
interval = 0
size = 1472

[[phase]]
name = "storm"
duration = "2m"

[[phase.job]]
kind = "tx"
vm = "b"
device = "net0"
target = "10.0.0.1"
port = 5001
frame_size = 64
rate_pps = 100000

[[phase.job]]
kind = "rx"
vm = "a"
device = "net0"

[[phase.job]]
kind = "udp-rr"
vm = "a"
device = "net0"
target = "10.0.0.2"
size = 1

[[phase.job]]
kind = "balloon"
vm = "a"
device = "bal0"
target = "384M"
at = "1.5s"

[[phase.job]]
kind = "pressure"
vm = "b"
size = "128M"
at = "1m"

[[phase.impair]]
vm = "a"
device = "net0"
delay = "20ms"
jitter = "5ms"
loss = "1%"
rate = "100mbit"
direction = "both"

[[phase.impair]]
vm = "a"
device = "vda"
latency = "2ms"
iops = 500
iops_burst = 100
bandwidth = "10M"
bandwidth_burst = "1M"
error_rate = 0.5

[[phase.fault]]
vm = "b"
device = "vdb"
action = "stop"
at = "10s"
duration = "30s"

[[phase.fault]]
vm = "a"
device = "vda"
action = "kill"
'''


def test_full_multi_vm_scenario_parses_into_the_dataclasses():
    sc = parse_scenario(FULL, "x.toml")
    assert (sc.name, sc.seed, sc.source) == ("noisy-neighbour", 7, "x.toml")
    assert sc.description == "Two VMs on a switch;\na's disk is throttled while b streams."
    assert sc.vms == [
        VmSpec("a", 512 * MiB, [
            BlkDeviceConfig("vda", backend="scratch", size=64 * MiB, serial="vda", num_queues=2, event_idx=False),
            NetDeviceConfig("net0", backend="switch:lan0", ip="10.0.0.1", mac="52:54:00:00:00:01"),
            BalloonDeviceConfig("bal0", stats_interval=0.5),
        ]),
        VmSpec("b", 256 * MiB, [
            NetDeviceConfig("net0", backend="switch:lan0", ip="10.0.0.2", mtu=9000),
            BlkDeviceConfig("vdb", backend="null", serial="vdb"),
        ]),
    ]
    assert sc.switches() == {"lan0": [("a", "net0"), ("b", "net0")]}
    warmup, storm = sc.phases
    assert warmup == Phase("warmup", 0.5, jobs=[
        BlkJob("randread", "a", "vda", rw="rw", bs=8192, iodepth=32, size=16 * MiB, offset=MiB, runtime=0.25,
               rate_iops=1000, verify=True, numjobs=4, rwmixread=70, seed=42),
        PingJob("ping-net0-1", "a", "net0", target="10.0.0.2", interval=0.0, size=1472),
    ])
    assert storm == Phase("storm", 120.0, jobs=[
        StreamJob("tx-net0-0", "b", "net0", kind="tx", target="10.0.0.1", port=5001, frame_size=64, rate_pps=100000),
        StreamJob("rx-net0-1", "a", "net0", kind="rx"),
        UdpRRJob("udp-rr-net0-2", "a", "net0", target="10.0.0.2", size=1),
        BalloonJob("balloon-bal0-3", "a", "bal0", target=384 * MiB, at=1.5),
        PressureJob("pressure-mem-4", "b", size=128 * MiB, at=60.0),
    ], impairments=[
        NetImpairment("a", "net0", delay=0.02, jitter=0.005, loss=0.01, rate=1e8, direction="both"),
        BlkImpairment("a", "vda", latency=0.002, iops=500, iops_burst=100, bandwidth=10485760,
                      bandwidth_burst=MiB, error_rate=0.5),
    ], faults=[
        Fault("b", "vdb", action="stop", at=10.0, duration=30.0),
        Fault("a", "vda", action="kill"),
    ])


def test_defaults_of_a_minimal_scenario():
    sc = parse_scenario('[[device]]\ntype = "blk"\nname = "vda"\n[[phase]]\nname = "p"\nduration = 3\n'
                        '[[phase.job]]\nkind = "blk"\ndevice = "vda"\n')
    assert (sc.name, sc.description, sc.seed) == ("scenario", "", 1)
    job = sc.phases[0].jobs[0]
    assert isinstance(job, BlkJob)
    assert (job.rw, job.bs, job.iodepth, job.size, job.offset, job.runtime, job.numjobs) == \
        ("randread", 4096, 1, None, 0, None, 1)
    assert sc.vms[0].devices[0] == BlkDeviceConfig("vda", serial="vda", event_idx=True)


def test_single_vm_device_shorthand():
    sc = parse_scenario('''\
[machine]
ram = "64M"

[[device]]
type = "blk"
name = "vda"

[[device]]
type = "net"
name = "net0"

[[phase]]
name = "p"
duration = "1s"

[[phase.job]]
kind = "ping"
device = "net0"

[[phase.fault]]
device = "vda"
action = "kill"
''', "scenarios/quick.toml")
    assert sc.name == "quick"
    assert [(v.name, v.ram, [d.name for d in v.devices]) for v in sc.vms] == [("vm0", 64 * MiB, ["vda", "net0"])]
    assert sc.phases[0].jobs == [PingJob("ping-net0-0", "vm0", "net0")]
    assert sc.phases[0].faults == [Fault("vm0", "vda", "kill")]


def test_shorthand_ram_defaults_to_256m():
    sc = parse_scenario('[[device]]\ntype = "balloon"\nname = "b"\n[[phase]]\nname = "p"\nduration = 1\n')
    assert sc.vms == [VmSpec("vm0", 256 * MiB, [BalloonDeviceConfig("b")])]


SEEDS = '''\
[scenario]
seed = {seed}

[[device]]
type = "blk"
name = "vda"

[[phase]]
name = "one"
duration = "1s"

[[phase.job]]
kind = "blk"
device = "vda"

[[phase.job]]
kind = "blk"
device = "vda"

[[phase]]
name = "two"
duration = "1s"

[[phase.job]]
kind = "blk"
device = "vda"

[[phase.job]]
kind = "blk"
device = "vda"
seed = 5
'''


def seeds(text: str) -> list[int]:
    return [j.seed for ph in parse_scenario(text).phases for j in ph.jobs if isinstance(j, BlkJob)]


def test_default_job_names_and_derived_seeds():
    sc = parse_scenario(SEEDS.format(seed=7))
    assert [[j.name for j in ph.jobs] for ph in sc.phases] == [["blk-vda-0", "blk-vda-1"], ["blk-vda-0", "blk-vda-1"]]
    a = seeds(SEEDS.format(seed=7))
    assert a == seeds(SEEDS.format(seed=7))                  # same file: same seeds
    assert len(set(a[:3])) == 3                              # a job's place changes its seed
    assert a[3] == 5                                         # an explicit seed wins
    assert seeds(SEEDS.format(seed=8))[:3] != a[:3]          # the scenario seed feeds them all


def test_scaled_multiplies_every_time_in_the_phases():
    sc = parse_scenario(FULL).scaled(0.1)
    warmup, storm = sc.phases
    assert warmup.duration == pytest.approx(0.05) and storm.duration == pytest.approx(12.0)
    blk = warmup.jobs[0]
    assert isinstance(blk, BlkJob) and blk.runtime == pytest.approx(0.025)
    assert [getattr(j, "at", None) for j in storm.jobs] == [None, None, None, pytest.approx(0.15), pytest.approx(6.0)]
    assert [(f.at, f.duration) for f in storm.faults][0] == (pytest.approx(1.0), pytest.approx(3.0))
    assert parse_scenario(FULL).phases[1].duration == 120.0  # the original is left alone


# --------------------------------------------------------------------------
# Errors: file, line, key path, expectation
# --------------------------------------------------------------------------
BASE = '''\
[scenario]
name = "t"

[[vm]]
name = "a"

[[vm.device]]
type = "blk"
name = "vda"
size = "8M"

[[vm.device]]
type = "net"
name = "net0"
backend = "switch:lan0"

[[vm.device]]
type = "balloon"
name = "bal0"

[[vm]]
name = "b"

[[vm.device]]
type = "net"
name = "eth0"
'''

PHASE = '''
[[phase]]
name = "p"
duration = "5s"
'''


def job(body: str, header: str = PHASE) -> str:
    return BASE + header + "\n[[phase.job]]\n" + body


def impair(body: str) -> str:
    return BASE + PHASE + "\n[[phase.impair]]\n" + body


def fault(body: str) -> str:
    return BASE + PHASE + "\n[[phase.fault]]\n" + body


BAD = [
    ("unknown-job-key", job('kind = "blk"\nvm = "a"\ndevice = "vda"\nbogus = 1\n'), "bogus",
     ["phase[0].job[0].bogus: unknown key for a blk job (expected one of:", "iodepth"]),
    ("unknown-top-table", BASE + PHASE + "\n[extra]\nx = 1\n", "[extra]",
     ["extra: unknown top-level table (expected one of: scenario, machine, vm, device, phase)"]),
    ("wrong-type", job('kind = "blk"\nvm = "a"\ndevice = "vda"\niodepth = "deep"\n'), "iodepth",
     ["phase[0].job[0].iodepth: expected an integer 1..256, got 'deep'"]),
    ("out-of-range", job('kind = "blk"\nvm = "a"\ndevice = "vda"\niodepth = 0\n'), "iodepth",
     ["phase[0].job[0].iodepth: expected an integer 1..256, got 0"]),
    ("bs-not-sector-multiple", job('kind = "blk"\nvm = "a"\ndevice = "vda"\nbs = 1000\n'), "bs =",
     ["phase[0].job[0].bs: expected a size like 4K or 1M, at least 512, a multiple of 512, got 1000"]),
    ("region-off-the-disk", job('kind = "blk"\nvm = "a"\ndevice = "vda"\noffset = "4M"\nsize = "5M"\n'), "size = \"5M",
     ["phase[0].job[0].size: expected offset + size within disk 'vda' (8M)"]),
    ("runtime-beyond-phase", job('kind = "blk"\nvm = "a"\ndevice = "vda"\nruntime = "6s"\n'), "runtime",
     ["phase[0].job[0].runtime: expected at most the phase's 5s, got 6s"]),
    ("unknown-job-kind", job('kind = "fio"\n'), "fio",
     ["phase[0].job[0].kind: unknown job kind 'fio' (expected blk, ping, tx, rx, udp-rr, balloon or pressure)"]),
    ("unknown-device", job('kind = "blk"\nvm = "a"\ndevice = "vdz"\n'), "vdz",
     ["phase[0].job[0].device: VM 'a' has no device 'vdz' (it has: vda, net0, bal0)"]),
    ("unknown-vm", job('kind = "blk"\nvm = "zz"\ndevice = "vda"\n'), "zz",
     ["phase[0].job[0].vm: no VM 'zz' (VMs: a, b)"]),
    ("wrong-device-type", job('kind = "ping"\nvm = "a"\ndevice = "vda"\n'), 'device = "vda"',
     ["phase[0].job[0].device: 'vda' is a blk device but a ping job needs a net device"]),
    ("vm-required-with-two-vms", job('kind = "ping"\ndevice = "net0"\n'), "[[phase.job]]",
     ["phase[0].job[0].vm: missing (expected one of the VMs a, b; required with several VMs)"]),
    ("pressure-has-no-device", job('kind = "pressure"\nvm = "a"\nsize = "1M"\ndevice = "vda"\n'), 'device = "vda"',
     ["phase[0].job[0].device: unknown key for a pressure job"]),
    ("balloon-beyond-ram", job('kind = "balloon"\nvm = "a"\ndevice = "bal0"\ntarget = "1G"\n'), "target",
     ["phase[0].job[0].target: expected at most VM 'a''s RAM (256M), got 1G"]),
    ("pressure-all-of-ram", job('kind = "pressure"\nvm = "b"\nsize = "256M"\n'), "256M",
     ["phase[0].job[0].size: expected less than VM 'b''s RAM (256M), got 256M"]),
    ("at-beyond-phase", job('kind = "pressure"\nvm = "a"\nsize = "1M"\nat = "5s"\n'), "at =",
     ["phase[0].job[0].at: expected a time before the phase ends (< 5s), got 5s"]),
    ("duplicate-job-name", job('kind = "pressure"\nvm = "a"\nsize = "1M"\nname = "x"\n'
                               '\n[[phase.job]]\nkind = "pressure"\nvm = "b"\nsize = "1M"\nname = "x"  # dup\n'),
     "# dup", ["phase[0].job[1].name: duplicate job name 'x' in phase 'p'"]),
    ("duplicate-phase-name", BASE + PHASE + PHASE.replace('name = "p"', 'name = "p"  # dup'), "# dup",
     ["phase[1].name: duplicate phase name 'p'"]),
    ("missing-duration", BASE + '\n[[phase]]\nname = "p"\n', "[[phase]]",
     ["phase[0].duration: missing (expected a duration like 5s or 500ms, > 0)"]),
    ("bad-duration-unit", BASE + '\n[[phase]]\nname = "p"\nduration = "5sec"\n', "5sec",
     ["phase[0].duration: expected a duration like 5s or 500ms, > 0, got '5sec'"]),
    ("no-phases", BASE, "[scenario]", ["t.toml:1: phase: missing (expected at least one [[phase]] table)"]),
    ("toml-syntax", BASE + '\n[[phase]]\nname = "p"\nduration = \n', "duration =", ["invalid TOML", "Invalid value"]),
    ("stop-without-room", fault('vm = "a"\ndevice = "vda"\naction = "stop"\nat = "4s"\nduration = "2s"\n'),
     'duration = "2s"', ["phase[0].fault[0].duration: expected the stop to end within the phase's 5s, "
                         "got at 4s + duration 2s"]),
    ("stop-default-duration-without-room", fault('vm = "a"\ndevice = "vda"\naction = "stop"\nat = "4.5s"\n'),
     "4.5s", ["phase[0].fault[0].at: expected the stop to end within the phase's 5s, got at 4.5s + duration 1s"]),
    ("kill-with-duration", fault('vm = "a"\ndevice = "vda"\naction = "kill"\nduration = "1s"\n'), 'duration = "1s"',
     ["phase[0].fault[0].duration: expected no duration for a kill fault"]),
    ("switch-backed-fault", fault('vm = "a"\ndevice = "net0"\naction = "kill"\n'), 'device = "net0"',
     ["phase[0].fault[0].device: 'net0' is a port of 'switch:lan0', whose process every port shares"]),
    ("fault-action-missing", fault('vm = "b"\ndevice = "eth0"\n'), "[[phase.fault]]",
     ["phase[0].fault[0].action: missing (expected kill or stop)"]),
    ("net-key-on-blk-impairment", impair('vm = "a"\ndevice = "vda"\ndelay = "10ms"\n'), "delay",
     ["phase[0].impair[0].delay: delay is a net impairment but 'vda' is a blk device"]),
    ("blk-key-on-net-impairment", impair('vm = "b"\ndevice = "eth0"\niops = 5\n'), "iops",
     ["phase[0].impair[0].iops: iops is a blk impairment but 'eth0' is a net device"]),
    ("loss-over-100-percent", impair('vm = "b"\ndevice = "eth0"\nloss = "150%"\n'), "150%",
     ["phase[0].impair[0].loss: expected a fraction 0..1 or a percentage like '1%', got '150%'"]),
    ("bad-rate-unit", impair('vm = "b"\ndevice = "eth0"\nrate = "10mbps"\n'), "10mbps",
     ["phase[0].impair[0].rate: expected a rate like 100mbit or 1gbit (bit, kbit, mbit or gbit), got '10mbps'"]),
    ("impair-a-balloon", impair('vm = "a"\ndevice = "bal0"\n'), 'device = "bal0"',
     ["phase[0].impair[0].device: 'bal0' is a balloon device (expected a net or blk device)"]),
    ("burst-without-rate", impair('vm = "a"\ndevice = "vda"\niops_burst = 10\n'), "iops_burst",
     ["phase[0].impair[0].iops_burst: expected only with iops"]),
    ("unknown-device-type", BASE + '\n[[vm.device]]\ntype = "gpu"\nname = "g"\n' + PHASE, "gpu",
     ["vm[1].device[1].type: unknown device type 'gpu' (expected blk, net or balloon)"]),
    ("duplicate-device-name", BASE + '\n[[vm.device]]\ntype = "blk"\nname = "eth0"  # dup\n' + PHASE, "# dup",
     ["vm[1].device[1].name: duplicate device name 'eth0' in this VM"]),
    ("bad-switch-name", BASE + '\n[[vm.device]]\ntype = "net"\nname = "n1"\nbackend = "switch:lan.0"\n' + PHASE,
     "lan.0", ["vm[1].device[1].backend: expected a switch name of letters, digits, '_' and '-', got 'lan.0'"]),
    ("bad-blk-backend", BASE.replace('size = "8M"', 'size = "8M"\nbackend = "tape"'), "tape",
     ["vm[0].device[0].backend: expected null, memory, scratch or file:PATH, got 'tape'"]),
    ("bad-vm-name", BASE + '\n[[vm]]\nname = "c d"\n' + PHASE, "c d",
     ["vm[2].name: expected a name of letters, digits, '_' and '-', got 'c d'"]),
    ("ram-too-small", BASE.replace('name = "a"\n', 'name = "a"\nram = "8M"  # small\n'), "# small",
     ["vm[0].ram: expected a size like 4K or 1M, at least 16M, a multiple of 4K, got '8M'"]),
    ("vm-and-device", BASE + '\n[[device]]\ntype = "blk"\nname = "x"\n' + PHASE, "[[device]]",
     ["device: expected no top-level [device] with [[vm]] tables"]),
]


@pytest.mark.parametrize("text,needle,fragments", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_scenarios_are_refused_with_file_line_key_and_expectation(text: str, needle: str, fragments: list[str]):
    lines = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(lines) == 1, f"needle {needle!r} must pick out one line"
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(text, "t.toml")
    msg = str(ei.value)
    assert msg.startswith(f"t.toml:{lines[0]}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg


def error(text: str, source: str = "x.toml") -> str:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(text, source)
    return str(ei.value)


def test_exact_line_numbers():
    assert error(BASE + PHASE + '\n[[phase.job]]\nkind = "blk"\nvm = "a"\ndevice = "vda"\niodepth = 0\n') == \
        "x.toml:36: phase[0].job[0].iodepth: expected an integer 1..256, got 0"
    assert error(job('kind = "blk"\nvm = "a"\ndevice = "vdz"\n')) == \
        "x.toml:35: phase[0].job[0].device: VM 'a' has no device 'vdz' (it has: vda, net0, bal0)"
    assert error(BASE + '\n[[vm.device]]\ntype = "gpu"\n').startswith("x.toml:29: vm[1].device[1].type: ")
    assert error(BASE + '\n[[phase]]\nname = "p"\n').startswith("x.toml:28: phase[0].duration: missing")
    assert error(FULL.replace('iops_burst = 100', 'iops_burst = -1'), "configs/scenarios/x.toml") == \
        "configs/scenarios/x.toml:127: phase[1].impair[1].iops_burst: expected an integer >= 0, got -1"


def test_multiline_strings_and_comments_do_not_confuse_the_line_numbers():
    text = '''\
[scenario]
description = """
[[phase]]
iodepth = 1
"""
# [[phase]]
[[device]]
type = "blk"
name = "vda"

[[phase]]
name = "p"
duration = "1s"

[[phase.job]]
kind = "blk"
device = "vda"
iodepth = 999
'''
    assert error(text).startswith("x.toml:18: phase[0].job[0].iodepth: expected an integer 1..256, got 999")


def test_inline_tables_fall_back_to_their_key_line():
    jobs = '{ kind = "blk", vm = "a", device = "vda" }, { kind = "blk", vm = "a", device = "vda", iodepth = 0 }'
    text = BASE + PHASE + f"job = [{jobs}]\n"
    assert error(text).startswith("x.toml:31: phase[0].job[1].iodepth: expected an integer 1..256, got 0")


def test_value_conversions():
    text = job('kind = "ping"\nvm = "b"\ndevice = "eth0"\ninterval = "1.5s"\n') + \
        '\n[[phase.impair]]\nvm = "b"\ndevice = "eth0"\nloss = 0.25\nrate = "500KBIT"\ndelay = 0.1\n'
    ph = parse_scenario(text).phases[0]
    assert isinstance(ph.jobs[0], PingJob) and ph.jobs[0].interval == 1.5
    assert ph.impairments == [NetImpairment("b", "eth0", delay=0.1, loss=0.25, rate=5e5)]


def test_read_only_disk_refuses_write_jobs():
    text = BASE.replace('size = "8M"', 'size = "8M"\nreadonly = true') + PHASE + \
        '\n[[phase.job]]\nkind = "blk"\nvm = "a"\ndevice = "vda"\nrw = "randwrite"\n'
    assert "phase[0].job[0].rw: expected read or randread: disk 'vda' is read-only" in error(text)


# --------------------------------------------------------------------------
# Loading by path or shipped name
# --------------------------------------------------------------------------
MINI = '[[device]]\ntype = "blk"\nname = "vda"\n[[phase]]\nname = "p"\nduration = 1\n'


def test_load_scenario_from_a_path(tmp_path: Path):
    f = tmp_path / "mine.toml"
    f.write_text(MINI)
    sc = load_scenario(str(f))
    assert (sc.name, sc.source) == ("mine", str(f))
    f.write_text(MINI + "bogus = 1\n")
    with pytest.raises(ScenarioError, match=rf"^{f}:7: phase\[0\]\.bogus: unknown key"):
        load_scenario(str(f))


def test_load_scenario_by_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "default.toml").write_text(MINI.replace('"p"', '"d"'))
    (tmp_path / "other.toml").write_text(MINI.replace('"p"', '"o"'))
    (tmp_path / "README.md").write_text("not a scenario")
    monkeypatch.setattr(parse, "_shipped_dir", lambda: tmp_path)
    assert shipped_scenarios() == ["default", "other"]
    assert load_scenario(None).phases[0].name == "d"
    other = load_scenario("other")
    assert (other.name, other.source, other.phases[0].name) == ("other", "simvirt/configs/scenarios/other.toml", "o")
    with pytest.raises(ScenarioError, match=r"no scenario file or shipped scenario 'nope' \(shipped: default, other\)"):
        load_scenario("nope")


def test_shipped_scenarios_lists_the_package_files():
    names = shipped_scenarios()
    assert names == sorted(names)
    for name in names:
        assert parse._shipped_dir().joinpath(f"{name}.toml").is_file()
