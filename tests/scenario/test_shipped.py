"""Every shipped scenario runs, shortened with --duration-scale, and its results say what it promises."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from simvirt.scenario.parse import load_scenario, shipped_scenarios

SHIPPED = ["balloon-pressure", "blk-qd-sweep", "default", "device-crash", "event-idx-on-off", "impaired-link",
           "net-throughput", "noisy-neighbour"]


def run(name: str, scale: float, out: Path, timeout: float = 240) -> dict:
    r = subprocess.run([sys.executable, "-m", "simvirt", "run", name, "--duration-scale", str(scale), "--json",
                        "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=timeout)
    assert r.stdout, r.stderr[-4000:]
    res = json.loads(r.stdout)
    assert (r.returncode == 0) == res["ok"], r.stderr[-4000:]
    # What --out wrote is the same result, plus the plots.
    assert json.loads((out / "results.json").read_text()) == res
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return res


def jobs(res: dict, phase: str) -> dict[str, dict]:
    (ph,) = [p for p in res["phases"] if p["name"] == phase]
    return {f"{j['vm']}/{j['name']}": j for j in ph["jobs"]}


def test_the_shipped_set_is_complete():
    assert shipped_scenarios() == SHIPPED
    for name in SHIPPED:
        s = load_scenario(name)
        assert s.name == name and s.description and s.phases


def _common(res: dict, name: str, scale: float) -> None:
    s = load_scenario(name).scaled(scale)
    assert res["scenario"] == name and res["duration_scale"] == scale
    assert [p["name"] for p in res["phases"]] == [p.name for p in s.phases]
    for p, sp in zip(res["phases"], s.phases):
        assert p["duration_s"] == pytest.approx(sp.duration)
        assert len(p["jobs"]) == len(sp.jobs), p
        for j in p["jobs"]:
            if j["kind"] in ("blk", "ping", "tx", "rx", "udp-rr"):
                assert j["summary"]["rate"] > 0, j
                assert j["timeline"], j
                assert all(p["start_s"] - 0.5 <= t["t"] <= p["start_s"] + p["duration_s"] + 1.5 for t in j["timeline"])
    starts = [p["start_s"] for p in res["phases"]]
    assert starts == sorted(starts)


def test_default(tmp_path):
    res = run("default", 0.5, tmp_path)
    _common(res, "default", 0.5)
    assert res["ok"], res["errors"]
    w = jobs(res, "warmup")
    assert w["vm0/disk"]["verified"] is True and w["vm0/disk"]["write"]["ios"] > 100
    assert w["vm0/ping"]["ping"]["lost"] == 0
    m = jobs(res, "mixed")
    blk = m["vm0/disk"]
    assert blk["read"]["ios"] > 0 and blk["write"]["ios"] > 0 and blk["verified"] is True
    assert m["vm0/balloon"]["balloon"]["took_s"] is not None
    sq = jobs(res, "squeezed")
    # The 2000 IOPS limit: the phase (2 s here) cannot beat one second's burst plus the rate.
    assert sq["vm0/disk"]["summary"]["rate"] < 2000 * 2.1
    assert sq["vm0/ping"]["summary"]["lat_us"]["p50"] >= 1000


def test_blk_qd_sweep(tmp_path):
    res = run("blk-qd-sweep", 0.25, tmp_path)
    _common(res, "blk-qd-sweep", 0.25)
    assert res["ok"], res["errors"]
    iops = {p["name"]: p["jobs"][0]["summary"]["rate"] for p in res["phases"]}
    lat = {p["name"]: p["jobs"][0]["summary"]["lat_us"]["p50"] for p in res["phases"]}
    # Depth buys throughput, and latency grows with it.
    assert iops["vda-qd16"] > iops["vda-qd1"] * 1.5
    assert lat["vda-qd64"] > lat["vda-qd1"]


def test_event_idx_on_off(tmp_path):
    res = run("event-idx-on-off", 0.4, tmp_path)
    _common(res, "event-idx-on-off", 0.4)
    assert res["ok"], res["errors"]
    for p in res["phases"]:
        (j,) = p["jobs"]
        assert j["vm"] == p["name"].split("-")[0]


def test_net_throughput(tmp_path):
    res = run("net-throughput", 0.3, tmp_path)
    _common(res, "net-throughput", 0.3)
    assert res["ok"], res["errors"]
    tx = jobs(res, "tx-1514")["vm0/tx-net0-0"]["stream"]
    rx = jobs(res, "rx-1514")["vm0/rx-net0-0"]["stream"]
    assert tx["gbps"] > 0.1 and rx["gbps"] > 0.1
    assert jobs(res, "udp-rr")["vm0/udp-rr-net0-0"]["rr"]["transactions"] > 100


def test_noisy_neighbour(tmp_path):
    res = run("noisy-neighbour", 0.5, tmp_path)
    _common(res, "noisy-neighbour", 0.5)
    assert res["ok"], res["errors"]
    flood = jobs(res, "flood")
    assert flood["neighbour/flood"]["stream"]["frames"] > 1000
    # The victim received the flood through the switch, and kept getting ping replies.
    assert flood["victim/flood-received"]["stream"]["frames"] > 0.5 * flood["neighbour/flood"]["stream"]["frames"]
    for phase in ("quiet", "flood", "recovered"):
        assert jobs(res, phase)["victim/ping"]["ping"]["sent"] > 20


def test_balloon_pressure(tmp_path):
    res = run("balloon-pressure", 0.5, tmp_path)
    _common(res, "balloon-pressure", 0.5)
    assert res["ok"], res["errors"]
    inflate = jobs(res, "inflate")["vm0/balloon-balloon0-1"]["balloon"]
    assert inflate["actual"] == 128 << 20 and inflate["took_s"] is not None
    pressure = jobs(res, "pressure")["vm0/pressure-mem-1"]["pressure"]
    assert pressure["allocated"] == 64 << 20 and pressure["error"] is None
    assert all(j["verified"] is True for p in res["phases"] for j in p["jobs"] if j["kind"] == "blk")


def test_impaired_link(tmp_path):
    res = run("impaired-link", 0.6, tmp_path)
    _common(res, "impaired-link", 0.6)
    assert res["ok"], res["errors"]
    clean = jobs(res, "clean")["vm0/ping-net0-0"]["summary"]["lat_us"]["p50"]
    delayed = jobs(res, "delay-2ms")["vm0/ping-net0-0"]["summary"]["lat_us"]["p50"]
    assert delayed - clean >= 1500            # 2 ms +- 0.5 ms jitter
    lossy = jobs(res, "loss-5pct")["vm0/ping-net0-0"]["ping"]
    assert 0 < lossy["lost"] < lossy["sent"] * 0.25
    tx = jobs(res, "rate-10mbit")["vm0/tx-net0-0"]
    # The guest's sending is not limited (the ring takes frames); what the link carries is.
    assert tx["summary"]["rate"] > 0


def test_device_crash(tmp_path):
    res = run("device-crash", 0.6, tmp_path)
    _common(res, "device-crash", 0.6)
    assert res["ok"], res["errors"]
    by = {p["name"]: p for p in res["phases"]}
    (kill,) = by["blk-kill"]["faults"]
    assert kill["action"] == "kill" and kill["new_pid"] != kill["old_pid"]
    assert kill["recovered_s"] is not None and kill["guest_saw"]["errors"] == 0
    (stop,) = by["blk-stop"]["faults"]
    assert stop["new_pid"] == stop["old_pid"]
    assert stop["guest_saw"]["max_lat_us"] >= 0.5 * 0.6e6       # a request waited out the SIGSTOP
    assert all(j["verified"] is True for p in res["phases"] for j in p["jobs"] if j["kind"] == "blk")
    (nkill,) = by["net-kill"]["faults"]
    assert nkill["recovered_s"] is not None
    vm = res["vms"][0]
    assert len(vm["restarts"]) == 2


def test_a_1000_iops_limit_holds_and_a_2ms_delay_shows_in_ping(tmp_path):
    f = tmp_path / "imp.toml"
    f.write_text("""
