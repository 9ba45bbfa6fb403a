"""``simvirt run`` configs: every mistake is refused before anything starts, with its location."""
from __future__ import annotations

import subprocess
import sys

import pytest

from simvirt.machine.config import (
    BalloonDeviceConfig,
    BalloonWorkloadConfig,
    BlkDeviceConfig,
    BlkWorkloadConfig,
    ConfigError,
    load_config,
    parse_config,
)

MiB = 1 << 20

BASE = """
[machine]
name = "t"
ram = "64M"

[[device]]
type = "blk"
name = "vda"
backend = "memory"
size = "8M"
"""

BALLOON = """
[[device]]
type = "balloon"
name = "bal"
"""


def err(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "test.toml")
    return str(ei.value)


def test_embedded_default_config():
    cfg = load_config(None)
    assert cfg.name == "demo" and cfg.ram == 256 * MiB and cfg.duration == 10
    assert [(d.type, d.name) for d in cfg.devices] == [("blk", "vda"), ("blk", "vdb"), ("net", "net0"),
                                                       ("balloon", "balloon0")]
    bal = [w for w in cfg.workloads if isinstance(w, BalloonWorkloadConfig)]
    assert len(bal) == 1 and [(s.at, s.size) for s in bal[0].steps] == [(3.0, 192 * MiB), (7.0, 256 * MiB)]
    verify = [w for w in cfg.workloads if isinstance(w, BlkWorkloadConfig) and w.verify]
    assert [w.device for w in verify] == ["vda"]


def test_full_config_parses():
    cfg = parse_config(BASE + BALLOON + """
stats_interval = 0.5
report_interval = 0

[[workload]]
device = "vda"
rw = "randrw"
bs = "8K"
iodepth = 4
verify = true
mix = 70
size = "4M"

[[workload]]
device = "bal"
steps = [{ at = 2, size = "32M" }, { at = 0.5, size = "48M" }, { at = 4, size = "64M" }]

[run]
duration = 3.5
""", "x.toml")
    assert cfg.ram == 64 * MiB and cfg.duration == 3.5 and cfg.source == "x.toml"
    blk, bal = cfg.devices
    assert isinstance(blk, BlkDeviceConfig) and blk.size == 8 * MiB and blk.serial == "vda"
    assert blk.device_args() == ["--memory", str(8 * MiB), "--serial", "vda", "--num-queues", "1"]
    assert isinstance(bal, BalloonDeviceConfig) and bal.stats_interval == 0.5 and bal.report_interval == 0
    assert bal.device_args() == ["--stats-interval", "0.5"]
    wl, bw = cfg.workloads
    assert (wl.rw, wl.bs, wl.iodepth, wl.verify, wl.mix, wl.size) == ("randrw", 8192, 4, True, 70, 4 * MiB)
    # Steps are applied in time order whatever order the file lists them in.
    assert [(s.at, s.size) for s in bw.steps] == [(0.5, 48 * MiB), (2.0, 32 * MiB), (4.0, 64 * MiB)]


