"""``simvirt run``: start the device processes a config names, drive them, report.

This process is the guest: it owns guest RAM (one named shared-memory
segment that every device process maps through vhost-user), runs one
virtio-blk driver per disk, and runs the configured workloads on them with
a live progress display and a summary at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from typing import Callable, Optional

from rich.console import Console
from rich.live import Live
from rich.table import Table

from simvirt import metrics
from simvirt.bench.blk import BlkBenchOptions, BlkWorkload, prefill, readback
from simvirt.bench.procs import ChildExited, DeviceProcess, async_wait_for_path, free_port, stop_children
from simvirt.bench.stats import percentiles_us
from simvirt.devices.runner import install_uvloop, sleep_until, stop_on_signals
from simvirt.drivers.blk import VirtioBlkDriver
from simvirt.drivers.transport import VhostUserTransport
from simvirt.control import ControlError, arequest, serve_control
from simvirt.drivers.balloon import VirtioBalloonDriver
from simvirt.drivers.net import VirtioNetDriver
from simvirt.drivers.netstack import GuestStack
from simvirt.machine.config import (
    BalloonDeviceConfig,
    BalloonWorkloadConfig,
    BlkDeviceConfig,
    MachineConfig,
    NetDeviceConfig,
    NetWorkloadConfig,
    load_config,
)
from simvirt.net.packets import ip_bytes
from simvirt.scenario.jobs import TxRunner
from simvirt.scenario.spec import StreamJob
from simvirt.machine.federate import machine_registry
from simvirt.memory import GuestMemory, PageAllocator
from simvirt.sizes import format_size
from simvirt.drivers.balloon import WANTED_FEATURES as BALLOON_FEATURES
from simvirt.drivers.blk import WANTED_FEATURES as BLK_FEATURES
from simvirt.drivers.net import WANTED_FEATURES as NET_FEATURES
from simvirt.virtio.spec import VIRTIO_F_EVENT_IDX, bit


def _features(wanted: int, event_idx: bool) -> int:
    """A driver's feature wish list, without VIRTIO_F_EVENT_IDX when the config turns it off."""
    return wanted if event_idx else wanted & ~bit(VIRTIO_F_EVENT_IDX)


