"""``simvirt soak`` (issue 7): a short soak with device kills stays flat and error-free."""
from __future__ import annotations

import json
import subprocess
import sys

from simvirt.soak import Series, proc_sample


def test_short_soak_with_kills_is_flat_and_clean():
    out = subprocess.run([sys.executable, "-m", "simvirt", "soak", "--minutes", "0.4", "--kill-every", "4", "--json"],
                         capture_output=True, text=True, timeout=180)
    r = json.loads(out.stdout)
    assert r["ok"] is True, (r, out.stderr[-3000:])
    assert r["errors"] == 0 and r["verified"] is True
    assert len(r["kills"]) >= 2 and len(r["restarts"]) == len(r["kills"])
    judged = [p for p in r["processes"] if p.get("judged")]
    assert any(p["process"] == "driver" for p in judged)
    assert all(p["ok"] and p["fds_end"] <= p["fds_start"] for p in judged)
    assert out.returncode == 0


def test_judge_flags_growth_and_fd_leaks():
    steady = Series("x", 1, [(t, 100 << 20, 10) for t in range(0, 30)])
    assert steady.judge(5, 29, 0.1, 0)["ok"] is True
    growing = Series("x", 1, [(t, (100 + 2 * t) << 20, 10) for t in range(0, 30)])
    assert growing.judge(5, 29, 0.1, 0)["ok"] is False
    fds = Series("x", 1, [(t, 100 << 20, 10 + (t > 20)) for t in range(0, 30)])
    assert fds.judge(5, 29, 0.1, 0)["ok"] is False
    late = Series("x", 1, [(t, 100 << 20, 10) for t in range(10, 30)])
    assert late.judge(5, 29, 0.1, 0)["judged"] is False


def test_proc_sample_reads_this_process():
    import os
    rss, fds = proc_sample(os.getpid())
    assert rss > 1 << 20 and fds >= 3
    assert proc_sample(2**22 + 12345) is None
