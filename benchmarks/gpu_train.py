"""Train-step throughput and MFU of a ~1B LLaMA at long windows (meant for one GPU/TPU).

  python -m benchmarks.gpu_train --lengths 8192,32768 --json runs/gpu_train.json   # on a GPU
  python -m benchmarks.gpu_train --shape smoke                                     # CPU smoke run

Shape `tinyllama`: TinyLlama-1.1B (vocab 32000, hidden 2048, mlp 5632, 22 layers, 32 heads,
4 kv heads). Parameters and AdamW state in float32, compute in bfloat16, random tokens, batch 1
window per step, full remat, attention `auto` (cuDNN on NVIDIA GPUs, splash on TPU).

FLOPs per token = 6·N + 6·layers·L·d: N counts the parameters that take part in matmuls (all
but the input embedding table), 6·layers·L·d is causal attention's QKᵀ and PV (12·layers·L·d
for the full square, halved). MFU = tokens/s × FLOPs per token / the device's peak dense bf16
FLOP/s (--peak-tflops, else looked up from the device kind).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pi_jax import loss as loss_lib
from pi_jax import model as model_lib
from pi_jax import dispatch
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions
from pi_jax.train import metrics as metrics_lib  # one FLOP count and peak table, shared with train.py

SHAPES = {
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                      num_heads=32, num_kv_heads=4, rms_norm_eps=1e-5),
    "smoke": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=4, num_kv_heads=2),
}


def bench(config: ModelConfig, run: RunOptions, length: int, steps: int, warmup: int, batch: int,
          chunk: int):
  optimizer = optax.adamw(1e-5, b1=0.9, b2=0.95, weight_decay=0.0)

  @jax.jit
  def init(key):
    params = model_lib.init_params(config, key)
    return params, optimizer.init(params)

  def train_step(state, tokens):
    params, opt_state = state
    mask = jnp.ones_like(tokens).at[:, -1].set(0)
    targets = jnp.roll(tokens, -1, axis=1)
    loss, grads = jax.value_and_grad(
        lambda p: loss_lib.mean_loss(config, p, tokens, targets, mask, chunk=chunk,
                                     run=run)[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(train_step, donate_argnums=0)
  state = init(jax.random.key(0))
  rng = np.random.RandomState(0)
  batches = [jnp.asarray(rng.randint(0, config.vocab_size, (batch, length)), jnp.int32)
             for _ in range(2)]
  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  for i in range(warmup):
    state, loss = compiled(state, batches[i % 2])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    state, loss = compiled(state, batches[i % 2])
    jax.block_until_ready((state, loss))
    times.append(time.perf_counter() - t0)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  step_s = statistics.median(times)
  tokens_per_s = batch * length / step_s
  peak = metrics_lib.peak_flops_per_device(device)
  fpt = metrics_lib.flops_per_token(config, length)
  return {
      "length": length, "batch": batch, "steps": steps, "step_s_median": step_s,
      "tokens_per_s": tokens_per_s, "flops_per_token": fpt,
      "model_tflops_per_s": tokens_per_s * fpt / 1e12,
      "mfu": tokens_per_s * fpt / peak if peak else None,
      "compile_s": compile_s, "loss": float(loss),
      "peak_device_bytes": stats.get("peak_bytes_in_use"),
      "compiled_temp_bytes": mem.temp_size_in_bytes if mem else None,
      "compiled_argument_bytes": mem.argument_size_in_bytes if mem else None,
      "device": device.device_kind, "attention": dispatch.choose(run).attention,
  }


def _gib(x):
  return "–" if x is None else f"{x / 2**30:.2f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama", help="model shape")
  p.add_argument("--lengths", default=None, help="comma-separated (default 8192,32768; smoke: 256)")
  p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile)")
  p.add_argument("--batch", type=int, default=1, help="sequences per step")
  p.add_argument("--attention", default="auto", help="attention_impl (default: auto)")
  p.add_argument("--block-size", type=int, default=512, help="attention tile")
  p.add_argument("--remat", default="full", help="remat policy (pi_jax.config)")
  p.add_argument("--compute-dtype", default="bfloat16", help="activation dtype")
  p.add_argument("--chunk", type=int, default=2048, help="loss chunk (positions)")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's peak dense bf16 TFLOP/s (default: looked up by device kind)")
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  lengths = [int(x) for x in (args.lengths or ("256" if args.shape == "smoke" else "8192,32768")).split(",")]
  rows = []
  for length in lengths:
    config = ModelConfig(**SHAPES[args.shape], max_position_embeddings=length)
    run = RunOptions(compute_dtype=args.compute_dtype, remat=args.remat,
                     attention_impl=args.attention, attention_block_size=args.block_size)
    row = bench(config, run, length, args.steps, args.warmup, args.batch, args.chunk)
    if args.peak_tflops and row["mfu"] is None:
      row["mfu"] = row["model_tflops_per_s"] / args.peak_tflops
    rows.append(row)
    print(f"[{length}] {row['step_s_median']:.3f}s/step", file=sys.stderr, flush=True)
  n = model_lib.count_params(config)
  print(f"{args.shape}: {n / 1e6:.1f}M parameters, {args.compute_dtype} compute, remat "
        f"{args.remat}, attention {args.attention}, device {rows[0]['device']}\n")
  print("| length | step s | tokens/s | TFLOP/s (model) | MFU | peak device GiB | compiled temp GiB"
        " | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"| {r['length']} | {r['step_s_median']:.3f} | {r['tokens_per_s']:.0f} | "
          f"{r['model_tflops_per_s']:.2f} | {mfu} | {_gib(r['peak_device_bytes'])} | "
          f"{_gib(r['compiled_temp_bytes'])} | {r['compile_s']:.1f} |")
  if args.json:
    from pi_jax import files
    files.write_json(args.json, {"shape": args.shape, "params": n, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
