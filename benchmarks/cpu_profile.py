"""Where the CPU forward's time goes: the parts of the SmolLM2-135M forward, jitted one by one.

  python -m benchmarks.cpu_profile --length 8192 --repeats 3
  python -m benchmarks.cpu_profile --length 4096 --parts attention --impls xla_blockwise:256,xla_blockwise:512

Each part is compiled on its own and timed on random inputs of the right shape; the parts are
run interleaved (A B C C B A ...) so load from other processes hits them alike. Per-layer parts
are reported as they are and times the number of layers. Wall and process CPU seconds are both
reported: on a shared machine the CPU seconds are the steadier of the two. Parts:
  dense      one decoder layer without its attention core (norms, q/k/v/o projections, RoPE, MLP)
  dense_xla  the same with XLA's dot for every projection instead of pi_jax.linear's native sgemm
  rope       RoPE of q and k alone (inside `dense` too)
  attention  the causal attention core, once per --impls entry (impl:block_size)
  nll        the final norm's output projected to the vocabulary and scored (loss.chunked_nll)
  total      mean_loss end to end (slow: the whole model)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from pi_jax import dispatch
from pi_jax.loss import DEFAULT_CHUNK
from pi_jax.run import RunOptions


def _parts(args):
  from pi_jax import linear
  from pi_jax import loss as loss_lib
  from pi_jax import model as model_lib
  from pi_jax import rope
  config = common.smollm2_config()
  params = jax.jit(model_lib.init_params, static_argnums=0)(config, jax.random.key(0))
  layer = jax.tree.map(lambda x: x[0], params["layers"])
  l, d = args.length, config.hidden_size
  key = jax.random.split(jax.random.key(1), 4)
  x_BLD = jax.random.normal(key[0], (1, l, d), jnp.float32)
  q = jax.random.normal(key[1], (1, l, config.num_heads, config.head_dim), jnp.float32)
  k = jax.random.normal(key[2], (1, l, config.num_kv_heads, config.head_dim), jnp.float32)
  v = jax.random.normal(key[3], (1, l, config.num_kv_heads, config.head_dim), jnp.float32)
  positions = jnp.arange(l, dtype=jnp.int32)[None]
  tokens = jnp.asarray(common.tokens(l, config.vocab_size))
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.ones_like(tokens).at[:, -1].set(0)
  per_layer = {}

  def dense(layer, x_BLD, native=True):
    # native=False: XLA's dot for every projection (pi_jax's default on the CPU is the native
    # sgemm of pi_jax.linear where it builds).
    cos, sin = rope.rope_tables(config, positions)
    mod = model_lib.nnx.merge(model_lib._layer_graphdef(config), layer)
    proj = linear.project if native else linear.project_xla
    h = model_lib.rms_norm(x_BLD, mod.attn_norm[...], config.rms_norm_eps)
    q_ = rope.apply_rope(proj(h, mod.wq[...]), cos, sin)
    k_ = rope.apply_rope(proj(h, mod.wk[...]), cos, sin)
    v_ = proj(h, mod.wv[...])
    o = q_ + jnp.tile(k_ + v_, (1, 1, config.num_heads // config.num_kv_heads, 1))
    x_BLD = x_BLD + proj(o, mod.wo[...], contract=2)
    h = model_lib.rms_norm(x_BLD, mod.mlp_norm[...], config.rms_norm_eps)
    act = jax.nn.silu(proj(h, mod.w_gate[...])) * proj(h, mod.w_up[...])
    return x_BLD + proj(act, mod.w_down[...])

  def rope_only(q, k):
    cos, sin = rope.rope_tables(config, positions)
    return rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)

  parts = {}
  wanted = args.parts.split(",")
  if "dense" in wanted:
    parts["dense"] = (jax.jit(dense), (layer, x_BLD))
    per_layer["dense"] = True
  if "dense_xla" in wanted:
    parts["dense_xla"] = (jax.jit(lambda layer, x: dense(layer, x, native=False)), (layer, x_BLD))
    per_layer["dense_xla"] = True
  if "rope" in wanted:
    parts["rope"] = (jax.jit(rope_only), (q, k))
    per_layer["rope"] = True
  if "attention" in wanted:
    for spec in args.impls.split(","):
      impl, _, bs = spec.partition(":")
      run = RunOptions(attention_impl=impl, attention_block_size=int(bs) if bs else None)
      kernels = dispatch.choose(run)
      fn = jax.jit(kernels.attend)
      parts[f"attention {spec}"] = (fn, (q, k, v))
      per_layer[f"attention {spec}"] = True
  if "nll" in wanted:
    fn = jax.jit(lambda p, h, t: loss_lib.chunked_nll(config, p, h, t, chunk=args.chunk))
    parts["nll"] = (fn, (params, x_BLD, targets))
  if "total" in wanted:
    impl, _, bs = args.impls.split(",")[0].partition(":")
    run = RunOptions(attention_impl=impl, attention_block_size=int(bs) if bs else None)
    fn = jax.jit(lambda p, t, y, m: loss_lib.mean_loss(config, p, t, y, m, chunk=args.chunk,
                                                       run=run)[0])
    parts["total"] = (fn, (params, tokens, targets, mask))
  return parts, per_layer, config.num_layers


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=int, default=8192, help="sequence length (tokens)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per part (median)")
  p.add_argument("--parts", default="dense,dense_xla,rope,attention,nll",
                 help="comma-separated parts of the forward to time")
  p.add_argument("--impls", default="cpu_flash:256,xla_blockwise:256",
                 help="attention impl:block_size entries, comma-separated")
  p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                 help="loss chunk (positions; default %(default)s, pi_jax.loss.DEFAULT_CHUNK)")
  args = p.parse_args(argv)
  parts, per_layer, layers = _parts(args)
  print(f"load before: {open('/proc/loadavg').read().strip()}", flush=True)
  for name, (fn, xs) in parts.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(*xs))
    print(f"{name}: compile + first run {time.perf_counter() - start:.1f}s", flush=True)
  wall = {n: [] for n in parts}
  cpu = {n: [] for n in parts}
  names = list(parts)
  for r in range(args.repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      fn, xs = parts[name]
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*xs))
      wall[name].append(time.perf_counter() - w0)
      cpu[name].append(time.process_time() - c0)
  print(f"load after: {open('/proc/loadavg').read().strip()}")
  print(f"length {args.length}; min (median) over {args.repeats} runs; ×{layers}: per-layer parts "
        "times the layers")
  print(f"| part | wall s | CPU s | wall s ×{layers} | CPU s ×{layers} |")
  print("|---|---|---|---|---|")
  for name in names:
    mult = layers if name in per_layer else 1
    w, c = min(wall[name]), min(cpu[name])
    print(f"| {name} | {w:.3f} ({statistics.median(wall[name]):.3f}) | {c:.3f} | "
          f"{w * mult:.2f} | {c * mult:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
