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
i − s (mod n). A key chunk later in the sequence than a query chunk is never computed (the
contiguous layout's Pallas ring computes and discards it: no branch); partial results (output,
log-sum-exp) merge by the online-softmax rule in float32. `block_pairs_per_shard` gives the
forward work per shard of this schedule (tests count it at run time too).

The per-pair kernel:
- On TPU (or with interpret=True), when a half-chunk L/(2n) is a multiple of 128: a Pallas
  flash kernel (pi_jax.attention.pair_flash), forward and gradients apart, so the ring has one
  custom VJP whose backward goes round the ring again (see _flash_ring).
- Otherwise xla_blockwise (blockwise_core), differentiated through the ring by autodiff.
Batch stays split over data/fsdp and heads over tensor where they divide.

Segment ids (document masking): the Pallas pair kernel reads every chunk's ids in place from
the shard's whole row of ids ([B, L] int32, 4 bytes a position), at the chunk's first position
(a prefetched scalar): the ids never move round the ring, and no chunk's ids are copied. Copies
going round the ring were loop-invariant, so XLA took them out of the layer loop and kept every
step's copy through it (7B at 128K: 26 [1, 8192] buffers carried through the backward loop,
+6.5 MB of temporaries a chip). The XLA pairs move the queries' ids through the same zig-zag
permutes as q, and the keys' ids round the ring beside k and v. A query chunk that holds no
key of its document in some K/V chunk gets a partial result with lse ≈ MASK_VALUE, which the
merge weighs by exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from pi_jax.attention import blockwise, kernels, pair_flash
from pi_jax.attention.blockwise import RESIDUALS_NAME
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


def _ring_shard(q_BCNH, k_BCKH, v_BCKH, seg=None, *, block_size: int, axis: str,
                n_shards: int, layout: str, flash: bool, interpret: bool):
  """Runs on one shard: the local contiguous chunk (C = L/n positions) and the segment ids
  (or None): the whole row [B, L] for the Pallas pairs (`flash`), else the local chunk's
  [B, C]. Returns the local output."""
  n = n_shards
  c2 = q_BCNH.shape[1] // 2
  idx = jax.lax.axis_index(axis)
  is_even = idx % 2 == 0
  local = (q_BCNH, k_BCKH, v_BCKH)
  if not flash and seg is not None:  # XLA pairs derive padded, blocked copies: per layer
    local += (blockwise.per_call(seg, q_BCNH),)
  if layout == "zigzag":
    halves = [_to_zigzag(x, axis, n, is_even) for x in local]
  else:
    halves = [(x[:, :c2], x[:, c2:]) for x in local]
  if flash:
    first, second = _flash_schedule(*halves, seg, block_size=block_size, axis=axis, n=n,
                                    layout=layout, interpret=interpret)
  else:
    if seg is None:
      halves.append((None, None))
    first, second = _xla_schedule(*halves, block_size=block_size, axis=axis, n=n, layout=layout)
  first, second = first.astype(q_BCNH.dtype), second.astype(q_BCNH.dtype)
  if layout == "zigzag":
    return _from_zigzag(first, second, axis, n, is_even)
  return jnp.concatenate([first, second], axis=1)


