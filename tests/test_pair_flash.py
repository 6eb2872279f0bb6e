"""The ring's Pallas pair kernel (pi_jax.attention.pair_flash) against dense attention by brute
force, in Pallas interpret mode on the CPU; and compiled by the TPU compiler (Mosaic) with the
segment ids read as stored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi_jax.attention import pair_flash
from pi_jax.attention.reference import MASK_VALUE

B, N, K, H = 2, 4, 2, 16  # two query heads per key head


def _dense(q, k, v, q_ids, kv_ids, causal):
  """(out, lse) of softmax(q·kᵀ) v with the pair's mask, one [C, C] score matrix per head."""
  g = q.shape[1] // k.shape[1]
  k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
  s = jnp.einsum("bnqh,bnkh->bnqk", q, k)
  c = q.shape[2]
  mask = jnp.ones((1, 1, c, c), bool)
  if causal:
    mask = mask & jnp.tril(jnp.ones((c, c), bool))
  if q_ids is not None:
    mask = mask & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
  s = jnp.where(mask, s, MASK_VALUE)
  lse = jax.nn.logsumexp(s, axis=-1)
  return jnp.einsum("bnqk,bnkh->bnqh", jnp.exp(s - lse[..., None]), v), lse


def _inputs(c, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, N, c, H)) / 4, jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(B, K, c, H)), jnp.float32) for _ in range(2))
  return q, k, v, r


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "ids"])
@pytest.mark.parametrize("c,block", [(384, 128), (256, 256)], ids=["3_blocks", "1_block"])
def test_pair_equals_dense_attention(causal, with_ids, c, block):
  """Outputs, log-sum-exp and the three gradients; with ids, documents cross the blocks, the
  full pair's key chunk holds other documents (rows that see no key: lse ≈ MASK_VALUE), and one
  row is a single document."""
  q, k, v, r = _inputs(c)
  q_ids = kv_ids = None
  if with_ids:
    q_ids = np.sort(r.integers(0, 6, (B, c)), axis=1).astype(np.int32)
    q_ids[1] = 7
    kv_ids = q_ids if causal else np.sort(r.integers(3, 9, (B, c)), axis=1).astype(np.int32)
    q_ids, kv_ids = jnp.asarray(q_ids), jnp.asarray(kv_ids)
  out, lse = pair_flash.pair_forward(q, k, v, q_ids, kv_ids, causal=causal, block_size=block,
                                     interpret=True)
  want, want_lse = _dense(q, k, v, q_ids, kv_ids, causal)
  seen = want_lse > MASK_VALUE / 2  # rows with a visible key
  if with_ids and not causal:
    assert 0 < int((~seen).sum()) < seen.size  # the case is there
  assert _rel(jnp.where(seen[..., None], out, 0), jnp.where(seen[..., None], want, 0)) < 1e-5
  np.testing.assert_allclose(jnp.where(seen, lse, 0), jnp.where(seen, want_lse, 0), atol=2e-5)
  assert bool(jnp.all(jnp.where(seen, True, lse < MASK_VALUE / 2)))
  dout = jnp.asarray(r.normal(size=out.shape), jnp.float32)
  got = pair_flash.pair_grads(q, k, v, q_ids, kv_ids, want, want_lse, dout, causal=causal,
                              block_size=block, interpret=True)
  loss = lambda q, k, v: jnp.sum(
      jnp.where(seen[..., None], _dense(q, k, v, q_ids, kv_ids, causal)[0], 0) * dout)
  for g, gw in zip(got, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)):
    assert g.shape == gw.shape and _rel(g, gw) < 1e-5, _rel(g, gw)


