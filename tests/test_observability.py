"""Observability end to end: a real Prometheus server scrapes `simvirt run` with
docker/prometheus.yml's job settings, every dashboard expression returns data,
the compose file validates, and `simvirt top` draws a screen under a pty."""
from __future__ import annotations

from pathlib import Path
import json
import os
import pathlib
import pty
import re
import select
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from simvirt.bench.procs import free_port
from tests.conftest import require_tool

# The default machine config (simvirt run with no argument runs the default scenario instead).
MACHINE = str(Path(__file__).resolve().parents[1] / "configs" / "machine.toml")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _dashboard_exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((ROOT / "dashboards").glob("*.json")):
        d = json.loads(path.read_text())
        for panel in d["panels"]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], target["expr"]))
    return out


@pytest.fixture(scope="module")
def machine():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "simvirt", "run", MACHINE, "--duration", "60", "--no-progress",
                             "--metrics-port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "simvirt run did not serve metrics"
            time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(30)


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


@pytest.mark.interop
def test_prometheus_scrapes_the_machine_and_every_dashboard_query_has_data(machine, tmp_path):
    prometheus = require_tool("prometheus")
    cfg = (ROOT / "docker" / "prometheus.yml").read_text()
    assert '"simvirt:9300"' in cfg
    (tmp_path / "prometheus.yml").write_text(cfg.replace('"simvirt:9300"', f'"127.0.0.1:{machine}"'))
    pport = free_port()
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=open(tmp_path / "prom.log", "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{pport}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.loads(urllib.request.urlopen(f"{base}/api/v1/targets", timeout=2).read())
                active = targets["data"]["activeTargets"]
                if active and all(t["health"] == "up" for t in active):
                    break
            except OSError:
                pass
            assert prom.poll() is None and time.monotonic() < deadline, (tmp_path / "prom.log").read_text()[-3000:]
            time.sleep(0.5)
        assert active[0]["labels"]["job"] == "simvirt"
        exprs = _dashboard_exprs()
        assert len(exprs) >= 25
        missing = exprs
        deadline = time.monotonic() + 60
        while missing and time.monotonic() < deadline:
            time.sleep(2)
            missing = [e for e in missing if not (r := _query(base, e[2]))["status"] == "success"
                       or not r["data"]["result"]]
        assert not missing, f"dashboard queries with no data: {missing}"
    finally:
        prom.terminate()
        prom.wait(30)


@pytest.mark.interop
def test_compose_file_validates():
    compose = require_tool("docker-compose")
    out = subprocess.run([compose, "-f", str(ROOT / "docker" / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for service in ("simvirt:", "prometheus:", "grafana:"):
        assert service in out.stdout
    assert "shm_size" in out.stdout


def test_simvirt_top_draws_devices_queues_and_balloon_under_a_pty(machine):
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["COLUMNS"] = "120"
        os.environ["LINES"] = "50"
        os.execvp(sys.executable, [sys.executable, "-m", "simvirt", "top", "--port", str(machine),
                                   "--iterations", "3", "--interval", "0.7"])
    chunks = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    os.waitpid(pid, 0)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    for word in ("simvirt top", "vda", "vdb", "net0", "req/s", "virtqueues", "balloon balloon0", "errors/s"):
        assert word in screen, f"{word!r} not on the screen:\n{screen[-3000:]}"
    assert re.search(r"vdb\s+│\s+read\s+│\s+[\d.]+k?", screen), screen[-3000:]
