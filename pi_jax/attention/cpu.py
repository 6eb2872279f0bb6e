"""cpu_flash: causal attention by pi_jax's native CPU kernel (pi_jax.native), with gradients.

The forward is one FFI call: flash attention over the lower triangle in C++ over OpenBLAS,
each (batch, kv head, query block) a work item for the cores with the kv head's query heads in
one product, the online softmax on the score tile while it is in cache. It returns the
log-sum-exp beside the output, so the backward is the blockwise backward of xla_blockwise (no
forward recomputed). Computes in float32 whatever the input dtype. Under a mesh it runs inside
`shard_map` like splash (XLA cannot partition an FFI call).
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name

from pi_jax import native
from pi_jax.attention.blockwise import RESIDUALS_NAME, blockwise_attention_grads
from pi_jax.attention.kernels import backend, over_batch_and_heads

# The forward's tile: with a kv head's 3 query heads together, SmolLM2's 8K attention ran 0.40 s
# a layer at 256, 0.41 at 384, 0.42-0.43 at 128 and 512 on the 2-core CPU (its score tile
# [3·256, 256] float32, 0.8 MB, stays in the 2 MB L2). The backward is XLA's; its CPU tile is 256.
FORWARD_BLOCK = 256
BACKWARD_BLOCK = 256


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BLNH, k_BLKH, v_BLKH, seg_BL, block_size):
  return native.causal_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size,
                                 segment_ids_BL=seg_BL)[0].astype(q_BLNH.dtype)


def _fwd(q_BLNH, k_BLKH, v_BLKH, seg_BL, block_size):
  out, lse = native.causal_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size,
                                     segment_ids_BL=seg_BL)
  # Named so that remat="save_attention" keeps them and the backward pass skips this forward.
  out, lse = (checkpoint_name(x, RESIDUALS_NAME) for x in (out, lse))
  return out.astype(q_BLNH.dtype), (q_BLNH, k_BLKH, v_BLKH, seg_BL, out, lse)


def _bwd(block_size, res, dout):
  q, k, v, seg, out, lse = res
  grads = blockwise_attention_grads(q, k, v, out, lse, dout, block_size=BACKWARD_BLOCK,
                                    segment_ids_BL=seg)
  return (*grads, None)


_attention.defvjp(_fwd, _bwd)


def cpu_flash_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int = FORWARD_BLOCK,
                        segment_ids_BL=None):
  """Causal attention by the native CPU kernel; the output has q's dtype. segment_ids_BL (int
  [B, L] or None) are masked inside the kernel's tiles, and in the blockwise backward."""
  if backend() != "cpu":
    raise ValueError(f"attention impl 'cpu_flash' runs on the CPU; the JAX backend is "
                     f"{backend()!r}. Use 'auto'.")
  if not native.available():
    raise ValueError(f"attention impl 'cpu_flash' is unavailable: {native.unavailable_reason()}."
                     " Use 'xla_blockwise' (or 'auto', which falls back to it).")
  fn = lambda q, k, v, seg=None: _attention(q, k, v, seg, block_size)
  return over_batch_and_heads(fn, "cpu_flash", q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
