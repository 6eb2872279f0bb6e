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
- ring (ring.py): context parallelism over the `sequence` mesh axis, load-balanced (zig-zag).
Which one a run uses ("auto", the tile) is decided by pi_jax.dispatch, not here.
"""

from __future__ import annotations

from pi_jax.attention.blockwise import (RESIDUALS_NAME, block_length, blockwise_attention,
                                        blockwise_core)
from pi_jax.attention.cpu import cpu_flash_attention
from pi_jax.attention.kernels import cudnn_attention, splash_attention
from pi_jax.attention.reference import MASK_VALUE, group_queries, reference_attention
from pi_jax.attention.ring import SEQUENCE_AXIS, ring_attention
from pi_jax.run import ATTENTION_IMPLS

IMPLS = tuple(i for i in ATTENTION_IMPLS if i != "auto")


def attention(q_BLNH, k_BLKH, v_BLKH, *, impl: str = "xla_blockwise", block_size: int = 512,
              kv_heads_in_turn: bool = False, interpret: bool = False):
  """Causal self-attention with the implementation named by `impl` (one of IMPLS).

  block_size: the tile. kv_heads_in_turn: xla_blockwise computes one kv head at a time (faster
  on the CPU). interpret: run the Pallas kernel (splash) in interpret mode, on any backend.
  """
  if q_BLNH.shape[2] % k_BLKH.shape[2]:
    raise ValueError(f"query heads {q_BLNH.shape[2]} are not a multiple of kv heads "
                     f"{k_BLKH.shape[2]}")
  if impl not in IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS} "
                     "('auto' is resolved by pi_jax.dispatch.choose)")
  if impl == "reference":
    return reference_attention(q_BLNH, k_BLKH, v_BLKH)
  if impl == "xla_blockwise":
    return blockwise_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size,
                               kv_heads_in_turn=kv_heads_in_turn)
  if impl == "cpu_flash":
    return cpu_flash_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size)
  if impl == "cudnn":
    return cudnn_attention(q_BLNH, k_BLKH, v_BLKH)
  if impl == "splash":
    return splash_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size, interpret=interpret)
  return ring_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size)
