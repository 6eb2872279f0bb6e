"""Ring attention: causal self-attention with the sequence split over the `sequence` mesh axis,
load-balanced.

The sequence is cut into 2n chunks of L/(2n) positions for n shards. Which chunks a shard holds
is its layout (`shard_chunks`):
- zigzag (default): shard i holds chunks i and 2n−1−i. Under the causal mask every shard then
  does the same work: at ring step 0 its own two chunks (two causal diagonals and one full
  chunk pair), at every later step exactly two full chunk pairs.
- contiguous: shard i holds chunks 2i and 2i+1, positions [i·L/n, (i+1)·L/n). Shard i attends
  to the K/V of shards 0..i only, so the first shard idles while the last does n times its work.

The caller (the model) always hands over contiguous shards; for zigzag, `ring_attention` moves
the half-chunks into place with two `ppermute`s (each shard sends L/(2n) positions of q, k and
v) and moves the output back the same way, so outputs, losses and gradients are those of
contiguous order. RoPE is applied before attention from the GLOBAL positions (PI-scaled:
model.hidden_states computes them for the whole sequence), so the positions travel with the
tokens.

K/V chunks go round the ring with `ppermute`: after s steps shard i holds those of shard
i − s (mod n). A key chunk later in the sequence than a query chunk is never computed; partial
results (output, log-sum-exp) merge by the online-softmax rule in float32. The per-chunk
computation is the blockwise kernel of pi_jax.attention.blockwise. `block_pairs_per_shard`
gives the forward work per shard of this schedule (tests count it at run time too).
Batch stays split over data/fsdp and heads over tensor where they divide.

Segment ids (document masking) move with their positions: the queries' ids through the same
zig-zag permutes as q, the keys' ids around the ring beside k and v (int32, 4 bytes a position
against k and v's 2·K·H elements). A query chunk that holds no key of its document in some K/V
chunk gets a partial result with lse ≈ MASK_VALUE, which the merge weighs by exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pi_jax.attention import blockwise
from pi_jax.sharding import LOGICAL_AXIS_RULES, logical_to_spec

# The mesh axis the sequence ("length") is split over, from the one axis table.
(SEQUENCE_AXIS,) = LOGICAL_AXIS_RULES["length"]
LAYOUTS = ("zigzag", "contiguous")


def shard_chunks(n: int, layout: str = "zigzag") -> np.ndarray:
  """[n, 2]: the two global chunk indices (of 2n) shard i holds, earlier chunk first."""
  i = np.arange(n)
  if layout == "zigzag":
    return np.stack([i, 2 * n - 1 - i], axis=1)
  if layout == "contiguous":
    return np.stack([2 * i, 2 * i + 1], axis=1)
  raise ValueError(f"ring attention layout {layout!r}: expected one of {LAYOUTS}")


def block_pairs_per_shard(n: int, layout: str, blocks_per_chunk: int) -> np.ndarray:
  """[n]: query-key block pairs each shard computes in the forward pass of this schedule.

  A chunk against an earlier one costs nb² block pairs, against itself nb(nb+1)/2 (the causal
  triangle: blockwise skips the blocks above the diagonal), against a later one nothing.
  """
  chunks, nb = shard_chunks(n, layout), blocks_per_chunk
  work = np.zeros(n, np.int64)
  for i in range(n):
    for step in range(n):
      for qc in chunks[i]:
        for kc in chunks[(i - step) % n]:
          work[i] += nb * nb if kc < qc else (nb * (nb + 1) // 2 if kc == qc else 0)
  return work


def _merge(o_a, lse_a, o_b, lse_b):
  """Combines two softmax-normalized partial attentions over disjoint key sets."""
  lse = jnp.logaddexp(lse_a, lse_b)
  return (o_a * jnp.exp(lse_a - lse)[..., None] + o_b * jnp.exp(lse_b - lse)[..., None]), lse


def _zigzag_perms(n: int):
  """ppermute pairs moving every contiguous shard's even / odd chunk to its zigzag shard."""
  dest = lambda c: c if c < n else 2 * n - 1 - c
  return [(j, dest(2 * j)) for j in range(n)], [(j, dest(2 * j + 1)) for j in range(n)]


