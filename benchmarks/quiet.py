"""Is the machine quiet? What else ran during a timed run? (Shared by the benchmark scripts.)

A timing taken while other processes compete for the CPU is noise, not a result. `Watch` wraps
one timed run: it records the 1-minute load average before and after, and the CPU seconds that
every process outside this benchmark's own process tree used during the run, so the result
says how many cores others took and which processes they were. `noisy` is true when others
used more than NOISY_CORES cores on average, or the load average was above NOISY_LOAD both
when the benchmark started and before this run. (A benchmark's own earlier runs keep the
1-minute average above 1 for minutes on a 2-core machine; they are not noise. Anything else
that starts later shows in the measured cores of other processes.)
"""

from __future__ import annotations

import os
import time

import psutil

NOISY_LOAD = 1.0  # 1-minute load average before a run
NOISY_CORES = 0.25  # cores used by other processes during a run
START_LOAD = os.getloadavg()[0]  # when the benchmark process started, before its own work


def _own_tree() -> set[int]:
  me = psutil.Process()
  pids = {me.pid}
  try:
    pids |= {p.pid for p in me.children(recursive=True)}
    parent = me.parent()
    if parent is not None and "benchmark" in " ".join(parent.cmdline()):  # a worker's parent
      pids |= {parent.pid} | {p.pid for p in parent.children(recursive=True)}
  except psutil.Error:
    pass
  return pids


def _cpu_by_process(exclude: set[int]) -> dict[int, tuple[str, float]]:
  out = {}
  for p in psutil.process_iter(["pid", "name", "cpu_times"]):
    if p.info["pid"] in exclude or p.info["cpu_times"] is None:
      continue
    t = p.info["cpu_times"]
    out[p.info["pid"]] = (p.info["name"], t.user + t.system)
  return out


class Watch:
  """`with Watch() as w: run()`; then w.record() -> dict for the result JSON."""

  def __enter__(self):
    self.exclude = _own_tree()
    self.load_before = os.getloadavg()[0]
    self.before = _cpu_by_process(self.exclude)
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.t0
    self.load_after = os.getloadavg()[0]
    after = _cpu_by_process(self.exclude | _own_tree())
    used = {pid: (name, cpu - self.before.get(pid, (name, 0.0))[1])
            for pid, (name, cpu) in after.items()}
    self.others_cores = sum(c for _, c in used.values()) / max(self.seconds, 1e-9)
    self.busiest = sorted(((c, f"{name}[{pid}]") for pid, (name, c) in used.items() if c > 0.05),
                          reverse=True)[:3]
    return False

  @property
  def noisy(self) -> bool:
    return min(self.load_before, START_LOAD) > NOISY_LOAD or self.others_cores > NOISY_CORES

  def record(self) -> dict:
    return {"load_at_start": round(START_LOAD, 2), "load_before": round(self.load_before, 2), "load_after": round(self.load_after, 2),
            "others_cores": round(self.others_cores, 3),
            "busiest_others": [f"{name} {c:.1f}s" for c, name in self.busiest],
            "noisy": self.noisy}


def machine_state() -> dict:
  """The load averages and the busiest processes right now (for a benchmark's header)."""
  procs = []
  for p in psutil.process_iter(["pid", "name", "cpu_percent"]):
    procs.append(p)
  time.sleep(0.5)
  busy = []
  for p in procs:
    try:
      pct = p.cpu_percent(None)
    except psutil.Error:
      continue
    if pct > 5:
      busy.append(f"{p.info['name']}[{p.info['pid']}] {pct:.0f}%")
  return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy[:5],
          "cpus": os.cpu_count()}
