"""The scenario commands as a user types them: listing, bad files, comparing two runs."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.scenario.test_report import make_job, make_phase, make_results


def simvirt(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvirt", *args], capture_output=True, text=True, timeout=timeout)


def test_list_shows_every_shipped_scenario_with_its_question():
    r = simvirt("run", "--list")
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == ["balloon-pressure", "blk-qd-sweep", "default", "device-crash", "event-idx-on-off",
                     "impaired-link", "net-throughput", "noisy-neighbour"]
    assert all(len(line.split()) > 3 for line in r.stdout.splitlines())


def test_a_bad_scenario_is_refused_before_anything_starts(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[[device]]\ntype = "blk"\nname = "vda"\n\n[[phase]]\nname = "p"\nduration = "1s"\n'
                 '[[phase.job]]\nkind = "blk"\ndevice = "vda"\niodepth = 0\n')
    r = simvirt("run", str(f), "--no-progress")
    assert r.returncode == 2
    assert f"{f}:11: phase[0].job[0].iodepth: expected an integer 1..256, got 0" in r.stderr
    r = simvirt("run", "no-such-scenario")
    assert r.returncode == 2 and "no-such-scenario" in r.stderr and "noisy-neighbour" in r.stderr


def test_machine_options_are_refused_for_scenarios():
    r = simvirt("run", "default", "--duration", "3")
    assert r.returncode == 2 and "--duration-scale" in r.stderr


def test_compare_two_runs(tmp_path):
    a = make_results(phases=[make_phase("p", [make_job("j", phase="p", rate=1000.0)])])
    b = make_results(phases=[make_phase("p", [make_job("j", phase="p", rate=1500.0)])])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    r = simvirt("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    (rate,) = [x for x in rows if x["metric"] == "rate"]
    assert rate["a"] == 1000.0 and rate["b"] == 1500.0 and rate["verdict"] == "better"
    r = simvirt("compare", str(tmp_path / "a.json"), str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "missing.json" in r.stderr