def _xla_schedule(qs, ks, vs, segs, *, block_size, axis, n, layout):
  """The ring with xla_blockwise on every chunk pair (autodiff through the ring: each pair's
  custom VJP, the merges and the permutes). (q, k, v, segment-id) half-chunk pairs in, the two
  output halves [B, C/2, N, H] out."""
  kh = ks[0].shape[2]
  c2 = qs[0].shape[1]
  idx = jax.lax.axis_index(axis)
  t = blockwise.block_length(c2, block_size)
  pad = (-c2) % t
  widths = ((0, 0), (0, pad), (0, 0), (0, 0))
  padded = [[jnp.pad(x, widths) if pad else x for x in pair] for pair in (qs, ks, vs)]
  # (q blocks, their segment ids or None) and (k blocks, v blocks, their segment ids or None).
  qs = [(blockwise.to_blocks_q(x, kh, t), None) for x in padded[0]]
  kvs = [(blockwise.to_blocks_kv(k, t), blockwise.to_blocks_kv(v, t), None)
         for k, v in zip(padded[1], padded[2])]
  if segs[0] is not None:
    segs = [blockwise.to_blocks_segments(blockwise.pad_segments(x, pad), t) for x in segs]
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
  for step in range(1, n):
    kvs = jax.lax.ppermute(kvs, axis, _ring_perm(n))
    src = (idx - step) % n  # the shard whose K/V chunks are now held
    if layout == "zigzag":
      # src < idx: K/V chunk src precedes both query chunks, chunk 2n−1−src neither.
      # src > idx: both K/V chunks precede query chunk 2n−1−idx only. Always two chunk pairs,
      # one of them (query chunk 2, K/V chunk 1) fixed; selects pick the other: no branch.
      early = src < idx
      o_fixed, o_x = attend([(qs[1], kvs[0]),
                             (_select(early, qs[0], qs[1]), _select(early, kvs[0], kvs[1]))],
                            False)
      out1 = _merge(*out1, *o_fixed)
      out0 = _select(early, _merge(*out0, *o_x), out0)
      out1 = _select(early, out1, _merge(*out1, *o_x))
    else:
      def attend_all(outs, kvs):  # both query chunks against both (earlier) K/V chunks
        o00, o01, o10, o11 = attend([(q, kv) for q in qs for kv in kvs], False)
        return (_merge(*_merge(*outs[0], *o00), *o01), _merge(*_merge(*outs[1], *o10), *o11))
      out0, out1 = jax.lax.cond(src < idx, attend_all, lambda outs, kvs: outs, (out0, out1), kvs)
  return [blockwise.from_blocks_q(o, t)[:, :c2] for o, _ in (out0, out1)]


def _ring_perm(n):
  """ppermute pairs sending every shard's K/V chunks (and their gradients) to the next one."""
  return [(i, (i + 1) % n) for i in range(n)]


def _select(pred, a, b):
  """a where pred else b, leaf by leaf (pred is a per-shard scalar: no branch)."""
  return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


# --- the ring with the Pallas pair kernel on every chunk pair (TPU) ------------------------------
#
# The kernel's forward returns each pair's log-sum-exp but is not differentiable through it, so
# the whole ring has one custom VJP: the forward pass merges the pairs' (out, lse); the backward
# pass goes round the ring once more, giving each pair's gradient kernels the GLOBAL out and lse
# (then exp(s − lse) and Σ out·dout are the whole softmax's, and the pairs' dq, dk, dv add up to
# the gradient). dq accumulates at home; dk and dv (float32) travel with their K/V chunk and
# take one more hop home at the end. Layout [B, N, C/2, H] (heads before positions); the
# segment ids are the mask inside the kernel, with no [C, C] array anywhere.

def _flash_schedule(qs, ks, vs, seg_BL, *, block_size, axis, n, layout, interpret):
  """_xla_schedule's contract, with pair_flash on every chunk pair (_flash_ring), and the whole
  row of segment ids (or None) in place of the half-chunks' ids."""
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  qs = [heads_first(kernels.splash_scale(x)) for x in qs]
  ks, vs = ([heads_first(x) for x in xs] for xs in (ks, vs))
  outs = _flash_ring(tuple(qs), tuple(ks), tuple(vs), seg_BL, block_size, interpret, axis, n,
                     layout)
  return [heads_first(o) for o in outs]


def _chunk_starts(shard, n, layout, c2):
  """The first positions (in the whole row) of a shard's two half-chunks: `shard_chunks` in
  arithmetic, for a traced `shard` (indexing that table instead measured 96,768 B more a chip,
  tiny ring at 8K)."""
  if layout == "zigzag":
    return shard * c2, (2 * n - 1 - shard) * c2
  return 2 * shard * c2, (2 * shard + 1) * c2