[scenario]
name = "imp"
[[device]]
type = "blk"
name = "vda"
backend = "null"
size = "1G"
[[device]]
type = "net"
name = "net0"
[[phase]]
name = "clean"
duration = "2s"
[[phase.job]]
kind = "ping"
device = "net0"
interval = "5ms"
[[phase]]
name = "limited"
duration = "4s"
[[phase.job]]
kind = "blk"
device = "vda"
iodepth = 16
[[phase.job]]
kind = "ping"
device = "net0"
interval = "5ms"
[[phase.impair]]
device = "vda"
iops = 1000
[[phase.impair]]
device = "net0"
delay = "2ms"
""")
    res = run(str(f), 1.0, tmp_path / "out")
    assert res["ok"], res["errors"]
    blk = jobs(res, "limited")["vm0/blk-vda-0"]
    # The steady state (whole seconds after the first, which may spend the bucket's initial fill).
    steady = [t["rate"] for t in blk["timeline"][1:] if t["t"] <= blk["timeline"][-1]["t"] - 0.5]
    assert steady and abs(statistics.median(steady) - 1000) <= 50, blk["timeline"]
    clean = jobs(res, "clean")["vm0/ping-net0-0"]["summary"]["lat_us"]["p50"]
    delayed = jobs(res, "limited")["vm0/ping-net0-1"]["summary"]["lat_us"]["p50"]
    # Every ping waits 2 ms more; the p50s differ by that, give or take each phase's own noise.
    assert delayed >= 2000 and 1500 <= delayed - clean <= 4000


def test_an_impairment_survives_a_device_restart_within_its_phase(tmp_path):
    """The killed device process comes back unimpaired; the VM sets the phase's conditions again."""
    f = tmp_path / "kill.toml"
    f.write_text("""
[[device]]
type = "blk"
name = "vda"
backend = "null"
size = "64M"
[[phase]]
name = "limited"
duration = "4s"
[[phase.job]]
kind = "blk"
device = "vda"
iodepth = 8
[[phase.impair]]
device = "vda"
iops = 500
[[phase.fault]]
device = "vda"
action = "kill"
at = "0.5s"
""")
    res = run(str(f), 1.0, tmp_path / "out")
    assert res["ok"], res["errors"]
    (ph,) = res["phases"]
    (fault,) = ph["faults"]
    assert fault["new_pid"] != fault["old_pid"] and fault["recovered_s"] is not None
    (job,) = ph["jobs"]
    # Whole seconds after the restart settled: the limit holds again (a fresh bucket's fill aside).
    late = [t["rate"] for t in job["timeline"] if t["t"] >= ph["start_s"] + 2.5]
    assert late and all(r <= 500 * 1.1 for r in late[-1:]), job["timeline"]


