"""Sampling every process of a deployment: resident memory and CPU time at a fixed rate (psutil), plus the
deployment's cgroup figures where the machine lets us make one (cgroup v1 memory + cpuacct, as root).

:func:`integrate` turns the samples into the figures the report compares: memory GB·s (trapezoid over RSS),
core·s (CPU time used), peak and mean memory, mean cores; per process and summed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Samples:
    roles: dict[int, str]                                        # pid -> role ("router", "node-0", ...)
    times_s: list[float] = field(default_factory=list)           # since the sampler started
    rss: dict[int, list[int]] = field(default_factory=dict)      # pid -> bytes at each time (0 once gone)
    cpu_s: dict[int, list[float]] = field(default_factory=dict)  # pid -> cumulative CPU seconds at each time
    cgroup_bytes: list[int] = field(default_factory=list)        # the cgroup's memory use (rss + cache)
    cgroup_cpu_s: list[float] = field(default_factory=list)


class Cgroup:
    """A cgroup v1 pair (memory, cpuacct) that processes start in (:meth:`prefix`, so every page they touch is
    charged here from the start: no charges to move); ``None`` from :meth:`create` where the machine does not
    allow it."""

    def __init__(self, name: str):
        self.dirs = [CGROUP_ROOT / c / name for c in ("memory", "cpuacct")]

    @classmethod
    def create(cls, name: str) -> Cgroup | None:
        group = cls(f"faasmoe-bench-{name}-{os.getpid()}")
        try:
            for d in group.dirs:
                d.mkdir(exist_ok=True)
        except OSError as exc:
            log.info("no cgroup figures: %s", exc)
            group.remove()
            return None
        return group

    def prefix(self) -> list[str]:
        """A command prefix that starts the command inside this cgroup."""
        script = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in self.dirs) + '; exec "$@"'
        return ["sh", "-c", script, "--"]

    def read(self) -> tuple[int, float]:
        stat = dict(line.split() for line in (self.dirs[0] / "memory.stat").read_text().splitlines())
        used = int(stat.get("total_rss", stat.get("rss", 0))) + int(stat.get("total_cache", stat.get("cache", 0)))
        return used, int((self.dirs[1] / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        for d in self.dirs:
            try:
                if d.exists():
                    for pid in (d / "cgroup.procs").read_text().split():
                        (d.parent / "cgroup.procs").write_text(pid)
                    d.rmdir()
            except OSError as exc:
                log.warning("cgroup %s not removed: %s", d, exc)


class ProcessSampler:
    def __init__(self, roles: dict[int, str], hz: float = 4.0, cgroup: Cgroup | None = None):
        self.samples = Samples(dict(roles))
        self.period_s, self.cgroup = 1.0 / hz, cgroup
        self._procs = {}
        for pid in roles:
            try:
                self._procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faasmoe-sampler", daemon=True)
        self._t0 = 0.0

    def start(self) -> ProcessSampler:
        self._t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> Samples:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.samples

    def _run(self) -> None:
        next_s = time.monotonic()
        while True:
            next_s += self.period_s
            if self._stop.wait(max(0.0, next_s - time.monotonic())):
                return
            self._sample()

    def _sample(self) -> None:
        s = self.samples
        s.times_s.append(time.monotonic() - self._t0)
        for pid in s.roles:
            proc = self._procs.get(pid)
            rss, cpu = 0, (s.cpu_s[pid][-1] if s.cpu_s.get(pid) else 0.0)
            if proc is not None:
                try:
                    with proc.oneshot():
                        rss = proc.memory_info().rss
                        times = proc.cpu_times()
                        cpu = times.user + times.system
                except psutil.Error:
                    self._procs.pop(pid, None)            # gone (killed, stopped): 0 bytes from now on
            s.rss.setdefault(pid, []).append(rss)
            s.cpu_s.setdefault(pid, []).append(cpu)
        if self.cgroup is not None:
            try:
                used, cpu = self.cgroup.read()
                s.cgroup_bytes.append(used)
                s.cgroup_cpu_s.append(cpu)
            except (OSError, ValueError):
                self.cgroup = None


def _trapezoid(times: list[float], values: list[float]) -> float:
    return sum((t1 - t0) * (v0 + v1) / 2 for t0, t1, v0, v1 in zip(times, times[1:], values, values[1:]))


def integrate(s: Samples) -> dict:
    """GB·s, core·s, peak and mean GB, mean cores: per process and in total (the total is the sum)."""
    duration = s.times_s[-1] - s.times_s[0] if len(s.times_s) > 1 else 0.0
    per = {}
    for pid, role in s.roles.items():
        rss, cpu = s.rss.get(pid, [0]), s.cpu_s.get(pid, [0.0])
        gb_s = _trapezoid(s.times_s, rss) / 1e9
        per[f"{role}:{pid}"] = dict(role=role, pid=pid, gb_s=gb_s, core_s=cpu[-1] - cpu[0], peak_gb=max(rss) / 1e9,
                                    mean_gb=gb_s / duration if duration else 0.0)
    total_rss = [sum(s.rss[pid][i] for pid in s.rss) for i in range(len(s.times_s))]
    out = dict(duration_s=duration, samples=len(s.times_s), processes=per,
               gb_s=sum(p["gb_s"] for p in per.values()), core_s=sum(p["core_s"] for p in per.values()),
               peak_gb=max(total_rss) / 1e9 if total_rss else 0.0)
    out["mean_gb"] = out["gb_s"] / duration if duration else 0.0
    out["mean_cores"] = out["core_s"] / duration if duration else 0.0
    if len(s.cgroup_bytes) == len(s.times_s) and s.cgroup_bytes:
        out["cgroup"] = dict(gb_s=_trapezoid(s.times_s, s.cgroup_bytes) / 1e9, peak_gb=max(s.cgroup_bytes) / 1e9,
                             core_s=s.cgroup_cpu_s[-1] - s.cgroup_cpu_s[0])
    return out
