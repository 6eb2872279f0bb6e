"""Flash attention of one query chunk against one key chunk, as a Pallas TPU kernel: the
per-pair kernel of ring attention (pi_jax.attention.ring).

Ring attention merges the pairs' partial results by their log-sum-exp and differentiates the
whole ring at once (its backward hands every pair the GLOBAL output and log-sum-exp), so this
module gives the two halves separately instead of one differentiable function:
- `pair_forward`: (out, lse) of softmax(q·kᵀ) v over this key chunk only.
- `pair_grads`: the pair's share (dq, dk, dv) of the gradient of an attention whose softmax
  spans more keys, from the whole attention's out and lse: p = exp(s − lse) and the row terms
  Σ out·dout are then the global ones, and the shares of all pairs add up to the gradient.

Queries come scaled (1/√H). A pair is causal (a chunk against itself) or full (against an
earlier chunk). GQA natively: query head n reads key head n // G.

Segment ids (document masking) are read as they are stored, one int32 a position ([B, 1, C],
blocks of [1, T]); the kernel turns a block of query ids into a column itself. With `ids_starts`
the ids are a longer row (ring attention hands every pair its shard's whole row of ids) and the
chunks' first positions pick the blocks, as scalars prefetched before the grid runs: no copy of
a chunk's ids is made for a call. Splash instead takes query ids lane-wide ([C, 128] int32, 128
times the ids) and its log-sum-exp lane-wide ([N, C, 128] float32): in the ring those buffers
made the ids cost ~15 times their own bytes per chip (docs/long_sequences.md). Here out, lse
and the row terms are [B, N, 1, C] rows.

Masked scores are MASK_VALUE, as in the other implementations: a query row that sees no key in
this chunk gets lse ≈ MASK_VALUE, which a log-sum-exp merge weighs by exactly 0; the diagonal
(causal) pair always shows a query its own key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pi_jax.attention.kernels import SPLASH_TILE as TILE  # the TPU lane width
from pi_jax.attention.kernels import splash_block
from pi_jax.attention.reference import MASK_VALUE

_F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # a·bᵀ: contract both operands' last axes


def block_for(length: int, block_size: int) -> int:
  """The kernel's block (splash's rule: the largest multiple of TILE that is ≤ block_size and
  divides `length`), for a chunk `length` that must be a multiple of TILE."""
  if length % TILE:
    raise ValueError(f"pair flash attention: chunk length {length} is not a multiple of {TILE}")
  return splash_block(length, block_size)


def _column(row_1X):
  """(X, 1) of a (1, X) row (Mosaic transposes whole (8, X) tiles)."""
  return jnp.transpose(jnp.broadcast_to(row_1X, (8, row_1X.shape[1])))[:, :1]


def _visible(causal, row_start, col_start, shape, rows_are_queries, row_ids_ref, col_ids_ref):
  """(rows, cols) bool of which scores count, or None when all do: causal (query position ≥
  key position) and same segment (the ids refs' [1, T] blocks, or None). Rows are queries
  (forward, dq) or keys (dk, dv)."""
  mask = None
  if causal:
    rows = row_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    mask = rows >= cols if rows_are_queries else cols >= rows
  if row_ids_ref is not None:
    same = _column(row_ids_ref[...]) == col_ids_ref[...]
    mask = same if mask is None else jnp.logical_and(mask, same)
  return mask


def _ids(refs, has_ids):
  """(query ids ref, key ids ref, the other refs) of a kernel's refs; with ids the first ref is
  the prefetched block offsets, which only the index maps read."""
  return (refs[1], refs[2], refs[3:]) if has_ids else (None, None, refs)


def _forward_kernel(*refs, causal, has_ids, bq, bk, nk):
  q_ids, k_ids, (q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc) = _ids(refs, has_ids)
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  # A causal pair skips the key blocks wholly after the query block.
  @pl.when(jnp.logical_or(not causal, kj * bk < (qi + 1) * bq))
  def _():
    s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=_F32)
    mask = _visible(causal, qi * bq, kj * bk, s.shape, True, q_ids, k_ids)
    if mask is not None:
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    v = v_ref[...]
    acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32)

  @pl.when(kj == nk - 1)
  def _():
    l = l_sc[...]
    o_ref[...] = (acc_sc[...] / l).astype(o_ref.dtype)
    lse_col = m_sc[...] + jnp.log(l)
    lse_ref[...] = jnp.transpose(jnp.broadcast_to(lse_col, (bq, TILE)))[:1, :]


def _dq_kernel(*refs, causal, has_ids, bq, bk, nk):
  q_ids, k_ids, (q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dq_ref, dq_sc) = _ids(refs,
                                                                                     has_ids)
  qi, kj = pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _():
    dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

  @pl.when(jnp.logical_or(not causal, kj * bk < (qi + 1) * bq))
  def _():
    k = k_ref[...]
    s = jax.lax.dot_general(q_ref[...], k, _NT, preferred_element_type=_F32)
    p = jnp.exp(s - _column(lse_ref[...]))
    mask = _visible(causal, qi * bq, kj * bk, s.shape, True, q_ids, k_ids)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=_F32)
    ds = p * (dp - _column(di_ref[...]))
    dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)

  @pl.when(kj == nk - 1)
  def _():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(*refs, causal, has_ids, bq, bk, nq, groups):
  """Scores transposed, (keys, queries): the lse and row-term rows broadcast as they come."""
  q_ids, k_ids, (q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref, dk_ref, dv_ref, dk_sc,
                 dv_sc) = _ids(refs, has_ids)
  kj, g, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when(jnp.logical_and(g == 0, qi == 0))
  def _():
    dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

  @pl.when(jnp.logical_or(not causal, (qi + 1) * bq > kj * bk))
  def _():
    q, do = q_ref[...], do_ref[...]
    s_t = jax.lax.dot_general(k_ref[...], q, _NT, preferred_element_type=_F32)
    p_t = jnp.exp(s_t - lse_ref[...])
    mask = _visible(causal, kj * bk, qi * bq, s_t.shape, False, k_ids, q_ids)
    if mask is not None:
      p_t = jnp.where(mask, p_t, 0.0)
    dv_sc[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=_F32)
    dp_t = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=_F32)
    ds_t = p_t * (dp_t - di_ref[...])
    dk_sc[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=_F32)

  @pl.when(jnp.logical_and(g == groups - 1, qi == nq - 1))
  def _():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _check(q_BNCH, k_BKCH, ids, ids_starts):
  b, n, c, _ = q_BNCH.shape
  if k_BKCH.shape[2] != c or n % k_BKCH.shape[1]:
    raise ValueError(f"pair flash attention: queries {q_BNCH.shape} and keys {k_BKCH.shape} "
                     "need the same chunk length and a whole number of query heads per key head")
  for x in ids:
    if x is None:
      continue
    if ids_starts is None and x.shape != (b, c):
      raise ValueError(f"pair flash attention: segment ids {x.shape}, not {(b, c)}")
    if ids_starts is not None and (x.ndim != 2 or x.shape[0] != b or x.shape[1] < c):
      raise ValueError(f"pair flash attention: segment ids {x.shape} are not rows of at "
                       f"least the chunk's {c} positions for batch {b}")
  return b, n, c, n // k_BKCH.shape[1]


def _ids_args(q_ids_BC, kv_ids_BC, ids_starts, blocks, q_block, k_block):
  """(the prefetched [query, key] block offsets and the ids as [B, 1, ·] int32 arguments, their
  block specs), or ((), []) without ids. q_block, k_block: (block length, index map of the grid
  indices and the offsets ref to the block index within the chunk)."""
  if q_ids_BC is None:
    return (), []
  starts = (0, 0) if ids_starts is None else ids_starts
  offsets = jnp.stack([jnp.asarray(x, jnp.int32) // t for x, t in zip(starts, blocks)])
  ids = tuple(x.astype(jnp.int32)[:, None, :] for x in (q_ids_BC, kv_ids_BC))
  spec = lambda t, index, which: pl.BlockSpec(
      (None, 1, t), lambda *a: (a[0], 0, a[-1][which] + index(*a)))
  return (offsets, *ids), [spec(*q_block, 0), spec(*k_block, 1)]


def _grid_spec(ids, grid, in_specs, out_specs, scratch_shapes):
  """The pallas_call grid: with ids, the block offsets (ids[0]) are prefetched scalars."""
  if ids:
    return pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                        out_specs=out_specs, scratch_shapes=scratch_shapes)
  return pl.GridSpec(grid=grid, in_specs=in_specs, out_specs=out_specs,
                     scratch_shapes=scratch_shapes)


def _key_block(causal, bq, bk):
  """The key block a (query block, key block) step reads: a causal pair's skipped steps read
  the last block they need again, so no DMA fetches a block that is not used."""
  return lambda qi, kj: jnp.minimum(kj, ((qi + 1) * bq - 1) // bk) if causal else kj


def _query_major(causal, bq, bk, h, groups, q_ids_BC, kv_ids_BC, ids_starts):
  """(ids arguments, their specs, q spec, k/v spec, row spec) of a (b, n, query block, key
  block) grid: the forward and the dq kernel. Index maps take (b, n, i, j[, offsets])."""
  key = _key_block(causal, bq, bk)
  ids, ids_specs = _ids_args(q_ids_BC, kv_ids_BC, ids_starts, (bq, bk),
                             (bq, lambda b_, n_, i, j, *_: i),
                             (bk, lambda b_, n_, i, j, *_: key(i, j)))
  q_spec = pl.BlockSpec((None, None, bq, h), lambda b_, n_, i, j, *_: (b_, n_, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, h),
                         lambda b_, n_, i, j, *_: (b_, n_ // groups, key(i, j), 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b_, n_, i, j, *_: (b_, n_, 0, i))
  return ids, ids_specs, q_spec, kv_spec, row_spec


@functools.partial(jax.jit, static_argnames=("causal", "block_size", "interpret"))
def pair_forward(q_BNCH, k_BKCH, v_BKCH, q_ids_BC=None, kv_ids_BC=None, *, causal: bool,
                 block_size: int = 512, interpret: bool = False, ids_starts=None):
  """(out [B, N, C, H] in q's dtype, lse [B, N, C] float32) of scaled queries against one key
  chunk; q_ids_BC, kv_ids_BC: int [B, C] segment ids of the two chunks, or None. ids_starts:
  (query chunk start, key chunk start), int scalars that are multiples of the kernel's block
  (`block_for`): the ids are then longer rows [B, L] and the chunks' ids begin there."""
  b, n, c, groups = _check(q_BNCH, k_BKCH, (q_ids_BC, kv_ids_BC), ids_starts)
  h = q_BNCH.shape[3]
  bq = bk = block_for(c, block_size)
  nq, nk = c // bq, c // bk
  ids, ids_specs, q_spec, kv_spec, row_spec = _query_major(causal, bq, bk, h, groups, q_ids_BC,
                                                           kv_ids_BC, ids_starts)
  kernel = functools.partial(_forward_kernel, causal=causal, has_ids=bool(ids), bq=bq, bk=bk,
                             nk=nk)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=_grid_spec(ids, (b, n, nq, nk), ids_specs + [q_spec, kv_spec, kv_spec],
                           [q_spec, row_spec],
                           [pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32),
                            pltpu.VMEM((bq, h), _F32)]),
      out_shape=[jax.ShapeDtypeStruct(q_BNCH.shape, q_BNCH.dtype),
                 jax.ShapeDtypeStruct((b, n, 1, c), _F32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="pair_flash_forward",
  )(*ids, q_BNCH, k_BKCH, v_BKCH)
  return out, lse[:, :, 0]


@functools.partial(jax.jit, static_argnames=("causal", "block_size", "interpret"))
def pair_grads(q_BNCH, k_BKCH, v_BKCH, q_ids_BC, kv_ids_BC, out_BNCH, lse_BNC, dout_BNCH, *,
               causal: bool, block_size: int = 512, interpret: bool = False, ids_starts=None):
  """(dq [B, N, C, H], dk, dv [B, K, C, H]) in q's and k's dtypes (summed in float32 inside):
  this pair's share of the gradient of an attention whose output and log-sum-exp over ALL its
  keys are out_BNCH and lse_BNC (module docstring); dout_BNCH is that output's cotangent.
  ids_starts: as in `pair_forward`."""
  b, n, c, groups = _check(q_BNCH, k_BKCH, (q_ids_BC, kv_ids_BC), ids_starts)
  kh, h = k_BKCH.shape[1], q_BNCH.shape[3]
  bq = bk = block_for(c, block_size)
  nq, nk = c // bq, c // bk
  f32 = lambda x: x.astype(_F32)
  lse_rows = lse_BNC[:, :, None, :]
  di_rows = jnp.sum(f32(out_BNCH) * f32(dout_BNCH), axis=-1)[:, :, None, :]
  params = lambda axes: pltpu.CompilerParams(dimension_semantics=axes)

  # dq: (query block, key block) steps, keys innermost.
  ids, ids_specs, q_spec, kv_spec, row_spec = _query_major(causal, bq, bk, h, groups, q_ids_BC,
                                                           kv_ids_BC, ids_starts)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, causal=causal, has_ids=bool(ids), bq=bq, bk=bk, nk=nk),
      grid_spec=_grid_spec(ids, (b, n, nq, nk),
                           ids_specs + [q_spec, kv_spec, kv_spec, row_spec, row_spec, q_spec],
                           q_spec, [pltpu.VMEM((bq, h), _F32)]),
      out_shape=jax.ShapeDtypeStruct(q_BNCH.shape, q_BNCH.dtype),
      compiler_params=params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="pair_flash_dq",
  )(*ids, q_BNCH, k_BKCH, v_BKCH, lse_rows, di_rows, dout_BNCH)

  # dk, dv: (key block, query head of the group, query block) steps, queries innermost; a
  # causal pair's skipped steps read the first query block they need.
  first = (lambda j, i: jnp.maximum(i, (j * bk) // bq)) if causal else (lambda j, i: i)
  ids, ids_specs = _ids_args(q_ids_BC, kv_ids_BC, ids_starts, (bq, bk),
                             (bq, lambda b_, k_, j, g, i, *_: first(j, i)),
                             (bk, lambda b_, k_, j, g, i, *_: j))
  q_spec = pl.BlockSpec((None, None, bq, h),
                        lambda b_, k_, j, g, i, *_: (b_, k_ * groups + g, first(j, i), 0))
  kv_spec = pl.BlockSpec((None, None, bk, h), lambda b_, k_, j, g, i, *_: (b_, k_, j, 0))
  row_spec = pl.BlockSpec((None, None, 1, bq),
                          lambda b_, k_, j, g, i, *_: (b_, k_ * groups + g, 0, first(j, i)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, causal=causal, has_ids=bool(ids), bq=bq, bk=bk, nq=nq,
                        groups=groups),
      grid_spec=_grid_spec(ids, (b, kh, nk, groups, nq),
                           ids_specs + [q_spec, kv_spec, kv_spec, row_spec, row_spec, q_spec],
                           [kv_spec, kv_spec],
                           [pltpu.VMEM((bk, h), _F32), pltpu.VMEM((bk, h), _F32)]),
      out_shape=[jax.ShapeDtypeStruct(k_BKCH.shape, k_BKCH.dtype)] * 2,
      compiler_params=params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=interpret, name="pair_flash_dkv",
  )(*ids, q_BNCH, k_BKCH, v_BKCH, lse_rows, di_rows, dout_BNCH)
  return dq, dk, dv