def _to_zigzag(x_BCX, axis, n, is_even):
  """Contiguous local [chunk 2i | chunk 2i+1] -> zigzag (chunk i, chunk 2n−1−i).

  Shard i receives one even and one odd chunk; chunk i has the parity of i.
  """
  c2 = x_BCX.shape[1] // 2
  even_perm, odd_perm = _zigzag_perms(n)
  got_even = jax.lax.ppermute(x_BCX[:, :c2], axis, even_perm)
  got_odd = jax.lax.ppermute(x_BCX[:, c2:], axis, odd_perm)
  return jnp.where(is_even, got_even, got_odd), jnp.where(is_even, got_odd, got_even)


def _from_zigzag(first, second, axis, n, is_even):
  """Inverse of _to_zigzag: (chunk i, chunk 2n−1−i) -> contiguous local [chunk 2i | 2i+1]."""
  even_perm, odd_perm = _zigzag_perms(n)
  inverse = lambda perm: [(d, s) for s, d in perm]
  even = jax.lax.ppermute(jnp.where(is_even, first, second), axis, inverse(even_perm))
  odd = jax.lax.ppermute(jnp.where(is_even, second, first), axis, inverse(odd_perm))
  return jnp.concatenate([even, odd], axis=1)


def _ring_shard(q_BCNH, k_BCKH, v_BCKH, seg_BC=None, *, block_size: int, axis: str,
                n_shards: int, layout: str):
  """Runs on one shard: the local contiguous chunk (C = L/n positions) and its segment ids
  (or None); returns its output."""
  n = n_shards
  kh = k_BCKH.shape[2]
  c2 = q_BCNH.shape[1] // 2
  idx = jax.lax.axis_index(axis)
  is_even = idx % 2 == 0
  local = (q_BCNH, k_BCKH, v_BCKH) + (() if seg_BC is None else (seg_BC,))
  if layout == "zigzag":
    halves = [_to_zigzag(x, axis, n, is_even) for x in local]
  else:
    halves = [(x[:, :c2], x[:, c2:]) for x in local]
  t = blockwise.block_length(c2, block_size)
  pad = (-c2) % t
  widths = ((0, 0), (0, pad), (0, 0), (0, 0))
  padded = [[jnp.pad(x, widths) if pad else x for x in pair] for pair in halves[:3]]
  # (q blocks, their segment ids or None) and (k blocks, v blocks, their segment ids or None).
  qs = [(blockwise.to_blocks_q(x, kh, t), None) for x in padded[0]]
  kvs = [(blockwise.to_blocks_kv(k, t), blockwise.to_blocks_kv(v, t), None)
         for k, v in zip(padded[1], padded[2])]
  if seg_BC is not None:
    segs = [blockwise.pad_segments(x, pad) for x in halves[3]]
    segs = [blockwise.to_blocks_segments(s, t) for s in segs]
    qs = [(q, s) for (q, _), s in zip(qs, segs)]
    kvs = [(k, v, s) for (k, v, _), s in zip(kvs, segs)]
  kv_valid = c2 if pad else None  # block padding at the end of each half-chunk is masked

  def attend(pairs, causal):
    """blockwise_core on (q, kv) pairs of one shape as ONE call, stacked on the batch axis."""
    cat = lambda xs: None if xs[0] is None else jnp.concatenate(xs, axis=1)
    q, q_seg = (cat([q[i] for q, _ in pairs]) for i in (0, 1))
    k, v, kv_seg = (cat([kv[i] for _, kv in pairs]) for i in (0, 1, 2))
    out, lse = blockwise.blockwise_core(q, k, v, causal, None if causal else kv_valid, q_seg,
                                        kv_seg)
    return [(o, l) for o, l in zip(jnp.split(out, len(pairs), axis=1),
                                   jnp.split(lse, len(pairs), axis=1))]

  # Step 0, the shard's own chunks: two causal diagonals (trailing block padding is hidden by
  # the causal mask), and the later chunk against the earlier one.
  out0, out1 = attend([(qs[0], kvs[0]), (qs[1], kvs[1])], True)
  (o_10,) = attend([(qs[1], kvs[0])], False)
  out1 = _merge(*out1, *o_10)
  perm = [(i, (i + 1) % n) for i in range(n)]
  select = lambda p, a, b: jax.tree.map(lambda x, y: jnp.where(p, x, y), a, b)
  for step in range(1, n):
    kvs = jax.lax.ppermute(kvs, axis, perm)
    src = (idx - step) % n  # the shard whose K/V chunks are now held
    if layout == "zigzag":
      # src < idx: K/V chunk src precedes both query chunks, chunk 2n−1−src neither.
      # src > idx: both K/V chunks precede query chunk 2n−1−idx only. Always two chunk pairs,
      # one of them (query chunk 2, K/V chunk 1) fixed; selects pick the other: no branch.
      early = src < idx
      o_fixed, o_x = attend([(qs[1], kvs[0]),
                             (select(early, qs[0], qs[1]), select(early, kvs[0], kvs[1]))],
                            False)
      out1 = _merge(*out1, *o_fixed)
      out0 = select(early, _merge(*out0, *o_x), out0)
      out1 = select(early, out1, _merge(*out1, *o_x))
    else:
      def attend_all(outs, kvs):  # both query chunks against both (earlier) K/V chunks
        o00, o01, o10, o11 = attend([(q, kv) for q in qs for kv in kvs], False)
        return (_merge(*_merge(*outs[0], *o00), *o01), _merge(*_merge(*outs[1], *o10), *o11))
      out0, out1 = jax.lax.cond(src < idx, attend_all, lambda outs, kvs: outs, (out0, out1), kvs)
  first, second = (blockwise.from_blocks_q(o, t)[:, :c2].astype(q_BCNH.dtype)
                   for o, _ in (out0, out1))
  if layout == "zigzag":
    return _from_zigzag(first, second, axis, n, is_even)
  return jnp.concatenate([first, second], axis=1)


