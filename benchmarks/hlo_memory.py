"""Per-chip bytes of a train step from the TPU compiler's buffer assignment, without waiting for
code generation.

  python -m benchmarks.hlo_memory --config configs/llama_7b_32k.py --topology v5p-128 \\
      --set global_batch=64 [--set run.remat=offload]

Runs `train.py --compile-only` with XLA_FLAGS=--xla_dump_to=DIR, waits for the step's
`*after_optimizations-memory-usage-report.txt` (written once buffers are assigned, 20-100 s for
7B on a slow host, long before the TPU backend finishes) and prints each memory space's
`Total bytes` (default = HBM, state arguments included) and the largest buffers, then stops the
compile. docs/tpu.md "Where the memory goes" was measured with it.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="run config (.py with get_config())")
  p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-64")
  p.add_argument("--set", action="append", default=[], help="KEY=VALUE override (repeatable)")
  p.add_argument("--top", type=int, default=12, help="largest buffers to print")
  p.add_argument("--timeout", type=float, default=900,
                 help="seconds to wait for the compiler's buffer assignment")
  args = p.parse_args(argv)
  dump = tempfile.mkdtemp(prefix="hlo_memory_")
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", args.config,
         "--compile-only", "--topology", args.topology]
  for s in args.set:
    cmd += ["--set", s]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={dump}")
  t0 = time.time()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  try:
    while time.time() - t0 < args.timeout:
      reports = glob.glob(os.path.join(dump, "*jit_step*after_optimizations-memory-usage-report.txt"))
      if reports:
        time.sleep(1)
        text = open(reports[0]).read()
        print(f"buffer assignment after {time.time() - t0:.0f} s ({reports[0]})")
        for space, total in re.findall(r"Memory Space: (\S+) \(color=\d+\)\nTotal bytes: \d+ \(([^)]*)\)",
                                       text):
          print(f"  {space}: {total}")
        rows = text.split("------------------------------------------------------------\n")[1]
        print("".join(rows.splitlines(keepends=True)[:args.top]))
        return 0
      if proc.poll() is not None:
        print(proc.stderr.read()[-3000:], file=sys.stderr)
        return proc.returncode or 1
      time.sleep(2)
    print(f"no buffer assignment after {args.timeout:.0f} s", file=sys.stderr)
    return 1
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


if __name__ == "__main__":
  sys.exit(main())
