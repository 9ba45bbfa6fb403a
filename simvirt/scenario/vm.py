"""One scenario VM as its own driver process: guest RAM, drivers, device processes, jobs.

Each VM of a scenario is a separate OS process, as each guest is a separate
QEMU: a noisy neighbour competes for CPU the way a real one does, not for
one Python interpreter. The runner starts ``simvirt vm``, and drives it
through a msgpack control socket:

- ``info``: devices and their pids;
- ``phase {index, t0, start}``: run phase ``index`` from monotonic time
  ``start`` (the runner's clock is the system's CLOCK_MONOTONIC, shared by
  all processes), timeline times relative to ``t0``;
- ``status``: live counters per job, for progress displays;
- ``result {index}``: waits for the phase to end, then its job results;
- ``halt {index}``: end the phase now (the run was interrupted): jobs wind
  down at their next step, verification still runs;
- ``quit``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from typing import Any, Optional

from rich.console import Console

from simvirt import metrics
from simvirt.control import ControlError, arequest, serve_control
from simvirt.devices.runner import install_uvloop, sleep_until, watch_parent
from simvirt.machine.config import MachineConfig
from simvirt.machine.federate import machine_registry
from simvirt.machine.run import Machine
from simvirt.scenario.jobs import JobRunner, make_runner
from simvirt.scenario.parse import load_scenario
from simvirt.scenario.spec import BlkImpairment, Fault, Impairment, NetImpairment, Phase, Scenario, VmSpec

SAMPLE_S = 1.0


def impair_request(imp: Impairment) -> dict[str, Any]:
    """The device control command for an impairment (the same fields, minus where it applies)."""
    if isinstance(imp, NetImpairment):
        return {"cmd": "impair", "delay": imp.delay, "jitter": imp.jitter, "loss": imp.loss, "rate": imp.rate,
                "direction": imp.direction}
    assert isinstance(imp, BlkImpairment)
    return {"cmd": "impair", "latency": imp.latency, "iops": imp.iops, "iops_burst": imp.iops_burst,
            "bandwidth": imp.bandwidth, "bandwidth_burst": imp.bandwidth_burst, "error_rate": imp.error_rate}


class PhaseRun:
    """One phase's work in this VM: runners, impairments, faults, the per-second timeline."""

    def __init__(self, vm: "VmHost", index: int, phase: Phase, t0: float, start: float) -> None:
        self.vm = vm
        self.index = index
        self.phase = phase
        self.t0 = t0
        self.start = start
        self.end = start + phase.duration
        self.runners: list[JobRunner] = []
        self.timelines: dict[str, list[dict]] = {}
        self.faults: list[dict] = []
        self.errors: list[str] = []
        self.task: Optional[asyncio.Task] = None
        self.halted = asyncio.Event()

    def halt(self) -> None:
        """End the phase early: every runner, the sampler and the faults stop waiting for ``end``."""
        self.halted.set()
        self.end = min(self.end, time.monotonic())
        for r in self.runners:
            r.halt()

    async def _until(self, t: float) -> None:
        """Sleep until monotonic ``t``, or less if the phase is halted meanwhile."""
        await sleep_until(t, self.halted)

    def mine(self, items: list) -> list:
        return [x for x in items if x.vm == self.vm.spec.name]

    async def run(self) -> dict:
        await self._until(self.start)
        m = self.vm.machine
        impaired = []
        for imp in self.mine(self.phase.impairments):
            await self._impair(imp.device, impair_request(imp))
            impaired.append(imp.device)
        for i, job in enumerate(self.mine(self.phase.jobs)):
            try:
                self.runners.append(make_runner(job, m, self.start, self.phase.duration, i))
            except (ValueError, RuntimeError, OSError) as e:
                self.errors.append(f"{job.name}: {e}")
        for r in self.runners:
            self.timelines[r.spec.name] = []
            if self.halted.is_set():
                r.halt()
        sampler = asyncio.ensure_future(self._sample())
        fault_tasks = [asyncio.ensure_future(self._fault(f)) for f in self.mine(self.phase.faults)]
        outcomes = await asyncio.gather(*(r.run(self.end) for r in self.runners), return_exceptions=True)
        for r, out in zip(self.runners, outcomes):
            if isinstance(out, BaseException):
                r.errors += 1
                self.errors.append(f"{r.spec.name}: {type(out).__name__}: {out}")
        await asyncio.gather(*fault_tasks)
        await sampler
        for dev in impaired:
            await self._impair(dev, {"cmd": "impair"})
        jobs = []
        for r in self.runners:
            r.refresh()
            jobs.append({"name": r.spec.name, "phase": self.phase.name, "vm": self.vm.spec.name,
                         "device": getattr(r.spec, "device", None), "kind": r.spec.kind, **r.result(),
                         "timeline": self.timelines[r.spec.name]})
            r.close()
        return {"jobs": jobs, "faults": self.faults, "errors": self.errors}

    async def _impair(self, device: str, req: dict) -> None:
        path = self.vm.machine.controls.get(device)
        if path is None:
            self.errors.append(f"{device}: no control socket for impairments")
            return
        reply = await arequest(path, req)
        if not reply.get("ok"):
            self.errors.append(f"{device}: impairment refused: {reply.get('error')}")

    async def _reimpair(self, device: str, old_pid: int) -> None:
        """A restarted device process starts unimpaired: give it the phase's conditions again."""
        imps = [i for i in self.mine(self.phase.impairments) if i.device == device]
        path = self.vm.machine.controls.get(device)
        if not imps or path is None:
            return
        m = self.vm.machine
        while time.monotonic() < self.end:
            if m.procs[device].proc.pid != old_pid and os.path.exists(path):
                await self._impair(device, impair_request(imps[0]))
                return
            await asyncio.sleep(0.01)

    # -- timeline ---------------------------------------------------------
    async def _sample(self) -> None:
        self._last = {r.spec.name: (0, 0, r.latency().snapshot()) for r in self.runners}
        self._last_t = self.start
        k = 1
        # Whole seconds, then the phase end itself: work after it (verification reads) is not load.
        while self.start + k * SAMPLE_S < self.end - 0.05:
            await self._until(self.start + k * SAMPLE_S)
            self._take_sample(time.monotonic())
            k += 1
        await self._until(self.end)
        self._take_sample(time.monotonic())

    def _take_sample(self, now: float) -> None:
        dt = now - self._last_t
        if dt < 1e-3:
            return
        for r in self.runners:
            r.refresh()
            ops0, bytes0, snap = self._last[r.spec.name]
            h = r.latency()
            p50, p99 = h.quantile_since(snap, 0.5), h.quantile_since(snap, 0.99)
            self.timelines[r.spec.name].append({
                "t": round(now - self.t0, 3), "rate": round((r.ops - ops0) / dt, 1),
                "bw_bytes": round((r.nbytes - bytes0) / dt, 1),
                "lat_p50_us": None if p50 is None else round(p50 / 1000, 2),
                "lat_p99_us": None if p99 is None else round(p99 / 1000, 2)})
            self._last[r.spec.name] = (r.ops, r.nbytes, h.snapshot())
        self._last_t = now

    # -- faults -----------------------------------------------------------
    async def _fault(self, f: Fault) -> None:
        m = self.vm.machine
        await self._until(self.start + f.at)
        if self.halted.is_set():
            return              # the phase ended before the fault was due
        proc = m.procs.get(f.device)
        out: dict[str, Any] = {"vm": f.vm, "device": f.device, "action": f.action,
                               "at_s": round(time.monotonic() - self.start, 3), "old_pid": None, "new_pid": None,
                               "recovered_s": None, "guest_saw": {"errors": 0, "max_lat_us": 0.0, "stall_s": None}}
        self.faults.append(out)
        if proc is None:
            self.errors.append(f"fault: {f.device} has no device process of this VM")
            return
        affected = [r for r in self.runners if getattr(r.spec, "device", None) == f.device]
        for r in affected:
            r.refresh()
        before = [(r.ops, r.errors) for r in affected]
        max_before = [r.max_latency_ns() for r in affected]
        pid = out["old_pid"] = proc.proc.pid
        t_fault = time.monotonic()
        if f.action == "kill":
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGSTOP)
            try:
                await self._until(time.monotonic() + f.duration)
            finally:
                os.kill(pid, signal.SIGCONT)
        # Recovered when every job on the device completes something after the fault.
        progressed = [False] * len(affected)
        while affected and time.monotonic() < self.end and not all(progressed):
            for i, r in enumerate(affected):
                r.refresh()
                progressed[i] = progressed[i] or r.ops > before[i][0]
            if all(progressed):
                break
            await asyncio.sleep(0.005)
        if affected and all(progressed):
            out["recovered_s"] = out["guest_saw"]["stall_s"] = round(time.monotonic() - t_fault, 3)
        if f.action == "kill":
            await self._reimpair(f.device, pid)
        await self._until(self.end)
        out["new_pid"] = m.procs[f.device].proc.pid
        saw = out["guest_saw"]
        for r, (_, err0), mx0 in zip(affected, before, max_before):
            r.refresh()
            saw["errors"] += r.errors - err0
            mx = r.max_latency_ns()
            if mx > mx0:
                saw["max_lat_us"] = max(saw["max_lat_us"], round(mx / 1000, 1))