class Machine:
    def __init__(self, cfg: MachineConfig, console: Console, *, external: Optional[dict[str, str]] = None,
                 device_controls: bool = False) -> None:
        """``external``: net devices served by a process someone else runs (a shared switch port),
        by name -> socket path. ``device_controls``: give blk and net device processes a control
        socket (impairments, streams) at ``controls[name]``."""
        self.cfg = cfg
        self.external = external or {}
        self.device_controls = device_controls
        self.controls: dict[str, str] = {}
        self.net_backends: dict[str, str] = {}
        self.console = console
        self.workdir = tempfile.mkdtemp(prefix=f"simvirt-{cfg.name}-")
        self.procs: dict[str, DeviceProcess] = {}
        self.drivers: dict[str, VirtioBlkDriver] = {}
        self.balloon: Optional[VirtioBalloonDriver] = None
        self.nets: dict[str, GuestStack] = {}
        self.balloon_ctl: Optional[str] = None
        self.metric_targets: dict[str, str] = {}
        self.mem: Optional[GuestMemory] = None
        self.alloc: Optional[PageAllocator] = None
        # How each device process was started (kind, args, socket, log), to start it again.
        self.specs: dict[str, tuple[str, list[str], str, str]] = {}
        self.restarts: dict[str, int] = {}
        self.restart_log: list[dict] = []
        self.balloon_target: Optional[int] = None
        self.stopping = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.cfg
        self.mem = GuestMemory.create_shared(cfg.ram, name=f"simvirt-{cfg.name}-{os.getpid()}")
        self.alloc = PageAllocator(0, cfg.ram)
        for dev in cfg.devices:
            if isinstance(dev, NetDeviceConfig):
                self.net_backends[dev.name] = dev.backend.split(":", 1)[0]
            if dev.name in self.external:
                continue
            port = free_port()
            sock = os.path.join(self.workdir, f"{dev.name}.sock")
            extra = []
            if isinstance(dev, BalloonDeviceConfig) or self.device_controls:
                ctl = self.controls[dev.name] = os.path.join(self.workdir, f"{dev.name}.ctl")
                extra = ["--control", ctl]
                if isinstance(dev, BalloonDeviceConfig):
                    self.balloon_ctl = ctl
            if isinstance(dev, BlkDeviceConfig) and dev.backend == "scratch":
                # A disk image that outlives device restarts (a memory disk dies with its process).
                with open(dev.scratch_path(self.workdir), "wb") as f:
                    f.truncate(dev.size)
            args = (dev.device_args(self.workdir) if isinstance(dev, BlkDeviceConfig) else dev.device_args()) + extra
            args += ["--vm", cfg.name, "--name", dev.name, "--metrics-port", str(port)]
            log_path = os.path.join(self.workdir, f"{dev.name}.log")
            self.specs[dev.name] = (dev.type, args, sock, log_path)
            self.procs[dev.name] = DeviceProcess(dev.type, args, socket_path=sock, log_path=log_path)
            self.metric_targets[f"device-{dev.name}"] = f"http://127.0.0.1:{port}/metrics"
        for dev in cfg.devices:
            sock = self.external.get(dev.name) or self.procs[dev.name].wait_ready()
            if isinstance(dev, NetDeviceConfig):
                # Inflight tracking here makes a device restart at-most-once for frames (no duplicates).
                ndrv = VirtioNetDriver(VhostUserTransport(sock, self.mem, self.alloc, vm=cfg.name, device_label=dev.name,
                                                          inflight=dev.name not in self.external),
                                       poll_us=20.0, features=_features(NET_FEATURES, dev.event_idx))
                ndrv.probe(loop)
                self.nets[dev.name] = GuestStack(ndrv, dev.ip)
                owner = self.procs[dev.name].proc.pid if dev.name in self.procs else "shared"
                self.console.log(f"{dev.name}: virtio-net mac={ndrv.mac.hex(':')} ip={dev.ip} backend={dev.backend} "
                                 f"pid={owner}")
                continue
            if isinstance(dev, BalloonDeviceConfig):
                bal = VirtioBalloonDriver(VhostUserTransport(sock, self.mem, self.alloc, vm=cfg.name, device_label=dev.name),
                                          report_interval=dev.report_interval,
                                          features=_features(BALLOON_FEATURES, dev.event_idx))
                bal.probe(loop)
                bal.start()
                self.balloon = bal
                self.console.log(f"{dev.name}: virtio-balloon pid={self.procs[dev.name].proc.pid} "
                                 f"features={bal.transport.features:#x}")
                continue
            # Inflight tracking, as QEMU's vhost-user-blk does: a restarted device resubmits what the dead one took.
            drv = VirtioBlkDriver(VhostUserTransport(sock, self.mem, self.alloc, vm=cfg.name, device_label=dev.name,
                                                     inflight=True),
                                  num_queues=dev.num_queues, features=_features(BLK_FEATURES, dev.event_idx))
            drv.probe(loop)
            self.drivers[dev.name] = drv
            self.console.log(f"{dev.name}: virtio-blk {format_size(drv.capacity_bytes)} serial={dev.serial or dev.name} "
                             f"queues={len(drv.queues)} ({dev.backend}) pid={self.procs[dev.name].proc.pid}")

    def transport_of(self, name: str) -> Optional[VhostUserTransport]:
        if name in self.drivers:
            return self.drivers[name].transport
        if name in self.nets:
            return self.nets[name].drv.transport
        if self.balloon is not None and self.balloon.transport.label == name:
            return self.balloon.transport
        return None

    async def supervise(self, interval: float = 0.05) -> None:
        """Restart device processes that die, and reconnect their drivers.

        What QEMU does with ``-chardev socket,reconnect=N`` and a supervisor
        restarting the backend: the guest keeps its rings, buffers and
        requests; the new process is renegotiated, gets the same inflight
        area (blk) and resubmits what the dead one had taken.
        """
        while not self.stopping:
            await asyncio.sleep(interval)
            for name, proc in list(self.procs.items()):
                rc = proc.proc.poll()
                if rc is None or self.stopping:
                    continue
                try:
                    await self._restart(name, rc)
                except (OSError, RuntimeError, ValueError) as e:
                    # Tried once; the next round tries again if the new process died too.
                    self.console.log(f"[red]{name}: restart failed: {e}[/]")
                    await asyncio.sleep(1.0)

    async def _restart(self, name: str, rc: int) -> None:
        kind, args, sock, log_path = self.specs[name]
        old_pid = self.procs[name].proc.pid
        why = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        self.console.log(f"[yellow]{name}: device process {old_pid} died ({why}); restarting[/]")
        t0 = time.monotonic()
        self.procs[name].stop()
        stale = [sock] + ([self.controls[name]] if name in self.controls else [])
        for path in stale:  # the dead process's socket files: wait for the new one's
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        proc = DeviceProcess(kind, args, socket_path=sock, log_path=log_path)
        self.procs[name] = proc
        try:
            await async_wait_for_path([sock], proc.proc, 20)
        except (ChildExited, TimeoutError):
            raise RuntimeError(f"{name}: the restarted device process did not come up (see {log_path})") from None
        transport = self.transport_of(name)
        if self.balloon is not None and transport is self.balloon.transport:
            # The target lived in the dead process. The driver holds still (a new device says 0)
            # until the host's last word reaches the new one, then follows it.
            self.balloon.reconnect()
            try:
                if self.balloon_target is not None and self.balloon_ctl:
                    try:
                        # Bounded: a process that dies before its control socket appears must not
                        # stall supervision of every device (the supervisor restarts it again).
                        await async_wait_for_path([self.balloon_ctl], proc.proc, 20)
                    except (ChildExited, TimeoutError) as e:
                        self.console.log(f"[red]{name}: could not restore the balloon target: {e}[/]")
                    else:
                        reply = await arequest(self.balloon_ctl, {"cmd": "balloon", "size": self.balloon_target})
                        if not reply.get("ok"):
                            self.console.log(f"[red]{name}: could not restore the balloon target: "
                                             f"{reply.get('error')}[/]")
            finally:
                self.balloon.resume()
        elif transport is not None:
            transport.reconnect(retry_for=5.0)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        took = time.monotonic() - t0
        self.restart_log.append({"device": name, "old_pid": old_pid, "new_pid": proc.proc.pid, "cause": why,
                                 "seconds": round(took, 3)})
        self.console.log(f"{name}: restarted as pid {proc.proc.pid}, driver reconnected in {took * 1000:.0f} ms")

    async def control(self, req: dict) -> dict:
        """The machine's control socket: balloon commands go to the balloon device."""
        cmd = req["cmd"]
        if cmd == "info":
            out: dict = {"machine": self.cfg.name, "ram_bytes": self.cfg.ram,
                         "devices": {name: p.proc.pid for name, p in self.procs.items()},
                         "guest_free_bytes": self.alloc.free_pages * 4096 if self.alloc else None}
            if self.balloon_ctl:
                try:
                    out["balloon"] = await arequest(self.balloon_ctl, {"cmd": "info"})
                except OSError as e:  # the balloon process is down (being restarted)
                    out["balloon"] = {"ok": False, "error": f"balloon device unreachable: {e}"}
            return out
        if cmd in ("balloon", "balloon-stats"):
            if not self.balloon_ctl:
                raise ControlError("this machine has no balloon device")
            reply = await arequest(self.balloon_ctl, req)
            if not reply.get("ok"):
                raise ControlError(reply.get("error", "balloon device refused"))
            if cmd == "balloon":
                self.balloon_target = req.get("size")
            reply.pop("ok", None)
            return reply
        raise ControlError(f"unknown command {cmd!r} (info, balloon SIZE, balloon-stats)")

    async def aclose(self) -> None:
        if self.balloon is not None:
            try:
                await self.balloon.close()
            except OSError:
                pass
            self.balloon = None

    def stop(self) -> None:
        self.stopping = True
        for stack in self.nets.values():
            try:
                stack.drv.close()
            except OSError:
                pass
        for drv in self.drivers.values():
            try:
                drv.close()
            except OSError:
                pass
        stop_children([p.proc for p in self.procs.values()])
        for p in self.procs.values():
            p.stop()            # reaped already: closes its log
        if self.mem is not None:
            self.mem.close()
        for dev in self.cfg.devices:
            if isinstance(dev, BlkDeviceConfig) and dev.backend == "scratch":
                try:
                    os.unlink(dev.scratch_path(self.workdir))
                except FileNotFoundError:
                    pass


