"""Compile time of the jitted forward (lower + XLA compile) by model depth, on the CPU.

  python -m benchmarks.compile_time --preset smollm2-135m --seq 2048 --layers 2,10,30 --repeats 3

No weights are allocated: the parameters are ShapeDtypeStructs from the model's own
`abstract_params`, so the run measures tracing/lowering (`lower_s`) and the XLA compile
(`compile_s`) of `forward(config, params, tokens)` with full logits, for the preset with its
depth replaced by each value of --layers. Each repeat jits a fresh function (no in-process
cache) and the persistent compilation cache is off. With the layers under one `lax.scan`, the
time should stay flat in depth.

Runs against whatever `pi_jax` is importable, so the same script measures an older checkout:
  PYTHONPATH=/path/to/old/checkout python -m benchmarks.compile_time --label before ...
Every timed run records the load average and the other processes' CPU (benchmarks/quiet.py);
run it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import quiet  # noqa: E402


def time_compile(config, seq: int) -> tuple[float, float]:
  from pi_jax import model

  params = model.abstract_params(config)
  tokens = jax.ShapeDtypeStruct((1, seq), jnp.int32)
  fn = jax.jit(lambda p, t: model.forward(config, p, t))  # a fresh function: no cache hit
  t0 = time.perf_counter()
  lowered = fn.lower(params, tokens)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def _this_repos_files():
  """pi_jax/files.py of the checkout this script is in (an older pi_jax may be imported)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pi_jax",
                      "files.py")
  spec = importlib.util.spec_from_file_location("_compile_time_files", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="smollm2-135m", help="model preset")
  p.add_argument("--seq", type=int, default=2048, help="sequence length (tokens)")
  p.add_argument("--layers", default="2,10,30", help="comma-separated depths")
  p.add_argument("--repeats", type=int, default=3, help="compiles per depth (median)")
  p.add_argument("--label", default="", help="a name for this checkout in the output")
  p.add_argument("--json", help="write the rows here")
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  from pi_jax import presets

  rows = []
  start = quiet.machine_state()
  for layers in [int(x) for x in args.layers.split(",")]:
    config = presets.preset(args.preset, num_layers=layers)
    runs = []
    for _ in range(args.repeats):
      with quiet.Watch() as watch:
        lower_s, compile_s = time_compile(config, args.seq)
      runs.append({"lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
                   **watch.record()})
    row = {"layers": layers, "seq": args.seq,
           "lower_s_median": statistics.median(r["lower_s"] for r in runs),
           "compile_s_median": statistics.median(r["compile_s"] for r in runs),
           "noisy": any(r["noisy"] for r in runs), "runs": runs}
    rows.append(row)
    print(f"[{args.label or 'pi_jax'}] {args.preset} layers={layers} seq={args.seq}: lower "
          f"{row['lower_s_median']:.2f} s, compile {row['compile_s_median']:.2f} s (median of "
          f"{args.repeats}){'  NOISY' if row['noisy'] else ''}", flush=True)
  record = {"command": "python -m benchmarks.compile_time " + " ".join(sys.argv[1:] if argv is None
                                                                     else argv),
            "label": args.label, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "machine_before": start, "machine_after": quiet.machine_state(), "rows": rows}
  if args.json:
    _this_repos_files().write_json(args.json, record, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
