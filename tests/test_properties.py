"""Cheap properties of the model on tiny random configs (float32 unless said otherwise)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from pi_jax.config import ModelConfig
from pi_jax.run import REMAT_POLICIES, RunOptions

TINY = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=2,
                   num_heads=6, num_kv_heads=2, max_position_embeddings=32)
PARAMS = pi_jax.init_params(TINY, jax.random.key(0))
L = 24


def tokens(batch=2, length=L, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY.vocab_size, jnp.int32)


def positions(batch, length, scale=1):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) * scale, (batch, length))


_forward = jax.jit(pi_jax.forward, static_argnums=0, static_argnames="run")


def test_linear_scale_1_is_plain_rope():
  plain = TINY
  pi1 = TINY.with_rope_scaling("linear:1")
  assert pi1.rope_scaling.kind == "linear" and pi1.max_position_embeddings == 32
  pos = positions(1, 4096)
  for a, b in zip(pi_jax.rope_tables(pi1, pos), pi_jax.rope_tables(plain, pos)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(_forward(pi1, PARAMS, tokens()), _forward(plain, PARAMS, tokens()))


@pytest.mark.parametrize("scale", [2, 4, 3])
def test_position_s_times_p_at_scale_s_is_position_p(scale):
  """PI (§2.3): RoPE of position m at scale s is RoPE of position m/s unscaled."""
  scaled = TINY.with_rope_scaling(f"linear:{scale}")
  assert scaled.max_position_embeddings == 32 * scale
  pos = positions(2, 2048)
  exact = scale & (scale - 1) == 0  # a power-of-two scale divides float32 frequencies exactly
  # Otherwise (inv_freq/s)·(s·p) and inv_freq·p differ by float32 rounding of angles up to
  # ~2000 rad, where one ulp is 1.2e-4.
  check = np.testing.assert_array_equal if exact else (
      lambda a, b: np.testing.assert_allclose(a, b, atol=3e-4))
  for a, b in zip(pi_jax.rope_tables(scaled, pos * scale), pi_jax.rope_tables(TINY, pos)):
    check(a, b)
  got = _forward(scaled, PARAMS, tokens(), positions(2, L, scale))
  want = _forward(TINY, PARAMS, tokens(), positions(2, L))
  if exact:
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()))
  # ...and the same positions without PI are a different model (the check has teeth).
  unscaled = _forward(TINY, PARAMS, tokens(), positions(2, L, scale))
  assert not np.allclose(unscaled, want, atol=1e-3)


def test_positions_default_to_0_to_L_minus_1():
  default = _forward(TINY, PARAMS, tokens())
  np.testing.assert_array_equal(default, _forward(TINY, PARAMS, tokens(), positions(2, L)))
  # RoPE only sees relative positions: a uniform shift changes nothing but rounding...
  shifted = _forward(TINY, PARAMS, tokens(), positions(2, L) + 5)
  np.testing.assert_allclose(shifted, default, atol=1e-5 * float(np.abs(default).max()))
  # ...while other (non-uniformly spaced) positions do change the logits.
  spread = _forward(TINY, PARAMS, tokens(), positions(2, L, 2))
  assert not np.allclose(spread, default, atol=1e-4)


def test_causality_by_gradients():
  """d logits[t] / d embedding(token at t') is exactly 0 for every t' > t, nonzero for t' <= t."""
  seq = jax.random.permutation(jax.random.key(2), TINY.vocab_size)[:L][None].astype(jnp.int32)

  @jax.jit
  def grad_embed(t):
    def out(embed):
      logits = pi_jax.forward(TINY, {**PARAMS, "embed": embed}, seq)
      return jnp.sum(jax.lax.dynamic_index_in_dim(logits[0], t, keepdims=False) ** 2)
    return jax.grad(out)(PARAMS["embed"])[seq[0]]  # [L, D]: row i is token i's embedding

  for t in (0, 5, L - 2):
    norms = np.abs(np.asarray(grad_embed(t))).max(axis=-1)
    assert np.all(norms[t + 1:] == 0.0), f"logit {t} depends on a later token"
    assert np.all(norms[:t + 1] > 0.0), f"logit {t} ignores an earlier token"


def test_prefix_invariance():
  full = _forward(TINY, PARAMS, tokens())
  prefix = _forward(TINY, PARAMS, tokens()[:, :10])
  np.testing.assert_allclose(prefix, full[:, :10], atol=1e-6 * float(np.abs(full).max()))


def test_jit_equals_no_jit():
  eager = pi_jax.forward(TINY, PARAMS, tokens())
  np.testing.assert_allclose(_forward(TINY, PARAMS, tokens()), eager,
                             rtol=0, atol=1e-6 * float(np.abs(eager).max()))


def _nll(config, params, tokens_BL, run=None):
  logits = pi_jax.forward(config, params, tokens_BL[:, :-1], run=run)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens_BL[:, 1:, None], axis=-1))


_value_and_grad = jax.jit(jax.value_and_grad(_nll, argnums=1), static_argnums=(0, 3))


@pytest.mark.parametrize("remat", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_equals_no_remat(remat):
  seq = tokens(length=L + 1)
  want_loss, want_grads = _value_and_grad(TINY, PARAMS, seq)
  loss, grads = _value_and_grad(TINY, PARAMS, seq, RunOptions(remat=remat))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * float(np.abs(w).max()),
                               err_msg=jax.tree_util.keystr(path))
  assert float(np.abs(want_grads["layers"]["wq"]).max()) > 0


def test_save_attention_does_not_run_the_attention_forward_again():
  """remat="save_attention" keeps the blockwise kernel's output and log-sum-exp, so the
  backward pass has one attention loop per layer body (its own) where "full" has two (the
  recomputed forward and the backward): counted in the gradient's jaxpr."""
  run = RunOptions(attention_impl="xla_blockwise", attention_block_size=8)

  def loops(remat):
    jaxpr = jax.make_jaxpr(jax.grad(_nll, argnums=1), static_argnums=(0, 3))(
        TINY, PARAMS, tokens(length=L + 1), run.replace(remat=remat))
    return str(jaxpr).count("while[")

  assert (loops("none"), loops("full"), loops("save_attention")) == (2, 3, 2)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_is_close_to_float32(param_dtype):
  run = RunOptions(compute_dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(param_dtype), PARAMS)
  want = _forward(TINY, PARAMS, tokens())
  got = _forward(TINY, params, tokens(), run=run)
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))  # logits are float32 regardless
  h = jax.eval_shape(lambda p, t: pi_jax.hidden_states(TINY, p, t, run=run), params, tokens())
  assert h.dtype == jnp.bfloat16
  err = float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())
  assert err < 0.05, f"bfloat16 logits are {err:.3f} (relative) from float32"
  assert err > 0  # bfloat16 really ran
  # The greedy next tokens agree almost everywhere.
  agree = np.mean(np.argmax(got, -1) == np.argmax(want, -1))
  assert agree > 0.8
