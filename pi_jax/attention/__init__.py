"""Causal self-attention: one entry point, several implementations.

All take q [B, L, N, H] and k, v [B, L, K, H] with N = K·G (grouped-query attention: the G query
heads of a group share one K/V head, which is never copied per query head) and return
[B, L, N, H]. Softmax statistics are float32 whatever the compute dtype.

- reference (reference.py): plain softmax over the full L×L score matrix; the oracle.
- xla_blockwise (blockwise.py): flash attention in plain XLA, linear memory, custom VJP.
- cpu_flash (cpu.py): the native C++ flash kernel over OpenBLAS (pi_jax.native) on the CPU;
  the backward is xla_blockwise's.
- cudnn, splash (kernels.py): the cuDNN flash kernel on NVIDIA GPUs, Pallas splash on TPU
  (inside shard_map over batch and heads; verified on CPU in Pallas interpret mode).
- ring (ring.py): context parallelism over the `sequence` mesh axis, load-balanced (zig-zag);
  a Pallas flash kernel on every chunk pair on TPU (pair_flash.py), xla_blockwise elsewhere.
Which one a run uses ("auto", the tile) is decided by pi_jax.dispatch, not here.

Document masking: every implementation takes segment ids int [B, L] (a query sees only earlier
keys with its own id). cudnn is the exception: jax.nn.dot_product_attention takes per-row
lengths or a dense [B, N, L, L] mask, no segment ids, so with segment ids `cudnn` runs the
masked xla_blockwise instead (linear memory; docs/long_sequences.md).
"""

from __future__ import annotations

import jax.numpy as jnp

from pi_jax.attention.blockwise import (RESIDUALS_NAME, block_length, blockwise_attention,
                                        blockwise_core)
from pi_jax.attention.cpu import cpu_flash_attention
from pi_jax.attention.kernels import cudnn_attention, splash_attention
from pi_jax.attention.reference import MASK_VALUE, group_queries, reference_attention
from pi_jax.attention.ring import SEQUENCE_AXIS, ring_attention
from pi_jax.run import ATTENTION_IMPLS

IMPLS = tuple(i for i in ATTENTION_IMPLS if i != "auto")


def attention(q_BLNH, k_BLKH, v_BLKH, *, impl: str = "xla_blockwise", block_size: int = 512,
              kv_heads_in_turn: bool = False, segment_ids_BL=None, interpret: bool = False):
  """Causal self-attention with the implementation named by `impl` (one of IMPLS).

  block_size: the tile. kv_heads_in_turn: xla_blockwise computes one kv head at a time (faster
  on the CPU). segment_ids_BL: int [B, L] or None; with ids a query sees only earlier-or-equal
  keys of its own segment (packed documents); cudnn then runs masked xla_blockwise (module
  docstring). interpret: run the Pallas kernels (splash, and ring's pair kernel) in
  interpret mode, on any backend.
  """
  if q_BLNH.shape[2] % k_BLKH.shape[2]:
    raise ValueError(f"query heads {q_BLNH.shape[2]} are not a multiple of kv heads "
                     f"{k_BLKH.shape[2]}")
  if impl not in IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS} "
                     "('auto' is resolved by pi_jax.dispatch.choose)")
  seg = segment_ids_BL
  if seg is not None:
    if seg.shape != q_BLNH.shape[:2]:
      raise ValueError(f"segment ids of shape {seg.shape}; expected [batch, length] = "
                       f"{q_BLNH.shape[:2]}")
    seg = seg.astype(jnp.int32)
    if impl == "cudnn":  # no segment ids in jax.nn.dot_product_attention (module docstring)
      impl = "xla_blockwise"
  if impl == "reference":
    return reference_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL=seg)
  if impl == "xla_blockwise":
    return blockwise_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size,
                               kv_heads_in_turn=kv_heads_in_turn, segment_ids_BL=seg)
  if impl == "cpu_flash":
    return cpu_flash_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size, segment_ids_BL=seg)
  if impl == "cudnn":
    return cudnn_attention(q_BLNH, k_BLKH, v_BLKH)
  if impl == "splash":
    return splash_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size, interpret=interpret,
                            segment_ids_BL=seg)
  return ring_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size, segment_ids_BL=seg,
                        interpret=interpret)
