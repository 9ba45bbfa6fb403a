"""The ``simvirt`` command line: bench JSON output, argument errors, device lifecycle."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from simvirt.cli import build_parser, main


def simvirt(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvirt", *args], capture_output=True, text=True, timeout=timeout)


BENCH = ["bench", "blk", "--backend", "memory", "--size", "16M", "--rw", "randrw", "--bs", "4K", "--iodepth", "8",
         "--runtime", "1", "--json"]


def _one_json(stdout: str) -> dict:
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_bench_blk_verify_json():
    r = simvirt(*BENCH, "--verify")
    assert r.returncode == 0, r.stderr
    out = _one_json(r.stdout)
    assert out["errors"] == 0 and out["verified"] is True
    assert out["iops"] > 0 and out["bw_bytes"] == pytest.approx(out["iops"] * 4096, rel=0.01)
    assert 0 < out["lat_us"]["p50"] <= out["lat_us"]["p99"] <= out["lat_us"]["max"]
    assert out["rw"] == "randrw" and out["bs"] == 4096 and out["iodepth"] == 8 and out["size"] == 16 << 20
    assert out["verify"]["mismatches"] == 0 and out["verify"]["reads_checked"] > 0
    assert out["verify"]["blocks_read_back"] > 0 and out["verify"]["read_back_mismatches"] == 0


def test_bench_blk_without_verify_reports_null():
    r = simvirt(*[a if a != "1" else "0.5" for a in BENCH])
    assert r.returncode == 0, r.stderr
    out = _one_json(r.stdout)
    assert out["verified"] is None and out["verify"] is None and out["errors"] == 0 and out["ios"] > 0


def test_bench_verify_zeroes_catches_a_backend_that_returns_garbage():
    # The null backend leaves read buffers untouched, so "reads return zeros" must fail.
    r = simvirt("bench", "blk", "--backend", "null", "--size", "1M", "--rw", "randread", "--runtime", "0.3",
                "--verify", "zeroes", "--json")
    assert r.returncode == 1
    out = _one_json(r.stdout)
    assert out["verified"] is False and out["verify"]["mismatches"] > 0
    r = simvirt("bench", "blk", "--backend", "memory", "--size", "1M", "--rw", "randread", "--runtime", "0.3",
                "--verify", "zeroes", "--json")
    assert r.returncode == 0 and _one_json(r.stdout)["verified"] is True


@pytest.mark.parametrize("argv,needle", [
    (["bench", "blk", "--size", "12Q"], "invalid size '12Q'"),
    (["bench", "blk", "--bs", "four"], "invalid size 'four'"),
    (["bench", "blk", "--iodepth", "0"], "must be positive"),
    (["device", "blk", "--socket", "/tmp/x.sock"], "one of the arguments --image --null --memory is required"),
    (["device", "blk", "--socket", "/tmp/x.sock", "--memory", "1M", "--null", "1M"], "not allowed with"),
    (["device", "blk", "--memory", "1M"], "--socket"),
    (["device", "blk", "--socket", "/tmp/x.sock", "--memory", "lots"], "invalid size 'lots'"),
    (["device", "blk", "--socket", "/tmp/x.sock", "--memory", "1M", "--num-queues", "0"], "must be positive"),
    ([], "required"),
])
def test_argument_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    assert needle in capsys.readouterr().err


def test_bench_bad_block_size_is_a_clean_error():
    r = simvirt("bench", "blk", "--backend", "memory", "--size", "1M", "--bs", "1000", "--runtime", "0.1")
    assert r.returncode == 2
    assert "simvirt: error: --bs must be a positive multiple of 512" in r.stderr
    assert "Traceback" not in r.stderr


def test_bench_unknown_backend():
    r = simvirt("bench", "blk", "--backend", "tape", "--runtime", "0.1")
    assert r.returncode == 2 and "unknown backend 'tape'" in r.stderr and "Traceback" not in r.stderr


def test_device_smaller_than_a_sector():
    with tempfile.TemporaryDirectory() as d:
        r = simvirt("device", "blk", "--socket", os.path.join(d, "s"), "--memory", "100")
    assert r.returncode == 2 and "smaller than one sector" in r.stderr


def test_parser_defaults():
    a = build_parser().parse_args(["device", "blk", "--socket", "s", "--memory", "16M"])
    assert (a.memory, a.num_queues, a.seg_max, a.size_max, a.serial, a.readonly) == (16 << 20, 1, 254, 1 << 20, "simvirt", False)


def test_device_runs_until_sigterm_and_cleans_up():
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "blk.sock")
        p = subprocess.Popen([sys.executable, "-m", "simvirt", "device", "blk", "--socket", sock, "--memory", "1M"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                assert p.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            p.send_signal(signal.SIGTERM)
            assert p.wait(10) == 0
            assert not os.path.exists(sock)  # the listening socket is removed
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
