"""Runs each step of the demo as a `python ...` subprocess, logged, with wall and CPU time."""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

from pi_jax import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Runner:
  """Runs commands from the repository root; records command, wall and CPU time of each."""

  def __init__(self, out: str):
    self.out = out
    self.logs = os.path.join(out, "logs")
    os.makedirs(self.logs, exist_ok=True)
    self.records: list[dict] = []
    self.earlier = _earlier_records(os.path.join(out, "results.json"))

  def __call__(self, name: str, argv: list[str], what: str) -> str:
    """Runs `python argv...`; returns its stdout; raises RuntimeError (with the log's tail)."""
    cmd = [sys.executable] + argv
    shown = shlex.join(["python"] + [_portable_arg(a) for a in argv])
    n = len(self.records) + 1
    print(f"[demo] ({n}) {what}\n       $ {shown}", flush=True)
    log = os.path.join(self.logs, f"{name}.log")
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    with open(log, "w") as f:
      proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
      f.write("\n--- stdout ---\n" + proc.stdout)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    self.records.append({"step": n, "name": name, "what": what, "command": shown,
                         "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                         "exit": proc.returncode, "log": os.path.relpath(log, self.out),
                         "load_after": _loadavg()})
    print(f"       done in {wall:.0f} s (CPU {cpu:.0f} s, load {_loadavg()})", flush=True)
    if proc.returncode != 0:
      with open(log) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"step {n} ({what}) failed with exit {proc.returncode}; log {log}:\n{tail}")
    return proc.stdout

  def train(self, name: str, what: str, argv: list[str], workdir: str, ckpt: str) -> None:
    """One fine-tuning stage: `python argv...` (train.py, resuming its run in `workdir`), then
    its final model copied to `ckpt`, all at once; skipped where `ckpt` is already there."""
    if os.path.isfile(os.path.join(ckpt, "config.json")):
      self.skipped(name, what, ckpt)
      return
    self(name, argv + ["--no-progress"], what)
    with files.atomic_directory(ckpt) as tmp:
      shutil.copytree(os.path.join(workdir, "final"), tmp, dirs_exist_ok=True)

  def skipped(self, name: str, what: str, output: str) -> None:
    """Records a step whose output already exists (a resumed run): with the command and times
    of the earlier run that made it, where the folder's results.json has them."""
    n = len(self.records) + 1
    print(f"[demo] ({n}) {what}: done before ({os.path.relpath(output, self.out)})", flush=True)
    earlier = self.earlier.get(name)
    if earlier:
      home = os.path.expanduser("~").rstrip("/") + "/"  # records of older versions kept it
      command = earlier["command"].replace(home, "~/") if home != "/" else earlier["command"]
      self.records.append({**earlier, "command": command, "step": n, "what": what,
                           "earlier_run": True})
    else:
      self.records.append({"step": n, "name": name, "what": what, "command": "(done before)",
                           "wall_s": 0.0, "cpu_s": 0.0, "exit": 0, "log": None})


def _portable_arg(arg: str) -> str:
  """A command-line argument as results record it: a path, or the path in KEY=PATH (train.py's
  --set), relative to the repository or under `~` (files.portable)."""
  key, sep, value = arg.partition("=")
  if sep and not arg.startswith("-") and os.path.isabs(value):
    return f"{key}={files.portable(value)}"
  return files.portable(arg)


def _earlier_records(path: str) -> dict[str, dict]:
  """{step name: record} of the commands an earlier run into the same folder ran and finished."""
  try:
    with open(path) as f:
      records = json.load(f).get("commands") or []
  except (OSError, ValueError):
    return {}
  return {r["name"]: r for r in records
          if isinstance(r, dict) and r.get("exit") == 0 and r.get("wall_s") and "name" in r}


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _loadavg() -> float:
  return round(os.getloadavg()[0], 2)


def commands_table(records: list[dict]) -> list[str]:
  """A report's table of the commands that made it (wall and CPU time, the load after each), and
  the total; steps that ran beside other work (load > 4) are flagged as no benchmark."""
  lines = ["| # | step | command | wall s | CPU s | load after |", "|---|---|---|---|---|---|"]
  for r in records:
    what = r["what"] + (" (an earlier run)" if r.get("earlier_run") else "")
    lines.append(f"| {r['step']} | {what} | `{r['command']}` | {r['wall_s']} | "
                 f"{r['cpu_s']} | {r.get('load_after', '')} |")
  busy = [r for r in records if (r.get("load_after") or 0) > 4]
  total_cpu = sum(r["cpu_s"] for r in records)
  lines += ["", f"Total: {sum(r['wall_s'] for r in records):.0f} s wall, {total_cpu:.0f} s "
            "CPU (user + system, all cores) in the commands. Logs: `logs/`."
            + (f" {len(busy)} step(s) ran beside other work (load > 4): their times are not "
               "benchmarks." if busy else ""), ""]
  return lines
