"""XLA:CPU's matrix multiply against numpy's BLAS on the SmolLM2 forward's shapes (float32).

  python -m benchmarks.cpu_matmul
  python -m benchmarks.cpu_matmul --xla-flags=--xla_cpu_use_xnnpack=true   # try an XLA option

The ceiling of any plain-JAX CPU forward is the rate XLA's dot reaches: this prints GFLOP per
wall second and per CPU second for jax.jit(a @ b) and numpy's a @ b on the layer matmul
([L, 576] × [576, 1536]), the vocabulary projection of one loss chunk ([1024, 576] × [576,
49152]) and the attention projection ([L, 576] × [576, 576]), the two sides interleaved, best
of --repeats. XLA flags must be set before JAX starts, hence --xla-flags (or XLA_FLAGS).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import quiet

SHAPES = ((8192, 576, 1536), (1024, 576, 49152), (8192, 576, 576))


def _best(fn, repeats):
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return min(wall), min(cpu)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=5, help="timed runs per shape (median)")
  p.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this run")
  args = p.parse_args(argv)
  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  print(f"machine before: {quiet.machine_state()}", flush=True)
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print("| m × k × n | XLA GFLOP/s | XLA GFLOP/CPU-s | numpy GFLOP/s | numpy GFLOP/CPU-s "
        "| XLA / numpy |")
  print("|---|---|---|---|---|---|")
  matmul = jax.jit(lambda a, b: a @ b)
  rng = np.random.default_rng(0)
  for m, k, n in SHAPES:
    a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    got = np.asarray(matmul(ja, jb))
    want = a @ b
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    if err > 1e-5:
      raise SystemExit(f"XLA's product differs from numpy's by {err:.1e} (relative)")
    xla, blas = [], []
    for r in range(2):  # interleaved: XLA, numpy, numpy, XLA
      for side in (("xla", "numpy") if r == 0 else ("numpy", "xla")):
        if side == "xla":
          xla.append(_best(lambda: matmul(ja, jb).block_until_ready(), args.repeats))
        else:
          blas.append(_best(lambda: a @ b, args.repeats))
    gflop = 2 * m * k * n / 1e9
    (xw, xc), (bw, bc) = (min(x[0] for x in xla), min(x[1] for x in xla)), (
        min(x[0] for x in blas), min(x[1] for x in blas))
    print(f"| {m} × {k} × {n} | {gflop / xw:.0f} | {gflop / xc:.0f} | {gflop / bw:.0f} | "
          f"{gflop / bc:.0f} | {bw / xw:.2f} |", flush=True)
  print(f"machine after: {quiet.machine_state()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
