"""Dense causal attention: plain softmax over the full L×L scores, the oracle for every fast path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large finite negative instead of -inf: a fully masked row then gives zeros, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def group_queries(q_BLNH: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B, L, N, H] -> [B, L, K, G, H] so each K/V head meets its G query heads."""
  b, l, n, h = q_BLNH.shape
  return q_BLNH.reshape(b, l, num_kv_heads, n // num_kv_heads, h)


def segment_mask(q_segment_BR, kv_segment_BT):
  """[B, 1, R, T] True where query r and key t belong to the same segment (document)."""
  return (q_segment_BR[:, :, None] == kv_segment_BT[:, None, :])[:, None]


def reference_attention(q_BLNH, k_BSKH, v_BSKH, *, q_offset=0, kv_length=None,
                        segment_ids_BL=None):
  """Dense causal attention; query i sits at key position q_offset + i.

  kv_length (optional, may be traced) masks keys at or past it (an unfilled KV cache).
  segment_ids_BL (int [B, L], self-attention only: S = L, q_offset 0): a query sees only keys of
  its own segment (document masking).
  """
  b, l, n, h = q_BLNH.shape
  s, k_heads = k_BSKH.shape[1], k_BSKH.shape[2]
  q_BLKGH = group_queries(q_BLNH, k_heads)
  scores_BKGLS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH,
                            preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(h))
  q_pos = q_offset + jnp.arange(l)[:, None]
  k_pos = jnp.arange(s)[None, :]
  allowed_LS = k_pos <= q_pos
  if kv_length is not None:
    allowed_LS &= k_pos < kv_length
  allowed = allowed_LS
  if segment_ids_BL is not None:
    if s != l or not (isinstance(q_offset, int) and q_offset == 0):
      raise ValueError("segment ids are for self-attention over one sequence (no KV cache)")
    allowed = allowed_LS & segment_mask(segment_ids_BL, segment_ids_BL)[:, :, None]
  scores_BKGLS = jnp.where(allowed, scores_BKGLS, MASK_VALUE)
  probs_BKGLS = jax.nn.softmax(scores_BKGLS, axis=-1)
  out_BLKGH = jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
  return out_BLKGH.reshape(b, l, n, h).astype(q_BLNH.dtype)