class VmHost:
    """The VM process: one Machine (guest RAM, drivers, devices) plus the phases it is told to run."""

    def __init__(self, scenario: Scenario, spec: VmSpec, external: dict[str, str], console: Console) -> None:
        self.scenario = scenario
        self.spec = spec
        cfg = MachineConfig(name=spec.name, ram=spec.ram, devices=spec.devices, source=scenario.source)
        self.machine = Machine(cfg, console, external=external, device_controls=True)
        self.phases: dict[int, PhaseRun] = {}
        self.quit = asyncio.Event()

    async def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        m = self.machine
        if cmd == "info":
            return {"vm": self.spec.name, "pid": os.getpid(),
                    "devices": [{"name": d.name, "type": d.type, "backend": getattr(d, "backend", None),
                                 "pid": m.procs[d.name].proc.pid if d.name in m.procs else None}
                                for d in self.spec.devices],
                    "restarts": m.restart_log}
        if cmd == "phase":
            idx = int(req["index"])
            if not 0 <= idx < len(self.scenario.phases):
                raise ControlError(f"no phase {idx}")
            run = PhaseRun(self, idx, self.scenario.phases[idx], float(req["t0"]), float(req["start"]))
            run.task = asyncio.ensure_future(run.run())
            self.phases[idx] = run
            return {}
        if cmd == "status":
            out = {}
            for idx, run in self.phases.items():
                if run.task is not None and not run.task.done():
                    for r in run.runners:
                        r.refresh()
                        out[r.spec.name] = {"ops": r.ops, "bytes": r.nbytes, "errors": r.errors}
            return {"jobs": out}
        if cmd == "result":
            run = self.phases.get(int(req["index"]))
            if run is None or run.task is None:
                raise ControlError(f"phase {req.get('index')} was not started")
            return await run.task
        if cmd == "halt":
            run = self.phases.get(int(req["index"]))
            if run is None:
                raise ControlError(f"phase {req.get('index')} was not started")
            run.halt()
            return {}
        if cmd == "quit":
            self.quit.set()
            return {}
        raise ControlError(f"unknown command {cmd!r}")


