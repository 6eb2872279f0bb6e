"""Ring attention: causal self-attention with the sequence split over the `sequence` mesh axis.

Shard i of n holds queries, keys and values of positions [i·L/n, (i+1)·L/n). K/V chunks travel
round the ring with `ppermute`; after s steps shard i holds the chunk of shard i − s (mod n),
which it attends to only when that chunk comes earlier in the sequence (i ≥ s): the chunks of
later shards are skipped entirely (causality), not masked. Each step's partial result (output,
log-sum-exp) is merged with the running one by the online-softmax rule, in float32.

RoPE is applied before attention from the GLOBAL positions (model.hidden_states computes them for
the whole sequence), so Position Interpolation's scaled positions are right on every shard.
Batch stays split over data/fsdp and heads over tensor where they divide; the computation is
otherwise the blockwise kernel of pi_jax.attention.blockwise. No load balancing: shard i does i + 1 chunk
pairs, so the last shard sets the pace.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pi_jax.attention import blockwise
from pi_jax.sharding import LOGICAL_AXIS_RULES

# The mesh axis the sequence ("length") is split over, from the one axis table.
(SEQUENCE_AXIS,) = LOGICAL_AXIS_RULES["length"]


def _merge(o_a, lse_a, o_b, lse_b):
  """Combines two softmax-normalized partial attentions over disjoint key sets."""
  lse = jnp.logaddexp(lse_a, lse_b)
  return (o_a * jnp.exp(lse_a - lse)[..., None] + o_b * jnp.exp(lse_b - lse)[..., None]), lse


def _ring_shard(q_BCNH, k_BCKH, v_BCKH, *, block_size: int, axis: str, n_shards: int):
  """Runs on one shard: local chunks of length C; returns the local attention output."""
  b, c, n, h = q_BCNH.shape
  kh = k_BCKH.shape[2]
  t = blockwise.block_length(c, block_size)
  pad = (-c) % t
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BCNH, k_BCKH, v_BCKH = (jnp.pad(x, widths) for x in (q_BCNH, k_BCKH, v_BCKH))
  q = blockwise.to_blocks_q(q_BCNH, kh, t)
  kv = (blockwise.to_blocks_kv(k_BCKH, t), blockwise.to_blocks_kv(v_BCKH, t))
  # Own chunk: the causal diagonal (trailing padding is hidden by the causal mask).
  out, lse = blockwise.blockwise_core(q, kv[0], kv[1], True, None)
  idx = jax.lax.axis_index(axis)
  perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]
  kv_valid = c if pad else None
  for step in range(1, n_shards):
    kv = jax.lax.ppermute(kv, axis, perm)

    def attend(out, lse, kv):
      o_s, lse_s = blockwise.blockwise_core(q, kv[0], kv[1], False, kv_valid)
      return _merge(out, lse, o_s, lse_s)

    # The chunk now held came from shard idx − step; it is in the past only if idx ≥ step.
    out, lse = jax.lax.cond(idx >= step, attend, lambda out, lse, kv: (out, lse), out, lse, kv)
  return blockwise.from_blocks_q(out, t)[:, :c].astype(q_BCNH.dtype)


def _divisible_axes(mesh, axes, size):
  kept, prod = [], 1
  for a in axes:
    m = mesh.shape.get(a, 1)
    if m > 1 and size % (prod * m) == 0:
      kept.append(a)
      prod *= m
  return tuple(kept)


def ring_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int = 512, axis: str = SEQUENCE_AXIS):
  """Causal attention with context parallelism over mesh axis `axis` (under `jax.set_mesh`).

  Without a mesh, or when `axis` has size 1, this is exactly xla_blockwise attention.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(axis, 1) == 1:
    return blockwise.blockwise_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size)
  n_shards = mesh.shape[axis]
  b, l, n, h = q_BLNH.shape
  kh = k_BLKH.shape[2]
  if l % n_shards:
    raise ValueError(f"ring attention: sequence length {l} is not divisible by the {n_shards} "
                     f"shards of mesh axis {axis!r}; pad the batch to a multiple of {n_shards}")
  batch = _divisible_axes(mesh, LOGICAL_AXIS_RULES["batch"], b)
  heads = _divisible_axes(mesh, LOGICAL_AXIS_RULES["act_heads"], n)
  if heads and kh % mesh.shape[heads[0]]:
    heads = ()  # GQA groups must stay whole on a shard: split heads only when kv heads split too
  spec = P(batch or None, axis, heads[0] if heads else None, None)
  fn = functools.partial(_ring_shard, block_size=block_size, axis=axis, n_shards=n_shards)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BLNH, k_BLKH, v_BLKH)
