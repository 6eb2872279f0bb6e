"""Every fast attention path equals dense softmax attention (outputs and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi_jax import attention as attn_lib
from pi_jax import dispatch
from pi_jax.run import RunOptions
from pi_jax.attention import blockwise, kernels
from pi_jax.config import ModelConfig


def _inputs(b, l, n, kh, h, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, l, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, l, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, l, kh, h), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (b, l, n, h), jnp.float32)  # a random cotangent
  return q, k, v, w


def _value_and_grads(fn, q, k, v, w):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  out = fn(q, k, v)
  return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _reference_f32(q, k, v):
  return attn_lib.reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32))


def _max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


# (query heads, kv heads): GQA ratios 1, 3 and 8; lengths that are and are not block multiples.
CASES = [(4, 4, 64, 16), (6, 2, 37, 8), (8, 1, 50, 16)]


@pytest.mark.parametrize("in_turn", [False, True], ids=["all_heads", "kv_heads_in_turn"])
@pytest.mark.parametrize("n,kh,l,block", CASES)
def test_blockwise_equals_reference_float32(n, kh, l, block, in_turn):
  """Both schedules (every kv head in one loop, or one kv head at a time, the CPU's)."""
  q, k, v, w = _inputs(2, l, n, kh, 16)
  fn = jax.jit(lambda q, k, v: attn_lib.blockwise_attention(q, k, v, block_size=block,
                                                            kv_heads_in_turn=in_turn))
  out, grads = _value_and_grads(fn, q, k, v, w)
  want, want_grads = _value_and_grads(_reference_f32, q, k, v, w)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _max_rel(out, want) < 1e-5
  for name, g, gw in zip("qkv", grads, want_grads):
    assert _max_rel(g, gw) < 1e-5, name


def test_blockwise_bfloat16_within_tolerance():
  q, k, v, w = _inputs(2, 45, 6, 2, 32, dtype=jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: attn_lib.attention(q, k, v, impl="xla_blockwise", block_size=16))
  out, grads = _value_and_grads(fn, q, k, v, w)
  want, want_grads = _value_and_grads(_reference_f32, q, k, v, w)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  assert _max_rel(out, want) < 2e-2
  for name, g, gw in zip("qkv", grads, want_grads):
    assert _max_rel(g, gw) < 3e-2, name


def test_blockwise_is_causal_by_gradients():
  """Output at position i has zero gradient w.r.t. keys and values after i."""
  q, k, v, _ = _inputs(1, 24, 4, 2, 8)
  i = 9

  def out_i(k, v):
    return jnp.sum(attn_lib.blockwise_attention(q, k, v, block_size=8)[:, i])
  gk, gv = jax.grad(out_i, argnums=(0, 1))(k, v)
  assert np.all(np.asarray(gk)[:, i + 1:] == 0) and np.all(np.asarray(gv)[:, i + 1:] == 0)
  assert np.any(np.asarray(gk)[:, :i + 1] != 0)


def test_blockwise_skips_blocks_above_the_diagonal():
  """The work is the causal triangle: the number of executed block pairs is nb(nb+1)/2.

  Counted by running the blocked forward with a score function that tallies its calls.
  """
  calls = []
  original = blockwise._scores

  def counting_scores(q, k, scale):
    jax.debug.callback(lambda: calls.append(1))
    return original(q, k, scale)

  q, k, v, _ = _inputs(1, 64, 2, 1, 8)
  blockwise._scores = counting_scores
  try:
    attn_lib.blockwise_attention(q, k, v, block_size=8).block_until_ready()
  finally:
    blockwise._scores = original
  nb = 64 // 8
  assert len(calls) == nb * (nb + 1) // 2  # a full rectangle would be nb² = 64


def test_blockwise_memory_is_linear_in_length():
  """No L×L buffer: the compiled temporaries at 8× the length grow far less than 64×."""
  def temp_bytes(l):
    q, k, v, w = _inputs(1, l, 4, 2, 16)
    fn = jax.jit(lambda q, k, v: _value_and_grads(
        lambda q, k, v: attn_lib.blockwise_attention(q, k, v, block_size=64), q, k, v, w))
    return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  ratio = temp_bytes(2048) / temp_bytes(256)
  assert ratio < 12, ratio


def test_the_default_tile_changes_nothing_but_speed():
  """At 600 tokens the CPU default (256: three blocks, the last one padded) equals an explicit
  single block and the reference."""
  q, k, v, _ = _inputs(1, 600, 4, 2, 16)
  kernels_ = dispatch.choose(RunOptions(attention_impl="xla_blockwise"))
  assert kernels_.block_size == 256
  got = kernels_.attend(q, k, v)
  one_block = attn_lib.attention(q, k, v, impl="xla_blockwise", block_size=600)
  ref = attn_lib.reference_attention(q, k, v)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got, one_block, atol=2e-5, rtol=1e-5)


def test_vendor_kernels_refuse_the_wrong_backend():
  q, k, v, _ = _inputs(1, 8, 2, 1, 8, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="cudnn.*NVIDIA GPU.*'cpu'"):
    attn_lib.attention(q, k, v, impl="cudnn")
  with pytest.raises(ValueError, match="splash.*TPU.*'cpu'"):
    attn_lib.attention(q, k, v, impl="splash")


def test_cudnn_refuses_float32(monkeypatch):
  monkeypatch.setattr(kernels, "backend", lambda: "gpu")
  q, k, v, _ = _inputs(1, 8, 2, 1, 8)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    attn_lib.attention(q, k, v, impl="cudnn")


def test_unknown_impl_and_bad_heads_are_errors():
  q, k, v, _ = _inputs(1, 8, 4, 2, 8)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    attn_lib.attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="not a multiple of kv heads"):
    attn_lib.attention(q[:, :, :3], k, v)