async def serve_vm(scenario: Scenario, vm_name: str, control: str, external: dict[str, str],
                   metrics_port: Optional[int]) -> None:
    loop = asyncio.get_running_loop()
    spec = next((v for v in scenario.vms if v.name == vm_name), None)
    if spec is None:
        raise ValueError(f"scenario {scenario.name!r} has no VM {vm_name!r}")
    console = Console(stderr=True)
    host = VmHost(scenario, spec, external, console)
    metrics.mark_process(spec.name, "driver")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, host.quit.set)
    # A runner killed hard cannot stop its VMs: they go when it does (and take their devices along).
    parent_gone = loop.create_future()
    parent_gone.add_done_callback(lambda _f: host.quit.set())
    parent_fd = watch_parent(loop, parent_gone)
    m = host.machine
    supervisor = None
    server = None
    try:
        m.start(loop)
        supervisor = asyncio.ensure_future(m.supervise())
        if metrics_port is not None:
            metrics.serve(metrics_port, "127.0.0.1", registry=machine_registry(metrics.REGISTRY, m.metric_targets))
        server = await serve_control(control, host.handle)
        await host.quit.wait()
    finally:
        m.stopping = True
        if supervisor is not None:
            supervisor.cancel()
        if server is not None:
            server.close()
        if parent_fd is not None:
            loop.remove_reader(parent_fd)
            os.close(parent_fd)
        await m.aclose()
        m.stop()


def vm_main(args: argparse.Namespace) -> int:
    install_uvloop()
    scenario = load_scenario(args.scenario)
    if args.scale != 1.0:
        scenario = scenario.scaled(args.scale)
    external = {}
    for item in args.port or []:
        name, _, path = item.partition("=")
        if not name or not path:
            raise ValueError(f"--port {item!r}: expected DEVICE=SOCKET")
        external[name] = path
    asyncio.run(serve_vm(scenario, args.vm, args.control, external, args.metrics_port))
    return 0
