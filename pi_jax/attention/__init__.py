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
- auto: ring under a mesh with a `sequence` axis, else splash on TPU, cudnn on GPU for bf16/fp16,
  cpu_flash on the CPU for float32 when the native kernels build, else xla_blockwise. "On TPU"
  means the platform compiled for (kernels.backend): a mesh over TPU topology devices counts.

Document masking: every implementation takes segment ids int [B, L] (a query sees only earlier
keys with its own id). cudnn is the exception: jax.nn.dot_product_attention takes per-row
lengths or a dense [B, N, L, L] mask, no segment ids, so with segment ids `cudnn` runs the
masked xla_blockwise instead (linear memory; docs/long_sequences.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pi_jax.attention.blockwise import (RESIDUALS_NAME, block_length, blockwise_attention,
                                        blockwise_core)
from pi_jax import native
from pi_jax.attention import kernels
from pi_jax.attention.cpu import FORWARD_BLOCK as CPU_FLASH_BLOCK, cpu_flash_attention
from pi_jax.attention.kernels import cudnn_attention, splash_attention
from pi_jax.attention.reference import MASK_VALUE, group_queries, reference_attention
from pi_jax.attention.ring import SEQUENCE_AXIS, ring_attention
from pi_jax.config import ATTENTION_IMPLS

# The attention tile when the config leaves it to the implementation (block_size None): 512
# (splash's tile on TPU; ring and xla_blockwise off the CPU), 256 for xla_blockwise on the CPU,
# where the [3·256, 256] float32 score tile stays near the cache and the 8K forward ran ~10%
# faster than at 512 (docs/performance.md).
DEFAULT_BLOCK = 512
CPU_BLOCK = 256


def block_size_for(impl: str, block_size: int | None) -> int:
  """The tile `impl` (resolved, not "auto") uses: block_size, or its default when None."""
  if block_size is not None:
    return block_size
  if impl == "cpu_flash":
    return CPU_FLASH_BLOCK
  if impl in ("xla_blockwise", "ring") and kernels.backend() == "cpu":
    return CPU_BLOCK
  return DEFAULT_BLOCK


def resolve_impl(impl: str, dtype) -> str:
  """The implementation `auto` stands for on this backend and compute dtype."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.shape.get(SEQUENCE_AXIS, 1) > 1:
    return "ring"  # the only implementation that splits the sequence
  backend = kernels.backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if backend == "cpu" and jnp.dtype(dtype) == jnp.float32 and native.available():
    return "cpu_flash"
  return "xla_blockwise"


def attention(q_BLNH, k_BLKH, v_BLKH, *, impl: str = "auto", block_size: int | None = None,
              segment_ids_BL=None, interpret: bool = False):
  """Causal self-attention with the implementation named by `impl`.

  block_size: the tile (None: the implementation's default, `block_size_for`).
  segment_ids_BL: int [B, L] or None; with ids a query sees only earlier-or-equal keys of its
    own segment (packed documents). cudnn then runs masked xla_blockwise (module docstring).
  interpret: run the Pallas kernel (splash) in interpret mode, on any backend (tests).
  """
  if q_BLNH.shape[2] % k_BLKH.shape[2]:
    raise ValueError(f"query heads {q_BLNH.shape[2]} are not a multiple of kv heads "
                     f"{k_BLKH.shape[2]}")
  impl = resolve_impl(impl, q_BLNH.dtype)
  seg = segment_ids_BL
  if seg is not None:
    if seg.shape != q_BLNH.shape[:2]:
      raise ValueError(f"segment ids of shape {seg.shape}; expected [batch, length] = "
                       f"{q_BLNH.shape[:2]}")
    seg = seg.astype(jnp.int32)
    if impl == "cudnn":  # no segment ids in jax.nn.dot_product_attention (module docstring)
      impl = "xla_blockwise"
  block_size = block_size_for(impl, block_size)
  if impl == "reference":
    return reference_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL=seg)
  if impl == "xla_blockwise":
    return blockwise_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size,
                               kv_heads_in_turn=kernels.backend() == "cpu", segment_ids_BL=seg)
  if impl == "cpu_flash":
    return cpu_flash_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size, segment_ids_BL=seg)
  if impl == "cudnn":
    return cudnn_attention(q_BLNH, k_BLKH, v_BLKH)
  if impl == "splash":
    return splash_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size, interpret=interpret,
                            segment_ids_BL=seg)
  return ring_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size, segment_ids_BL=seg)