def _progress_table(cfg: MachineConfig, runs: list[tuple[str, BlkWorkload]], elapsed: float, last: dict) -> Table:
    t = Table(title=f"simvirt machine '{cfg.name}'  {elapsed:5.1f}/{cfg.duration:.0f} s")
    for col in ("workload", "device", "IOPS", "MB/s", "ios", "errors", "in flight"):
        t.add_column(col, justify="right" if col not in ("workload", "device") else "left")
    now = time.monotonic()
    for i, (name, run) in enumerate(runs):
        prev_t, prev_ios, prev_bytes = last.get(i, (now, 0, 0))
        dt = max(now - prev_t, 1e-6)
        t.add_row(f"{i}:{run.o.rw} {format_size(run.o.bs)} qd{run.o.iodepth}", name,
                  f"{(run.ios - prev_ios) / dt:,.0f}", f"{(run.bytes - prev_bytes) / dt / 1e6:,.1f}",
                  f"{run.ios:,}", str(run.errors), str(run.inflight))
        last[i] = (now, run.ios, run.bytes)
    return t


async def _net_job(stack: GuestStack, wl: NetWorkloadConfig, duration: float, stop: asyncio.Event) -> dict:
    """A net workload: pings to ``target`` or a UDP stream to its discard port, for ``duration``.

    Ends early when ``stop`` is set (SIGTERM): the loop checks it rather than
    relying on cancellation, which ``asyncio.wait_for`` can swallow when the
    awaited reply lands in the same iteration.
    """
    target = ip_bytes(wl.target)
    deadline = time.monotonic() + duration
    if wl.mode == "ping":
        rtts, lost, seq = [], 0, 0
        while time.monotonic() < deadline and not stop.is_set():
            rtt = await stack.ping(target, seq)
            seq += 1
            if rtt is None:
                lost += 1
            else:
                rtts.append(rtt)
            if wl.interval:
                await sleep_until(time.monotonic() + wl.interval, stop)
        return {"target": wl.target, "sent": seq, "lost": lost, "rtt_us": percentiles_us(rtts)}
    tx = TxRunner(StreamJob("udp-tx", "", wl.device, target=wl.target, frame_size=wl.frame_size), stack, halt=stop)
    await tx.run(deadline)
    s = tx.detail()["stream"]
    return {"target": wl.target, "frames": s["frames"], "pps": s["pps"], "gbps": s["gbps"]}


