"""xla_blockwise: flash attention in plain XLA.

Online softmax over key blocks; query block i visits only key blocks 0..i (the blocks above the
causal diagonal are never computed, which halves the work at long lengths), memory is linear in
L, and a custom VJP recomputes the blocks from the saved log-sum-exp so training memory is
linear too. Segment ids (document masking) mask every block pair by equality of the ids; no block
is skipped for them (a block pair of two documents costs what it did, and its probabilities
are exactly 0). `to_blocks_q`, `to_blocks_kv`, `from_blocks_q` and `blockwise_core` are public: ring
attention runs the same core on its shards.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pi_jax.attention.reference import MASK_VALUE

# The checkpoint name of the attention kernels' own residuals (output and log-sum-exp): what
# the remat policy "save_attention" keeps (pi_jax.model).
RESIDUALS_NAME = "attention_residuals"

# Internal layout: the block axis leads (a dynamic index on it reads one contiguous block) and
# the G query heads of a K/V head are folded into the rows next to the T positions of a block:
#   q, dq, out  [nb, B, K, R, H]  with R = T·G, row r = position t·G + head g
#   k, v        [nb, B, K, T, H]
#   lse         [nb, B, K, R]     float32
#   segment ids [nb, B, T] of the queries and of the keys (int32; a query id stands for its
#               G rows, so the ids are not repeated G times)
# so each block pair is one [R, H] × [H, T] matmul per (B, K) with no transposes inside loops.


def to_blocks_q(x_BLNH, num_kv_heads, t):
  b, l, n, h = x_BLNH.shape
  x = x_BLNH.reshape(b, l // t, t, num_kv_heads, n // num_kv_heads, h)
  return x.transpose(1, 0, 3, 2, 4, 5).reshape(l // t, b, num_kv_heads, t * (n // num_kv_heads), h)


def from_blocks_q(x_nBKRH, t):
  nb, b, k, r, h = x_nBKRH.shape
  g = r // t
  return x_nBKRH.reshape(nb, b, k, t, g, h).transpose(1, 0, 3, 2, 4, 5).reshape(b, nb * t, k * g, h)


def to_blocks_kv(x_BLKH, t):
  b, l, k, h = x_BLKH.shape
  return x_BLKH.reshape(b, l // t, t, k, h).transpose(1, 0, 3, 2, 4)


def from_blocks_kv(x_nBKTH):
  nb, b, k, t, h = x_nBKTH.shape
  return x_nBKTH.transpose(1, 0, 3, 2, 4).reshape(b, nb * t, k, h)


def to_blocks_segments(seg_BL, t):
  """Segment ids [B, L] -> [nb, B, T], of query blocks (row r = t·G + g has id t) and key
  blocks alike."""
  b, l = seg_BL.shape
  return seg_BL.reshape(b, l // t, t).transpose(1, 0, 2)


def pad_segments(seg_BL, pad):
  """Block padding of segment ids: -1, a segment of its own (padded queries see only padded keys,
  so their rows stay finite; real queries never see padding: it is after them or masked)."""
  return jnp.pad(seg_BL, ((0, 0), (0, pad)), constant_values=-1) if pad else seg_BL


def _and(mask_a, mask_b):
  if mask_a is None:
    return mask_b
  return mask_a if mask_b is None else mask_a & mask_b


def _pair_ids(i, j, q_seg, kv_seg):
  """(query ids [B, T] of block i, key ids [B, T] of block j), or None without segments."""
  return None if q_seg is None else (q_seg[i], kv_seg[j])


def _masked(s_BKRT, mask_RT, ids):
  """Scores with keys outside the causal mask_RT and (ids) outside each query's segment at
  MASK_VALUE; ids come from _tied."""
  if ids is not None:
    q_ids_BT, kv_ids_BT = ids
    b, t = q_ids_BT.shape
    g = s_BKRT.shape[2] // t  # row r = t·G + g: a query id covers G consecutive rows
    same_BTGT = jnp.broadcast_to((q_ids_BT[:, :, None] == kv_ids_BT[:, None, :])[:, :, None],
                                 (b, t, g, kv_ids_BT.shape[1]))
    mask_RT = _and(mask_RT, same_BTGT.reshape(b, 1, t * g, -1))
  return s_BKRT if mask_RT is None else jnp.where(mask_RT, s_BKRT, MASK_VALUE)


def _tied(carry_x, q_BKRH, ids):
  """(carry_x, q_BKRH, ids) through an optimization barrier when there are ids, so that the
  block pair's scores and segment mask are computed only once the loop carry exists.

  The mask depends on the ids alone: without a barrier XLA computed every block pair's mask
  ahead of the loops and kept them all (ring in the model: +38 MB a chip at 8K, +0.9 GB at 32K
  on TPU). A barrier on (scores, ids) instead let the diagonal block's scores and mask be
  computed before the loop over the blocks below it and held through it (+11 MB at 8K).
  """
  if ids is None:
    return carry_x, q_BKRH, ids
  carry_x, q_BKRH, q_ids, kv_ids = jax.lax.optimization_barrier((carry_x, q_BKRH, *ids))
  return carry_x, q_BKRH, (q_ids, kv_ids)


def _diag_mask(t, g):
  """[R, T] True where row r (position r // G of the block) may see key s of the same block."""
  return jnp.asarray(np.arange(t)[None, :] <= (np.arange(t * g) // g)[:, None])


def _scores(q_BKRH, k_BKTH, scale):
  return jnp.einsum("BKRH,BKTH->BKRT", q_BKRH, k_BKTH, preferred_element_type=jnp.float32) * scale


def _online_step(carry, q_BKRH, k_BKTH, v_BKTH, scale, mask_RT=None, ids=None):
  """One key block of the online softmax; carry = (running max, running sum, accumulator).

  A row masked in the whole block adds exp(0) = 1 per key under MASK_VALUE as its running max;
  the first visible key (every query sees at least itself) multiplies that by
  exp(MASK_VALUE − real max) = 0, so it never reaches the result.
  """
  m_BKR, l_BKR, acc_BKRH = carry
  m_BKR, q_BKRH, ids = _tied(m_BKR, q_BKRH, ids)
  s_BKRT = _masked(_scores(q_BKRH, k_BKTH, scale), mask_RT, ids)
  m_new = jnp.maximum(m_BKR, jnp.max(s_BKRT, axis=-1))
  p_BKRT = jnp.exp(s_BKRT - m_new[..., None])
  alpha = jnp.exp(m_BKR - m_new)
  l_new = alpha * l_BKR + jnp.sum(p_BKRT, axis=-1)
  pv_BKRH = jnp.einsum("BKRT,BKTH->BKRH", p_BKRT.astype(v_BKTH.dtype), v_BKTH,
                       preferred_element_type=jnp.float32)
  return m_new, l_new, alpha[..., None] * acc_BKRH + pv_BKRH


def _key_mask(j, t, kv_valid):
  """[1, T] True for the keys of block j before kv_valid (None: no padding, no mask)."""
  if kv_valid is None:
    return None
  return (j * t + jnp.arange(t) < kv_valid)[None, :]


def _blockwise_fwd_core(q, k, v, causal: bool, kv_valid: int | None = None, q_seg=None,
                        kv_seg=None):
  """(out [nb,B,K,R,H] f32, lse [nb,B,K,R] f32); causal: q block i visits key blocks ≤ i only.

  causal=False attends every query block to every key block (ring attention's blocks from
  earlier shards), masking keys at or past kv_valid (block padding); q and k may then have
  different block counts. q_seg, kv_seg (blocked segment ids, or None): a query sees only keys
  of its segment. A row that sees no key at all (possible only with causal=False) comes out
  with lse ≈ MASK_VALUE, so merging it with any real partial result gives it weight 0.
  """
  nb, b, kh, r, h = q.shape
  nk, t = k.shape[0], k.shape[3]
  scale = 1.0 / math.sqrt(h)
  mask_RT = _diag_mask(t, r // t) if causal else None

  def q_block(i):
    q_i = q[i]
    init = (jnp.full((b, kh, r), -jnp.inf, jnp.float32), jnp.zeros((b, kh, r), jnp.float32),
            jnp.zeros((b, kh, r, h), jnp.float32))
    if causal:
      # The key blocks strictly below the diagonal need no mask; the dynamic trip count (i) is
      # what skips the blocks above it.
      carry = jax.lax.fori_loop(
          0, i, lambda j, c: _online_step(c, q_i, k[j], v[j], scale, None,
                                          _pair_ids(i, j, q_seg, kv_seg)), init)
      carry = _online_step(carry, q_i, k[i], v[i], scale, mask_RT,
                           _pair_ids(i, i, q_seg, kv_seg))
    else:
      carry = jax.lax.fori_loop(
          0, nk, lambda j, c: _online_step(c, q_i, k[j], v[j], scale,
                                           _key_mask(j, t, kv_valid),
                                           _pair_ids(i, j, q_seg, kv_seg)),
          init)
    m, l, acc = carry
    return acc / l[..., None], m + jnp.log(l)

  return jax.lax.map(q_block, jnp.arange(nb))


def _blockwise_bwd_core(q, k, v, out, lse, dout, dlse, causal: bool, kv_valid: int | None,
                        q_seg=None, kv_seg=None):
  """Flash-attention backward: key block j (outer) meets query blocks i ≥ j (inner).

  dK_j, dV_j accumulate in the inner loop's carry; dQ accumulates in a float32 buffer updated in
  place. `dlse` is the cotangent of the log-sum-exp output (ring attention merges with it).
  """
  nb, b, kh, r, h = q.shape
  nk, t = k.shape[0], k.shape[3]
  scale = 1.0 / math.sqrt(h)
  mask_RT = _diag_mask(t, r // t) if causal else None
  # dS = P ∘ (dP − D) with D = rowsum(dO ∘ O); the lse cotangent adds P ∘ dlse.
  delta = jnp.sum(dout * out, axis=-1) - dlse
  dout = dout.astype(q.dtype)

  def pair(i, j, carry, mask_RT=None):
    dk_BKTH, dv_BKTH, dq = carry
    q_i, do_i = q[i], dout[i]
    k_j, v_j = k[j], v[j]
    dk_BKTH, q_i, ids = _tied(dk_BKTH, q_i, _pair_ids(i, j, q_seg, kv_seg))
    s_BKRT = _masked(_scores(q_i, k_j, scale), mask_RT, ids)
    p_BKRT = jnp.exp(s_BKRT - lse[i][..., None])
    dv_BKTH += jnp.einsum("BKRT,BKRH->BKTH", p_BKRT.astype(do_i.dtype), do_i,
                          preferred_element_type=jnp.float32)
    dp_BKRT = jnp.einsum("BKRH,BKTH->BKRT", do_i, v_j, preferred_element_type=jnp.float32)
    ds_BKRT = (p_BKRT * (dp_BKRT - delta[i][..., None]) * scale).astype(q.dtype)
    dk_BKTH += jnp.einsum("BKRT,BKRH->BKTH", ds_BKRT, q_i, preferred_element_type=jnp.float32)
    dq_i = jnp.einsum("BKRT,BKTH->BKRH", ds_BKRT, k_j, preferred_element_type=jnp.float32)
    dq = jax.lax.dynamic_update_index_in_dim(dq, dq[i] + dq_i, i, 0)
    return dk_BKTH, dv_BKTH, dq

  def k_block(j, carry):
    dk, dv, dq = carry
    zeros = jnp.zeros((b, kh, t, h), jnp.float32)
    inner = (zeros, zeros, dq)
    if causal:
      inner = pair(j, j, inner, mask_RT)
      dk_j, dv_j, dq = jax.lax.fori_loop(j + 1, nb, lambda i, c: pair(i, j, c), inner)
    else:
      key_mask = _key_mask(j, t, kv_valid)
      dk_j, dv_j, dq = jax.lax.fori_loop(0, nb, lambda i, c: pair(i, j, c, key_mask), inner)
    dk = jax.lax.dynamic_update_index_in_dim(dk, dk_j, j, 0)
    dv = jax.lax.dynamic_update_index_in_dim(dv, dv_j, j, 0)
    return dk, dv, dq

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  dk, dv, dq = jax.lax.fori_loop(0, nk, k_block, init)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def blockwise_core(q, k, v, causal, kv_valid=None, q_seg=None, kv_seg=None):
  """(out f32, lse f32) in the blocked layout; differentiable in q, k, v through both outputs.
  q_seg, kv_seg: blocked segment ids (to_blocks_segments) or None."""
  return _blockwise_fwd_core(q, k, v, causal, kv_valid, q_seg, kv_seg)


def _core_fwd(q, k, v, causal, kv_valid, q_seg, kv_seg):
  out, lse = _blockwise_fwd_core(q, k, v, causal, kv_valid, q_seg, kv_seg)
  # Named so that remat="save_attention" keeps them and the backward pass skips this forward.
  out, lse = (checkpoint_name(x, RESIDUALS_NAME) for x in (out, lse))
  return (out, lse), (q, k, v, out, lse, q_seg, kv_seg)


def _core_bwd(causal, kv_valid, res, cotangents):
  q, k, v, out, lse, q_seg, kv_seg = res
  dout, dlse = cotangents
  grads = _blockwise_bwd_core(q, k, v, out, lse, dout.astype(jnp.float32),
                              dlse.astype(jnp.float32), causal, kv_valid, q_seg, kv_seg)
  return (*grads, None, None)  # segment ids are integers: no cotangent


blockwise_core.defvjp(_core_fwd, _core_bwd)


def block_length(length: int, block_size: int) -> int:
  """The block length actually used: block_size, or L rounded up to 8 when L is shorter."""
  if block_size <= 0:
    raise ValueError(f"attention block_size must be positive, got {block_size}")
  return min(block_size, -(-length // 8) * 8)


def blockwise_attention_grads(q_BLNH, k_BLKH, v_BLKH, out_BLNH, lse_BNL, dout_BLNH, *,
                              block_size: int, segment_ids_BL=None):
  """(dq, dk, dv) of causal attention from its output and float32 log-sum-exp lse [B, N, L]:
  the blockwise backward, for a forward kernel that saves (out, lse) (pi_jax.attention.cpu)."""
  b, l, n, h = q_BLNH.shape
  kh = k_BLKH.shape[2]
  t = block_length(l, block_size)
  pad = (-l) % t
  lse_BLN1 = lse_BNL.transpose(0, 2, 1)[..., None]
  # Padded rows: q = out = dout = 0 and lse 0, so their probabilities are finite and their
  # score gradients zero; padded keys sit after every real query.
  x = [q_BLNH, k_BLKH, v_BLKH, out_BLNH.astype(jnp.float32), lse_BLN1,
       dout_BLNH.astype(jnp.float32)]
  if pad:
    x = [jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in x]
  q, k, v, out, lse, dout = x
  lse = to_blocks_q(lse, kh, t)[..., 0]
  q_seg = kv_seg = None
  if segment_ids_BL is not None:
    seg = pad_segments(per_call(segment_ids_BL, dout_BLNH), pad)
    q_seg = kv_seg = to_blocks_segments(seg, t)
  dq, dk, dv = _blockwise_bwd_core(to_blocks_q(q, kh, t), to_blocks_kv(k, t), to_blocks_kv(v, t),
                                   to_blocks_q(out, kh, t), lse, to_blocks_q(dout, kh, t),
                                   jnp.zeros_like(lse), True, None, q_seg, kv_seg)
  return from_blocks_q(dq, t)[:, :l], from_blocks_kv(dk)[:, :l], from_blocks_kv(dv)[:, :l]


def _one_kv_head_at_a_time(core, q, k, v, q_seg, kv_seg):
  """core(q, k, v) -> out, run for each kv head (and its query heads) in turn: lax.map over K.

  The score tiles of one head, [T·G, T], are a third of the [K, T·G, T] tiles of all heads
  (0.8 MB instead of 2.4 MB in float32 for SmolLM2 at T = 256), so the softmax passes over them
  stay nearer the cache: on the 2-core CPU the 8K attention ran ~11% faster
  (docs/performance.md).
  """
  heads_first = lambda x: jnp.moveaxis(x, 2, 0)[:, :, :, None]  # [K, nb, B, 1, ., H]
  out = jax.lax.map(lambda qkv: core(*qkv, q_seg, kv_seg),
                    (heads_first(q), heads_first(k), heads_first(v)))
  return jnp.moveaxis(out[:, :, :, 0], 0, 2)


def per_call(segment_ids, like):
  """segment_ids (or None), available only once `like` is: tied to an input that changes from
  one layer to the next, the ids stop being invariant in the model's layer scan, so what an
  XLA kernel derives from them (padded, blocked, zig-zag or lane-wide copies) is computed in
  each layer and dies there instead of being hoisted out of the scan and held through the whole
  pass (the XLA ring at 8K: -1.15 MB a chip on TPU, docs/long_sequences.md)."""
  if segment_ids is None:
    return None
  return jax.lax.optimization_barrier((like, segment_ids))[1]


def blockwise_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int = 512,
                        kv_heads_in_turn: bool = False, segment_ids_BL=None):
  """Causal flash attention in plain XLA (see the module docstring); exact up to rounding.

  kv_heads_in_turn: one kv head at a time instead of all at once (faster on the CPU; the
  dispatcher in pi_jax.attention turns it on there).
  segment_ids_BL: int [B, L] or None; a query sees only earlier keys of its own segment.
  """
  b, l, n, h = q_BLNH.shape
  kh = k_BLKH.shape[2]
  t = block_length(l, block_size)
  pad = (-l) % t
  if pad:  # padded keys sit after every real query, so the causal mask alone hides them
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BLNH, k_BLKH, v_BLKH = (jnp.pad(x, widths) for x in (q_BLNH, k_BLKH, v_BLKH))
  core = lambda q, k, v, q_seg, kv_seg: blockwise_core(q, k, v, True, None, q_seg, kv_seg)[0]
  q, k, v = to_blocks_q(q_BLNH, kh, t), to_blocks_kv(k_BLKH, t), to_blocks_kv(v_BLKH, t)
  q_seg = kv_seg = None
  if segment_ids_BL is not None:
    seg = pad_segments(per_call(segment_ids_BL, q_BLNH).astype(jnp.int32), pad)
    q_seg = kv_seg = to_blocks_segments(seg, t)
  if kv_heads_in_turn and kh > 1:
    out = _one_kv_head_at_a_time(core, q, k, v, q_seg, kv_seg)
  else:
    out = core(q, k, v, q_seg, kv_seg)
  return from_blocks_q(out, t)[:, :l].astype(q_BLNH.dtype)