def ring_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int = 512, axis: str = SEQUENCE_AXIS,
                   layout: str = "zigzag", segment_ids_BL=None):
  """Causal attention with context parallelism over mesh axis `axis` (under `jax.set_mesh`).

  segment_ids_BL: int [B, L] or None (document masking; module docstring). Without a mesh, or
  when `axis` has size 1, this is exactly xla_blockwise attention.
  """
  shard_chunks(1, layout)  # validates the layout name
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(axis, 1) == 1:
    return blockwise.blockwise_attention(q_BLNH, k_BLKH, v_BLKH, block_size=block_size,
                                         segment_ids_BL=segment_ids_BL)
  n_shards = mesh.shape[axis]
  l = q_BLNH.shape[1]
  if l % (2 * n_shards):
    raise ValueError(f"ring attention: sequence length {l} is not divisible by 2 × the "
                     f"{n_shards} shards of mesh axis {axis!r} (each shard holds two chunks); "
                     f"pad the batch to a multiple of {2 * n_shards}")
  mesh_shape = {a: s for a, s in mesh.shape.items() if a != axis}
  q_spec = logical_to_spec(("batch", None, "act_heads", None), q_BLNH.shape, mesh_shape)
  kv_spec = logical_to_spec(("batch", None, "act_kv_heads", None), k_BLKH.shape, mesh_shape)
  heads = q_spec[2] if q_spec[2] == kv_spec[2] else None  # GQA groups stay whole on a shard
  q_spec = P(q_spec[0], axis, heads, None)
  kv_spec = P(kv_spec[0], axis, heads, None)
  fn = functools.partial(_ring_shard, block_size=block_size, axis=axis, n_shards=n_shards,
                         layout=layout)
  args, specs = (q_BLNH, k_BLKH, v_BLKH), (q_spec, kv_spec, kv_spec)
  if segment_ids_BL is not None:
    args, specs = args + (segment_ids_BL.astype(jnp.int32),), specs + (P(q_spec[0], axis),)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=q_spec,
                       check_vma=False)(*args)