def test_pair_grads_with_global_statistics_sum_to_the_gradient():
  """Two key chunks (a causal pair and a full one) merged by log-sum-exp: each pair's grads,
  given the MERGED out and lse, sum to the gradient of attention over both chunks."""
  c = 256
  q, k0, v0, r = _inputs(c, seed=1)
  k1, v1 = (jnp.asarray(r.normal(size=(B, K, c, H)), jnp.float32) for _ in range(2))
  run = lambda causal, k, v: pair_flash.pair_forward(q, k, v, causal=causal, block_size=128,
                                                     interpret=True)
  (o_a, l_a), (o_b, l_b) = run(False, k0, v0), run(True, k1, v1)
  lse = jnp.logaddexp(l_a, l_b)
  out = o_a * jnp.exp(l_a - lse)[..., None] + o_b * jnp.exp(l_b - lse)[..., None]

  def both(q, k0, v0, k1, v1):  # keys 0..C−1 all visible, then chunk 1 causally
    k, v = jnp.concatenate([k0, k1], axis=2), jnp.concatenate([v0, v1], axis=2)
    g = N // K
    s = jnp.einsum("bnqh,bnkh->bnqk", q, jnp.repeat(k, g, axis=1))
    mask = jnp.concatenate([jnp.ones((c, c), bool), jnp.tril(jnp.ones((c, c), bool))], axis=1)
    p = jax.nn.softmax(jnp.where(mask, s, MASK_VALUE), axis=-1)
    return jnp.einsum("bnqk,bnkh->bnqh", p, jnp.repeat(v, g, axis=1))

  np.testing.assert_allclose(out, both(q, k0, v0, k1, v1), atol=2e-6)
  dout = jnp.asarray(r.normal(size=out.shape), jnp.float32)
  ga = pair_flash.pair_grads(q, k0, v0, None, None, out, lse, dout, causal=False,
                             block_size=128, interpret=True)
  gb = pair_flash.pair_grads(q, k1, v1, None, None, out, lse, dout, causal=True,
                             block_size=128, interpret=True)
  want = jax.grad(lambda *a: jnp.sum(both(*a) * dout), argnums=(0, 1, 2, 3, 4))(q, k0, v0, k1, v1)
  for got, w in zip((ga[0] + gb[0], ga[1], ga[2], gb[1], gb[2]), want):
    assert _rel(got, w) < 1e-5, _rel(got, w)


def test_pair_refuses_bad_shapes():
  q, k, v, _ = _inputs(256)
  with pytest.raises(ValueError, match="not a multiple of 128"):
    pair_flash.pair_forward(q[:, :, :200], k[:, :, :200], v[:, :, :200], causal=True,
                            interpret=True)
  with pytest.raises(ValueError, match="segment ids"):
    ids = jnp.zeros((B, 128), jnp.int32)
    pair_flash.pair_forward(q, k, v, ids, ids, causal=True, interpret=True)


def test_pair_compiles_for_tpu_reading_ids_as_stored():
  """The TPU compiler (Mosaic) takes the forward and both gradient kernels, bf16, head dims 16
  and 128; the integer operands of a kernel are its two block offsets and the rows of ids,
  [B, 1, C] int32 (4 bytes a position: no lane-wide [C, 128] copy)."""
  from jax.sharding import PartitionSpec as P
  from tests import tpu_aot
  devices = tpu_aot.tpu_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  b, c = 4, 1024

  def step(q, k, v, q_ids, kv_ids, dout):
    out, lse = pair_flash.pair_forward(q, k, v, q_ids, kv_ids, causal=True)
    return pair_flash.pair_grads(q, k, v, q_ids, kv_ids, out, lse, dout, causal=False)

  for h in (16, 128):
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=jax.sharding.NamedSharding(mesh, P("x")))
    qs, kvs = spec((b, N, c, h), jnp.bfloat16), spec((b, K, c, h), jnp.bfloat16)
    ids = spec((b, c), jnp.int32)
    fn = jax.shard_map(step, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
    text = jax.jit(fn).lower(qs, kvs, kvs, ids, ids, qs).compile().as_text()
    calls = tpu_aot.pallas_int_operands(text)
    assert len(calls) == 3, calls
    for int_shapes in calls:  # the prefetched block offsets [2], then the two rows of ids
      assert int_shapes == ["2", f"1,1,{c}", f"1,1,{c}"], (h, int_shapes)