async def _balloon_script(m: Machine, wl: BalloonWorkloadConfig, console: Console) -> list[dict]:
    """Apply each scripted balloon target at its time; record what the device reported."""
    t0 = time.monotonic()
    log = []
    assert m.balloon_ctl is not None
    for step in wl.steps:
        await asyncio.sleep(max(0.0, t0 + step.at - time.monotonic()))
        reply = await arequest(m.balloon_ctl, {"cmd": "balloon", "size": step.size})
        if reply.get("ok"):
            m.balloon_target = step.size
        console.log(f"{wl.device}: guest memory -> {format_size(step.size)} ({'ok' if reply.get('ok') else reply.get('error')})")
        log.append({"at": step.at, "size": step.size, "ok": bool(reply.get("ok"))})
    return log


async def run_machine(cfg: MachineConfig, *, metrics_port: Optional[int], progress: bool, console: Console,
                      control: Optional[str] = None, metrics_addr: str = "127.0.0.1", restart: bool = True,
                      on_start: Optional[Callable[[Machine], None]] = None) -> dict:
    loop = asyncio.get_running_loop()
    m = Machine(cfg, console)
    port = metrics_port if metrics_port is not None else cfg.metrics_port
    metrics.mark_process(cfg.name, "driver")
    stop = asyncio.Event()
    stop_on_signals(loop, stop)
    supervisor = None
    try:
        m.start(loop)
        if restart:
            supervisor = asyncio.ensure_future(m.supervise())
        if on_start is not None:
            on_start(m)
        if port is not None:
            bound = metrics.serve(port, metrics_addr, registry=machine_registry(metrics.REGISTRY, m.metric_targets))
            console.log(f"metrics for the whole machine on http://{metrics_addr}:{bound}/metrics")
        control_path = control or cfg.control
        control_server = None
        if control_path:
            control_server = await serve_control(control_path, m.control)
            console.log(f"control socket: simvirt ctl {control_path} (balloon SIZE | balloon-stats | info)")
        runs: list[tuple[str, BlkWorkload]] = []
        for wl in cfg.workloads:
            if isinstance(wl, (BalloonWorkloadConfig, NetWorkloadConfig)):
                continue
            drv = m.drivers[wl.device]
            o = BlkBenchOptions(rw=wl.rw, bs=wl.bs, iodepth=wl.iodepth, runtime=cfg.duration,
                                size=wl.size, verify="data" if wl.verify else None, mix=wl.mix)
            assert m.mem is not None and m.alloc is not None
            cap = drv.capacity_bytes
            nblocks = min(wl.size or cap, cap) // wl.bs
            run = BlkWorkload(o, drv, m.mem, m.alloc, nblocks)
            if o.verify and o.rw in ("read", "randread", "randrw"):
                console.log(f"{wl.device}: writing verification pattern to {format_size(nblocks * wl.bs)}")
                await prefill(drv, run, o)
            runs.append((wl.device, run))
        # Balloon steps are timed from here, where the workloads start (after any prefill).
        scripts = [asyncio.ensure_future(_balloon_script(m, wl, console))
                   for wl in cfg.workloads if isinstance(wl, BalloonWorkloadConfig)]
        net_jobs = [(wl, asyncio.ensure_future(_net_job(m.nets[wl.device], wl, cfg.duration, stop)))
                    for wl in cfg.workloads if isinstance(wl, NetWorkloadConfig)]
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(run.run(cfg.duration)) for _, run in runs]
        last: dict = {}
        if progress and runs:
            with Live(_progress_table(cfg, runs, 0.0, last), console=console, refresh_per_second=4) as live:
                while not all(t.done() for t in tasks) and not stop.is_set():
                    await asyncio.wait(tasks, timeout=0.5)
                    live.update(_progress_table(cfg, runs, time.monotonic() - t0, last))
        else:
            while not all(t.done() for t in tasks) and not stop.is_set():
                await asyncio.wait(tasks, timeout=0.5)
        if stop.is_set():
            for _, run in runs:
                run.stop()
            await asyncio.gather(*tasks)
        if not runs and (scripts or net_jobs) and not stop.is_set():
            # No disk workload sets the pace: the machine runs for its duration (or until stopped).
            await sleep_until(t0 + cfg.duration, stop)
        net_results = []
        for wl, job in net_jobs:
            try:
                res = await asyncio.wait_for(job, timeout=5)
            except (asyncio.TimeoutError, OSError) as e:
                res = {"error": str(e) or type(e).__name__}
            net_results.append({"device": wl.device, "mode": wl.mode, **res})
        elapsed = time.monotonic() - t0
        for sc in scripts:
            sc.cancel()
        balloon_info = None
        if m.balloon_ctl:
            balloon_info = await arequest(m.balloon_ctl, {"cmd": "balloon-stats"})
            balloon_info.pop("ok", None)
        if control_server is not None:
            control_server.close()
        results = []
        ok = True
        for (dev, run), task in zip(runs, tasks):
            rb = (0, 0)
            if run.o.verify and run.written:
                rb = await readback(m.drivers[dev], run, run.o)
            verified = None
            if run.o.verify:
                verified = run.mismatches == 0 and rb[1] == 0 and run.errors == 0
            ok = ok and not run.errors and verified is not False
            results.append({
                "device": dev, "rw": run.o.rw, "bs": run.o.bs, "iodepth": run.o.iodepth,
                "ios": run.ios, "iops": round(run.ios / elapsed, 1), "bw_bytes": round(run.bytes / elapsed, 1),
                "lat_us": percentiles_us(run.lat), "errors": run.errors, "verified": verified,
                "reads_checked": run.verified_reads, "blocks_read_back": rb[0],
            })
        return {"machine": cfg.name, "config": cfg.source, "duration_s": round(elapsed, 2),
                "devices": [{"name": d.name, "type": d.type, "backend": getattr(d, "backend", None),
                             "size": getattr(d, "size", None), "pid": m.procs[d.name].proc.pid} for d in cfg.devices],
                "workloads": results, "net": net_results, "balloon": balloon_info,
                "restarts": m.restart_log, "stopped_early": stop.is_set(),
                "ok": ok and all(not n.get("error") and not n.get("lost") for n in net_results)}
    finally:
        m.stopping = True
        if supervisor is not None:
            supervisor.cancel()
        await m.aclose()
        m.stop()


