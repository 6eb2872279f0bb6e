"""Train-step FLOPs on paper against the model FLOPs, for splash attention on TPU (docs/tpu.md).

  python -m benchmarks.step_flops --preset llama-7b --lengths 8192,16384,32768

The compiler's cost analysis cannot give this number: it counts a loop body once (the layer
scan, the attention kernels' grids), so it reports a few percent of the real work. This counts
instead, per token:

- matmuls: 6·N for the model (forward 2N, backward 4N); remat recomputes the forward once: 8·N;
- attention, in units of one causal L×L matmul per layer (Y·L·D FLOPs per token; the model
  counts 6 of them): what splash computes at its tile granularity, from the block sizes pi_jax
  gives it (kernels.splash_block_sizes): the forward (2), its recompute unless the remat policy
  keeps the attention residuals (2), and the backward: fused (5 matmuls per tile, over key
  blocks of `block_kv_dkv` rows: a partly masked key block is computed whole) or separate dq and
  dk/dv kernels (7).
"""

from __future__ import annotations

import argparse
import sys


KEEPS_ATTENTION = ("save_attention", "offload_save_attention")


def causal_tiles(n_q: int, per_block: int) -> int:
  """Tiles computed for n_q query tiles against key blocks of `per_block` tiles, causal: every
  key block that starts at or before the query tile is computed whole."""
  return sum((i // per_block + 1) * per_block for i in range(n_q))


def splash_sizes(model, length: int):
  """(tile, BlockSizes) pi_jax gives splash for `length` tokens."""
  from pi_jax.attention import kernels
  from pi_jax import dispatch
  blk = kernels.splash_block(length, dispatch.DEFAULT_BLOCK)
  return blk, kernels.splash_block_sizes(length, blk)


def step_over_model(model, length: int, remat: str) -> float:
  from pi_jax.train import metrics
  model_flops = metrics.flops_per_token(model, length)
  attention_model = 6 * model.num_layers * length * model.num_heads * model.head_dim
  n_matmul = (model_flops - attention_model) / 6  # N
  unit = attention_model / 6  # one causal L×L matmul per layer, per token
  blk, sizes = splash_sizes(model, length)
  n = length // blk
  exact = n * n / 2
  forward = 2 * causal_tiles(n, 1) / exact
  if sizes.use_fused_bwd_kernel:
    backward = 5 * causal_tiles(n, sizes.block_kv_dkv // blk) / exact
  else:
    backward = 7 * causal_tiles(n, 1) / exact
  recompute = 0 if remat in KEEPS_ATTENTION else forward
  step = 8 * n_matmul + (forward + recompute + backward) * unit
  return step / model_flops


def main(argv=None) -> int:
  from pi_jax import presets
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="llama-7b", help="model preset (pi_jax.presets)")
  p.add_argument("--lengths", default="8192,16384,32768",
                 help="comma-separated sequence lengths")
  p.add_argument("--remat", default="full,save_attention",
                 help="remat policies (offload variants count as their in-HBM twins)")
  args = p.parse_args(argv)
  model = presets.preset(args.preset)
  policies = args.remat.split(",")
  print(f"train-step FLOPs / model FLOPs, {args.preset}, splash attention "
        f"(`python -m benchmarks.step_flops {' '.join(argv or sys.argv[1:])}`)\n")
  print("| window | splash backward | " + " | ".join(f"remat `{r}`" for r in policies) + " |")
  print("|---|---|" + "---|" * len(policies))
  for length in (int(x) for x in args.lengths.split(",")):
    _, sizes = splash_sizes(model, length)
    kind = (f"fused, key blocks of {sizes.block_kv_dkv}" if sizes.use_fused_bwd_kernel
            else "separate dq kernel")
    ratios = [step_over_model(model, length, r) for r in policies]
    print(f"| {length} | {kind} | " + " | ".join(f"{x:.2f}×" for x in ratios) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
