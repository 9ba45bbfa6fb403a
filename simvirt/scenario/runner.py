"""``simvirt run SCENARIO``: start the VMs and switches, walk the timeline, gather results.

The runner owns no guest: each VM is its own driver process (``simvirt
vm``) with its own device processes; shared switches are started here,
because they belong to no single VM. Phases start at the same monotonic
instant in every VM, so timelines line up across them.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import tempfile
import time
from typing import Any, Optional

from prometheus_client import Gauge
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from simvirt import metrics
from simvirt.bench.procs import ChildExited, DeviceProcess, async_wait_for_path, free_port, spawn
from simvirt.control import arequest
from simvirt.devices.runner import stop_on_signals
from simvirt.machine.federate import machine_registry
from simvirt.scenario.spec import Scenario

SCENARIO_PHASE = Gauge("simvirt_scenario_phase", "1 while the phase runs, else 0 (mark phases in Grafana)",
                       ["scenario", "phase", "index"], registry=metrics.REGISTRY)
SCENARIO_PHASE_INDEX = Gauge("simvirt_scenario_phase_index", "Index of the running phase (-1 before and after)",
                             ["scenario"], registry=metrics.REGISTRY)

VM_START_TIMEOUT = 90.0


class ScenarioRunError(RuntimeError):
    pass


class VmProcess:
    """A ``simvirt vm`` child and its control socket."""

    def __init__(self, scenario_arg: str, name: str, workdir: str, scale: float, ports: dict[str, str]) -> None:
        self.name = name
        self.control = os.path.join(workdir, f"vm-{name}.ctl")
        self.log_path = os.path.join(workdir, f"vm-{name}.log")
        self.metrics_port = free_port()
        cmd = [sys.executable, "-m", "simvirt", "vm", scenario_arg, "--vm", name, "--control", self.control,
               "--scale", repr(scale), "--metrics-port", str(self.metrics_port)]
        for dev, path in ports.items():
            cmd += ["--port", f"{dev}={path}"]
        self.proc, self._log = spawn(cmd, log_path=self.log_path)

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    async def wait_ready(self, timeout: float = VM_START_TIMEOUT) -> None:
        try:
            await async_wait_for_path([self.control], self.proc, timeout, interval=0.05)
        except ChildExited as e:
            raise ScenarioRunError(f"VM {self.name} exited with {e.returncode} while starting:\n"
                                   f"{self.log_tail()}") from None
        except TimeoutError:
            raise ScenarioRunError(f"VM {self.name} did not come up in {timeout:.0f} s:\n{self.log_tail()}") from None

    async def request(self, msg: dict, timeout: float = 10.0) -> dict:
        reply = await arequest(self.control, msg, timeout=timeout)
        if not reply.get("ok"):
            raise ScenarioRunError(f"VM {self.name}: {msg['cmd']} failed: {reply.get('error')}")
        reply.pop("ok")
        return reply

    async def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                await self.request({"cmd": "quit"}, timeout=5)
            except (OSError, ScenarioRunError, asyncio.TimeoutError):
                self.proc.terminate()
            for _ in range(300):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


class ScenarioRun:
    def __init__(self, scenario: Scenario, scenario_arg: str, scale: float, console: Console) -> None:
        self.s = scenario
        self.arg = scenario_arg
        self.scale = scale
        self.console = console
        self.workdir = tempfile.mkdtemp(prefix=f"simvirt-scenario-{scenario.name}-")
        self.switches: dict[str, DeviceProcess] = {}
        self.vms: dict[str, VmProcess] = {}
        self.live_rates: dict[str, dict[str, float]] = {}
        self.interrupted = asyncio.Event()   # SIGINT/SIGTERM: end the running phase now, run no more

    def _start_switches(self) -> dict[str, dict[str, str]]:
        """One switch process per name, one socket per port; returns vm -> {device: socket}."""
        ports: dict[str, dict[str, str]] = {}
        others: dict[str, list[str]] = {}
        for name, members in self.s.switches().items():
            socks = [os.path.join(self.workdir, f"sw-{name}-{vm}-{dev}.sock") for vm, dev in members]
            extra: list[str] = ["--backend", f"switch:{name}", "--vm", self.s.name, "--name", f"switch-{name}"]
            for sock in socks[1:]:
                extra += ["--socket", sock]
            log = os.path.join(self.workdir, f"switch-{name}.log")
            self.switches[name] = DeviceProcess("net", extra, socket_path=socks[0], log_path=log)
            others[name] = socks[1:]
            for (vm, dev), sock in zip(members, socks):
                ports.setdefault(vm, {})[dev] = sock
        for name, proc in self.switches.items():
            try:
                proc.wait_ready(also=others[name])
            except (RuntimeError, TimeoutError) as e:
                raise ScenarioRunError(f"switch {name}: {e}") from None
        return ports

    async def start(self) -> list[dict]:
        ports = self._start_switches()
        for vm in self.s.vms:
            self.vms[vm.name] = VmProcess(self.arg, vm.name, self.workdir, self.scale, ports.get(vm.name, {}))
        await asyncio.gather(*(v.wait_ready() for v in self.vms.values()))
        infos = [await v.request({"cmd": "info"}) for v in self.vms.values()]
        for info in infos:
            devs = ", ".join(f"{d['name']}({d['type']}"
                             f"{', pid ' + str(d['pid']) if d['pid'] else ', shared switch port'})"
                             for d in info["devices"])
            self.console.log(f"VM {info['vm']} (pid {info['pid']}): {devs}")
        return [{"name": i["vm"], "pid": i["pid"], "devices": i["devices"]} for i in infos]

    def metric_targets(self) -> dict[str, str]:
        return {f"vm-{name}": f"http://127.0.0.1:{v.metrics_port}/metrics" for name, v in self.vms.items()}

    async def run_phases(self, t0: float, live: Optional[Live], progress: Optional[Progress], done: list[dict]) -> None:
        """Every phase in order until the run is interrupted, each result appended to ``done`` as it
        ends (so a later phase's failure keeps the earlier ones)."""
        for i in range(len(self.s.phases)):
            if self.interrupted.is_set():
                break
            done.append(await self.run_phase(i, t0, live, progress))

    async def run_phase(self, index: int, t0: float, live: Optional[Live], progress: Optional[Progress]) -> dict:
        phase = self.s.phases[index]
        start = time.monotonic() + 0.1
        labels = (self.s.name, phase.name, str(index))
        await asyncio.gather(*(v.request({"cmd": "phase", "index": index, "t0": t0, "start": start})
                               for v in self.vms.values()))
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        SCENARIO_PHASE.labels(*labels).set(1)
        SCENARIO_PHASE_INDEX.labels(self.s.name).set(index)
        task = progress.add_task(phase.name, total=phase.duration) if progress is not None else None
        if progress is None:
            self.console.log(f"phase {index + 1}/{len(self.s.phases)} '{phase.name}': {phase.duration:g} s")
        results = [asyncio.ensure_future(v.request({"cmd": "result", "index": index},
                                                   timeout=phase.duration + 120)) for v in self.vms.values()]
        last: dict[str, tuple[float, int, int]] = {}
        self.live_rates.clear()           # this phase's jobs only
        halted = False
        try:
            while not all(r.done() for r in results):
                await asyncio.wait(results, timeout=0.5)
                if self.interrupted.is_set() and not halted:
                    halted = True
                    self.console.log(f"[yellow]stopping: phase '{phase.name}' ends now[/]")
                    await asyncio.gather(*(v.request({"cmd": "halt", "index": index}) for v in self.vms.values()),
                                         return_exceptions=True)
                if live is not None and progress is not None and task is not None:
                    progress.update(task, completed=min(phase.duration, time.monotonic() - start))
                    await self._poll_rates(last)
                    live.update(self._live_view(progress, phase.name))
        finally:
            SCENARIO_PHASE.labels(*labels).set(0)
        if progress is not None and task is not None:
            progress.update(task, completed=phase.duration)
        jobs: list[dict] = []
        faults: list[dict] = []
        errors: list[str] = []
        for vm, r in zip(self.vms, results):
            try:
                out = r.result()
            except (OSError, ScenarioRunError, asyncio.TimeoutError) as e:
                errors.append(f"VM {vm}: phase {phase.name}: {e}")
                continue
            jobs += out["jobs"]
            faults += out["faults"]
            errors += [f"VM {vm}: {e}" for e in out["errors"]]
        # Errors are the point where a phase injects them (loss, I/O errors, faults): not failures.
        # A rate limit drops what overflows its queue, as netem's does.
        expected = {(i.vm, i.device) for i in phase.impairments
                    if getattr(i, "loss", 0) or getattr(i, "error_rate", 0) or getattr(i, "rate", None)}
        expected |= {(f.vm, f.device) for f in phase.faults}
        for j in jobs:
            j["expect_errors"] = (j["vm"], j["device"]) in expected
        imps = [{"vm": i.vm, "device": i.device, **{k: v for k, v in vars(i).items() if k not in ("vm", "device")}}
                for i in phase.impairments]
        return {"name": phase.name, "index": index, "start_s": round(start - t0, 3),
                "duration_s": phase.duration, "stopped_early": halted, "impairments": imps, "faults": faults, "jobs": jobs,
                "errors": errors}

    async def _poll_rates(self, last: dict[str, tuple[float, int, int]]) -> None:
        now = time.monotonic()
        for vm, v in self.vms.items():
            try:
                st = await v.request({"cmd": "status"}, timeout=2)
            except (OSError, ScenarioRunError, asyncio.TimeoutError):
                continue
            for job, c in st["jobs"].items():
                key = f"{vm}/{job}"
                t, ops, nbytes = last.get(key, (now, c["ops"], c["bytes"]))
                el = max(now - t, 1e-6)
                if now > t:
                    self.live_rates[key] = {"rate": (c["ops"] - ops) / el, "mbs": (c["bytes"] - nbytes) / el / 1e6,
                                            "ops": c["ops"], "errors": c["errors"]}
                last[key] = (now, c["ops"], c["bytes"])

    def _live_view(self, progress: Progress, phase: str) -> Group:
        t = Table(title=f"phase '{phase}': live figures", expand=False)
        for col in ("vm/job", "rate/s", "MB/s", "done", "errors"):
            t.add_column(col, justify="left" if col == "vm/job" else "right")
        for key, r in sorted(self.live_rates.items()):
            t.add_row(key, f"{r['rate']:,.0f}", f"{r['mbs']:,.1f}", f"{r['ops']:,}", str(r["errors"]))
        return Group(progress, t)

    async def stop(self) -> None:
        await asyncio.gather(*(v.stop() for v in self.vms.values()), return_exceptions=True)
        for sw in self.switches.values():
            sw.stop()


async def run_scenario(scenario: Scenario, scenario_arg: str, *, scale: float = 1.0, console: Console,
                       progress: bool = True, metrics_port: Optional[int] = None,
                       metrics_addr: str = "127.0.0.1") -> dict[str, Any]:
    """Run every phase in order; the results dict of docs/scenarios.md."""
    run = ScenarioRun(scenario, scenario_arg, scale, console)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    SCENARIO_PHASE_INDEX.labels(scenario.name).set(-1)
    errors: list[str] = []
    phases: list[dict] = []
    vms: list[dict] = []
    t0 = time.monotonic()
    stop_on_signals(asyncio.get_running_loop(), run.interrupted)
    try:
        vms = await run.start()
        if metrics_port is not None:
            bound = metrics.serve(metrics_port, metrics_addr,
                                  registry=machine_registry(metrics.REGISTRY, run.metric_targets()))
            console.log(f"metrics for the whole scenario on http://{metrics_addr}:{bound}/metrics")
        t0 = time.monotonic()
        prog = None
        if progress:
            prog = Progress(TextColumn("{task.description:>16}"), BarColumn(), TextColumn("{task.completed:>5.1f}/"
                            "{task.total:g} s"), TimeRemainingColumn(), console=console)
            with Live(run._live_view(prog, "-"), console=console, refresh_per_second=4) as live:
                await run.run_phases(t0, live, prog, phases)
        else:
            await run.run_phases(t0, None, None, phases)
        for v in run.vms.values():
            info = await v.request({"cmd": "info"})
            for vm in vms:
                if vm["name"] == info["vm"]:
                    vm["restarts"] = info["restarts"]
    except ScenarioRunError as e:
        errors.append(str(e))
    finally:
        SCENARIO_PHASE_INDEX.labels(scenario.name).set(-1)
        await run.stop()
    for ph in phases:
        errors += ph.pop("errors")
    ok = not errors and all(_job_ok(j) for ph in phases for j in ph["jobs"])
    return {"scenario": scenario.name, "description": scenario.description, "source": scenario.source,
            "seed": scenario.seed, "duration_scale": scale, "started": started,
            "elapsed_s": round(time.monotonic() - t0, 2), "vms": vms, "phases": phases,
            "stopped_early": run.interrupted.is_set(), "ok": ok, "errors": errors}


_NET_KINDS = ("ping", "udp-rr", "tx", "rx")


def _job_ok(job: dict) -> bool:
    """Did the job work as designed?

    Storage: any error the phase did not inject, or data that does not
    verify, is a failure. Networks lose packets by nature (a flood, a full
    queue): loss is a measurement, reported, and fails a job only when
    nothing got through at all where nothing was injected.
    """
    if job.get("verified") is False:
        return False
    if job.get("expect_errors", False):
        return True
    if job["kind"] in _NET_KINDS:
        return job["summary"]["rate"] > 0
    return not job["summary"]["errors"]