def _flash_steps(n, layout, idx):
  """For each ring step 1..n−1: the shard whose K/V chunks are then held, and the (query half,
  K/V half, active) chunk pairs computed; a half index may be a per-shard 0/1, and a pair that
  is not `active` (a per-shard bool: its K/V chunk is later than its query chunk) is computed
  and discarded."""
  for step in range(1, n):
    src = (idx - step) % n
    early = src < idx
    if layout == "zigzag":
      x = jnp.where(early, 0, 1)
      yield src, [(1, 0, True), (x, x, True)]
    else:  # contiguous: both query halves against both K/V halves, or nothing
      yield src, [(a, b, early) for a in (0, 1) for b in (0, 1)]


# A shard's own two chunks at ring step 0: (causal, query half, K/V half).
_OWN_PAIRS = ((True, 0, 0), (True, 1, 1), (False, 1, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash_ring(qs, ks, vs, seg_BL, block_size, interpret, axis, n, layout):
  return _flash_ring_fwd(qs, ks, vs, seg_BL, block_size, interpret, axis, n, layout)[0]


def _pair_ids(seg_BL, q_starts, kv_starts, i, j):
  """(query ids, key ids, ids_starts) of pair_flash for half-chunks i, j: the whole row twice
  and where the two chunks begin in it, or Nones."""
  if seg_BL is None:
    return None, None, None
  return seg_BL, seg_BL, (_pick(q_starts, i), _pick(kv_starts, j))


def _flash_ring_fwd(qs, ks, vs, seg_BL, block_size, interpret, axis, n, layout):
  idx = jax.lax.axis_index(axis)
  c2 = qs[0].shape[2]
  q_starts = _chunk_starts(idx, n, layout, c2)
  out = [None, None]

  def attend(causal, i, j, kv, kv_starts):
    q, k, v = _in_turn((_pick(qs, i), _pick(kv[0], j), _pick(kv[1], j)), out)
    q_ids, kv_ids, starts = _pair_ids(seg_BL, q_starts, kv_starts, i, j)
    return pair_flash.pair_forward(q, k, v, q_ids, kv_ids, causal=causal, block_size=block_size,
                                   interpret=interpret, ids_starts=starts)

  own = (ks, vs)
  for causal, i, j in _OWN_PAIRS:
    o = attend(causal, i, j, own, q_starts)
    out[i] = o if out[i] is None else _merge_pair(out[i], o)
  kv = own
  for src, pairs in _flash_steps(n, layout, idx):
    kv = jax.lax.ppermute(kv, axis, _ring_perm(n))
    kv_starts = _chunk_starts(src, n, layout, c2)
    for i, j, active in pairs:
      o = attend(False, i, j, kv, kv_starts)
      for half in (0, 1):
        use = jnp.logical_and(active, jnp.asarray(i) == half)
        out[half] = _select(use, _merge_pair(out[half], o), out[half])
  outs = tuple(o.astype(qs[0].dtype) for o, _ in out)
  lses = tuple(checkpoint_name(lse, RESIDUALS_NAME) for _, lse in out)
  outs = tuple(checkpoint_name(o, RESIDUALS_NAME) for o in outs)
  return outs, (qs, ks, vs, seg_BL, outs, lses)


def _flash_ring_bwd(block_size, interpret, axis, n, layout, res, douts):
  qs, ks, vs, seg_BL, outs, lses = res
  idx = jax.lax.axis_index(axis)
  c2 = qs[0].shape[2]
  q_starts = _chunk_starts(idx, n, layout, c2)
  dq = [jnp.zeros(q.shape, jnp.float32) for q in qs]
  dkv = [[jnp.zeros(k.shape, jnp.float32) for k in ks], [jnp.zeros(v.shape, jnp.float32)
                                                        for v in vs]]

  def grads(causal, i, j, kv, kv_starts):
    q, k, v, o, lse, do = _in_turn((_pick(qs, i), _pick(kv[0], j), _pick(kv[1], j),
                                    _pick(outs, i), _pick(lses, i), _pick(douts, i)), (dq, dkv))
    q_ids, kv_ids, starts = _pair_ids(seg_BL, q_starts, kv_starts, i, j)
    return pair_flash.pair_grads(q, k, v, q_ids, kv_ids, o, lse, do, causal=causal,
                                 block_size=block_size, interpret=interpret, ids_starts=starts)

  def add(i, j, active, g):
    for half in (0, 1):
      for acc, at, grad in ((dq, i, g[0]), (dkv[0], j, g[1]), (dkv[1], j, g[2])):
        use = jnp.logical_and(active, jnp.asarray(at) == half)
        acc[half] = acc[half] + jnp.where(use, grad.astype(jnp.float32), 0.0)

  own = (ks, vs)
  for causal, i, j in _OWN_PAIRS:
    add(i, j, True, grads(causal, i, j, own, q_starts))
  kv = own
  for src, pairs in _flash_steps(n, layout, idx):
    kv, dkv = jax.lax.ppermute((kv, dkv), axis, _ring_perm(n))
    dkv = [list(x) for x in dkv]
    kv_starts = _chunk_starts(src, n, layout, c2)
    for i, j, active in pairs:
      add(i, j, active, grads(False, i, j, kv, kv_starts))
  if n > 1:  # each K/V chunk's gradient is one hop from home
    dkv = jax.lax.ppermute(dkv, axis, _ring_perm(n))
  cast = lambda gs, xs: tuple(g.astype(x.dtype) for g, x in zip(gs, xs))
  return cast(dq, qs), cast(dkv[0], ks), cast(dkv[1], vs), None


_flash_ring.defvjp(_flash_ring_fwd, _flash_ring_bwd)


def _in_turn(args, sums):
  """args, available only once `sums` (the running merge or gradient sums, None where not
  started) are: each kernel call then runs after the previous call's results are summed, so
  only one call's outputs are ever live. Tied to the previous call's output alone, XLA kept
  several pairs' dk and dv for late sums: 71,724,544 B a chip for the tiny model of
  test_segments at 32K on 4 shards, against 16,209,920 B tied to the sums (measured with
  float32 gradient outputs)."""
  done = jax.tree.leaves(sums)
  return jax.lax.optimization_barrier((args, done))[0] if done else args


def _pick(xs, i):
  """xs[i] of a pair of half-chunks, i a Python or per-shard 0/1 (a select); None stays None."""
  if xs is None or xs[0] is None:
    return None
  if isinstance(i, int):
    return xs[i]
  return _select(i == 0, xs[0], xs[1])


def _merge_pair(a, b):
  """_merge for the pair kernel's (out [B, N, C, H], lse [B, N, C]) pairs, in float32. A
  pair's own output comes in the compute dtype (the kernel writes q's dtype): with bf16 compute
  each partial is rounded to bf16 once before the float32 merge, where xla_blockwise's stay
  float32."""
  (o_a, lse_a), (o_b, lse_b) = a, b
  return _merge(o_a.astype(jnp.float32), lse_a, o_b.astype(jnp.float32), lse_b)


def ring_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int = 512, axis: str = SEQUENCE_AXIS,
                   layout: str = "zigzag", segment_ids_BL=None, interpret: bool = False):
  """Causal attention with context parallelism over mesh axis `axis` (under `jax.set_mesh`).

  segment_ids_BL: int [B, L] or None (document masking; module docstring). Without a mesh, or
  when `axis` has size 1, this is exactly xla_blockwise attention. interpret: the Pallas
  per-pair kernel in Pallas interpret mode, on any backend (tests on the CPU).
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
  # The Pallas pair kernel on TPU when the half-chunks are whole tiles (module docstring).
  flash = ((interpret or kernels.backend() == "tpu")
           and (l // (2 * n_shards)) % pair_flash.TILE == 0)
  fn = functools.partial(_ring_shard, block_size=block_size, axis=axis, n_shards=n_shards,
                         layout=layout, flash=flash, interpret=interpret)
  args, specs = (q_BLNH, k_BLKH, v_BLKH), (q_spec, kv_spec, kv_spec)
  if segment_ids_BL is not None:  # the Pallas pairs read the whole row in place (docstring)
    args += (segment_ids_BL.astype(jnp.int32),)
    specs += (P(q_spec[0], None if flash else axis),)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=q_spec,
                       check_vma=False)(*args)