@pytest.mark.parametrize("text,expected", [
    # unknown keys, everywhere
    (BASE.replace('name = "t"', 'name = "t"\ncolour = "red"'), "machine: unknown key(s) colour"),
    (BASE + 'colour = "red"\n', "device[0]: unknown key(s) colour"),
    (BASE + BALLOON + "size = \"1G\"\n", "device[1]: unknown key(s) size"),
    (BASE + '[[workload]]\ndevice = "vda"\nspeed = 3\n', "workload[0]: unknown key(s) speed"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = []\nrw = "read"\n', "workload[0]: unknown key(s) rw"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = 1, size = "8M", when = 2}]\n',
     "workload[0].steps[0]: unknown key(s) when"),
    (BASE + "[run]\nduration = 3\nrepeat = 2\n", "run: unknown key(s) repeat"),
    (BASE + "[network]\nx = 1\n", "test.toml: unknown section(s) network"),
    # bad sizes
    (BASE.replace('size = "8M"', 'size = "8Q"'), "device[0].size: invalid size '8Q'"),
    (BASE.replace('size = "8M"', "size = 1000"), "device[0].size: must be a positive multiple of 512"),
    (BASE.replace('size = "8M"', "size = 1.5"), "device[0].size: expected"),
    (BASE.replace('ram = "64M"', 'ram = "lots"'), "machine.ram: invalid size 'lots'"),
    (BASE.replace('ram = "64M"', 'ram = "8M"'), "machine.ram: must be a multiple of 4K and at least 16M"),
    (BASE.replace('ram = "64M"', 'ram = 16777217'), "machine.ram: must be a multiple of 4K"),
    (BASE + '[[workload]]\ndevice = "vda"\nbs = "1000"\n', "workload[0].bs: must be a positive multiple of 512"),
    (BASE + '[[workload]]\ndevice = "vda"\nbs = "4KB"\nsize = "huge"\n', "workload[0].size: invalid size 'huge'"),
    # devices
    (BASE + BASE.split("[machine]")[1].split("\n\n", 1)[1], "device[1].name: duplicate device name 'vda'"),
    (BASE + BALLOON.replace('name = "bal"', 'name = "vda"'), "device[1].name: duplicate device name 'vda'"),
    (BASE + BALLOON + BALLOON.replace('"bal"', '"bal2"'), "device[2]: a machine has at most one balloon"),
    (BASE + '[[device]]\ntype = "gpu"\nname = "g0"\n', "device[1].type: unknown device type 'gpu'"),
    (BASE + '[[device]]\ntype = "net"\nname = "eth0"\nbackend = "wire:x"\n', "device[1]: unknown net backend 'wire:x'"),
    (BASE + '[[device]]\ntype = "net"\nname = "eth0"\nmtu = 20\n', "device[1].mtu: must be 68..65535"),
    (BASE + '[[device]]\ntype = "net"\nname = "eth0"\n[[workload]]\ndevice = "eth0"\nmode = "flood"\n',
     "workload[0].mode: 'flood' is not ping or udp-tx"),
    (BASE + '[[device]]\ntype = "blk"\n', "device[1]: missing required key 'name'"),
    (BASE + '[[device]]\nname = "x"\n', "device[1]: missing required key 'type'"),
    (BASE.replace('backend = "memory"', 'backend = "tape"'), "device[0].backend: 'tape' is not null, memory, scratch or file:PATH"),
    (BASE.replace('backend = "memory"', 'backend = "file:"'), "device[0].backend"),
    (BASE + "num_queues = 0\n", "device[0].num_queues: must be 1..64"),
    (BASE + 'num_queues = "2"\n', "device[0].num_queues: expected int, got str"),
    (BASE + "num_queues = true\n", "device[0].num_queues: expected int, got bool"),
    (BASE + 'readonly = "yes"\n', "device[0].readonly: expected bool"),
    (BASE + BALLOON + "stats_interval = -1\n", "device[1]: intervals must be >= 0"),
    (BASE + BALLOON + 'report_interval = "often"\n', "device[1].report_interval: expected"),
    ('[machine]\nram = "64M"\n', "test.toml: no [[device]] defined"),
    # workloads
    (BASE + '[[workload]]\ndevice = "vdz"\n', "workload[0].device: no device named 'vdz'"),
    (BASE + "[[workload]]\nrw = \"read\"\n", "workload[0]: missing required key 'device'"),
    (BASE + '[[workload]]\ndevice = "vda"\nrw = "scribble"\n', "workload[0].rw: 'scribble' is not one of"),
    (BASE + '[[workload]]\ndevice = "vda"\niodepth = 0\n', "workload[0].iodepth: must be 1..256"),
    (BASE + '[[workload]]\ndevice = "vda"\nmix = 101\n', "workload[0].mix: must be 0..100"),
    (BASE + "readonly = true\n" + '[[workload]]\ndevice = "vda"\nrw = "write"\n',
     "workload[0]: device 'vda' is read-only but rw is 'write'"),
    (BASE + "readonly = true\n" + '[[workload]]\ndevice = "vda"\nrw = "randrw"\n',
     "workload[0]: device 'vda' is read-only but rw is 'randrw'"),
    # balloon steps
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = 1, size = "128M"}]\n',
     "workload[0].steps[0]: need at >= 0 and 0 < size <= machine.ram"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = 1, size = "32M"}, {at = 2, size = "65M"}]\n',
     "workload[0].steps[1]: need at >= 0 and 0 < size <= machine.ram"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = -1, size = "32M"}]\n', "workload[0].steps[0]: need at >= 0"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = 1, size = 0}]\n', "workload[0].steps[0]: need"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = 1}]\n', "workload[0].steps[0]: need"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{size = "8M"}]\n',
     "workload[0].steps[0]: missing required key 'at'"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [3]\n', "workload[0].steps[0]: expected a table"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\n', "workload[0]: missing required key 'steps'"),
    (BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = "32M"\n', "workload[0].steps: expected list"),
    # run
    (BASE + "[run]\nduration = 0\n", "run.duration: must be positive"),
    (BASE + '[run]\nduration = "10s"\n', "run.duration: expected"),
    # not TOML at all
    ("[machine\nram = 1", "test.toml: invalid TOML"),
])
def test_config_errors(text, expected):
    assert expected in err(text)


@pytest.mark.parametrize("where,text", [
    ("run.duration", BASE + "[run]\nduration = true\n"),
    ("steps[0].at", BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = true, size = "32M"}]\n'),
    ("stats_interval", BASE + BALLOON + "stats_interval = true\n"),
    ("steps[0].size", BASE + BALLOON + '[[workload]]\ndevice = "bal"\nsteps = [{at = 1, size = true}]\n'),
], ids=["duration", "step-at", "stats_interval", "step-size"])
def test_booleans_are_not_numbers(where, text):
    """``num_queues = true`` is refused; a boolean where seconds belong must be refused too."""
    assert where.split(".")[-1] in err(text)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*nope.toml"):
        load_config(str(tmp_path / "nope.toml"))


def test_run_cli_reports_config_errors_cleanly(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE + BALLOON + BALLOON.replace('"bal"', '"bal2"'))
    r = subprocess.run([sys.executable, "-m", "simvirt", "run", str(path), "--json"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip() == "simvirt: error: device[2]: a machine has at most one balloon"


def test_run_cli_rejects_non_positive_duration(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(BASE)
    r = subprocess.run([sys.executable, "-m", "simvirt", "run", str(path), "--duration", "0"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2
    assert "--duration must be positive" in r.stderr