def test_fio_offset_size_rate_iops_and_numjobs_mean_what_fio_says(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 8 << 20)
    f = tmp_path / "fio.toml"
    f.write_text(f"""
[[device]]
type = "blk"
name = "vda"
backend = "file:{img}"
size = "8M"
[[device]]
type = "blk"
name = "vdb"
backend = "null"
size = "64M"
[[phase]]
name = "p"
duration = "3s"
[[phase.job]]
name = "region"
kind = "blk"
device = "vda"
rw = "randwrite"
offset = "2M"
size = "1M"
iodepth = 4
verify = true
[[phase.job]]
name = "paced"
kind = "blk"
device = "vdb"
rate_iops = 300
numjobs = 2
iodepth = 4
""")
    res = run(str(f), 1.0, tmp_path / "out")
    assert res["ok"], res["errors"]
    jobs_ = jobs(res, "p")
    assert jobs_["vm0/region"]["verified"] is True and jobs_["vm0/region"]["write"]["ios"] > 50
    data = img.read_bytes()
    assert data[:2 << 20] == bytes(2 << 20) and data[3 << 20:] == bytes(5 << 20)   # nothing outside the region
    written = sum(1 for b in range(256) if data[(2 << 20) + b * 4096:(2 << 20) + (b + 1) * 4096] != bytes(4096))
    assert written > 50                                                               # and much inside it
    paced = jobs_["vm0/paced"]
    assert paced["blk"]["numjobs"] == 2
    assert abs(paced["summary"]["rate"] - 300) <= 30, paced["summary"]   # shared by the clones, as fio's