def _summary(console: Console, r: dict) -> None:
    early = " (stopped early by signal)" if r.get("stopped_early") else ""
    t = Table(title=f"summary: machine '{r['machine']}' ({r['config']}), {r['duration_s']} s{early}")
    for col in ("device", "workload", "IOPS", "MB/s", "p50 us", "p99 us", "errors", "verified"):
        t.add_column(col)
    for w in r["workloads"]:
        t.add_row(w["device"], f"{w['rw']} {format_size(w['bs'])} qd{w['iodepth']}", f"{w['iops']:,.0f}",
                  f"{w['bw_bytes'] / 1e6:,.1f}", str(w["lat_us"]["p50"]), str(w["lat_us"]["p99"]),
                  str(w["errors"]), {None: "-", True: "yes", False: "NO"}[w["verified"]])
    console.print(t)
    for n in r.get("net") or []:
        if "error" in n:
            console.print(f"net {n['device']} {n['mode']}: [red]{n['error']}[/]")
        elif n["mode"] == "ping":
            console.print(f"net {n['device']}: ping {n['target']} {n['sent'] - n['lost']}/{n['sent']} replies, "
                          f"rtt p50 {n['rtt_us']['p50']} us p99 {n['rtt_us']['p99']} us")
        else:
            console.print(f"net {n['device']}: udp-tx to {n['target']}:9 {n['pps']:,.0f} pps {n['gbps']} Gbps")
    b = r.get("balloon")
    if b:
        console.print(f"balloon: target {b['target_pages']} pages, actual {b['actual_pages']} pages; guest RAM "
                      f"{format_size(b['ram_bytes'])}, host-resident {b['resident_bytes'] / 2**20:.1f} MiB; "
                      f"guest reports free {b.get('stats', {}).get('free_memory', 0) / 2**20:.1f} MiB")
    for rs in r.get("restarts") or []:
        console.print(f"restart: {rs['device']} pid {rs['old_pid']} ({rs['cause']}) -> pid {rs['new_pid']}, "
                      f"reconnected in {rs['seconds'] * 1000:.0f} ms")
    console.print("[bold green]OK[/]" if r["ok"] else "[bold red]FAILED[/]")


def run_machine_command(args: argparse.Namespace) -> int:
    install_uvloop()
    cfg = load_config(args.config)
    if args.duration is not None:
        if args.duration <= 0:
            raise ValueError("--duration must be positive")
        cfg.duration = args.duration
    console = Console(stderr=args.json)
    result = asyncio.run(run_machine(cfg, metrics_port=args.metrics_port,
                                     progress=not args.no_progress and console.is_terminal, console=console,
                                     control=args.control, metrics_addr=args.metrics_addr,
                                     restart=not args.no_restart))
    if args.json:
        print(json.dumps(result))
    else:
        _summary(console, result)
    return 0 if result["ok"] else 1
