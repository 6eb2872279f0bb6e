"""generate(): KV-cache decoding equals full forwards, greedy equals transformers, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from conftest import make_hf_model
from pi_jax.config import ModelConfig
from pi_jax.generate import _filter_logits, _generate_jit, _next_token, generate_with_logits

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=6,
            num_kv_heads=2, max_position_embeddings=32)


def tiny(scaling=None, **overrides):
  config = ModelConfig(**{**TINY, **overrides})
  if scaling:
    config = config.with_rope_scaling(scaling)
  return config, pi_jax.init_params(config, jax.random.key(0))


def prompt(batch, length, seed=1, vocab=97):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


@pytest.mark.parametrize("scaling,length,new", [
    (None, 7, 12),  # padded prompt (7 -> 64)
    ("linear:4", 64, 40),  # prompt exactly one bucket; decoding runs past the trained window
    ("llama3:4", 21, 30),
])
def test_cached_decoding_logits_equal_full_forward(scaling, length, new):
  config, params = tiny(scaling)
  prompt_BL = prompt(2, length)
  tokens_BT, logits_BTV = generate_with_logits(config, params, prompt_BL, new)
  assert tokens_BT.shape == (2, new) and tokens_BT.dtype == jnp.int32
  forward = jax.jit(lambda t: pi_jax.forward(config, params, t))
  full_BLV = forward(jnp.concatenate([prompt_BL, tokens_BT], axis=1))
  want = np.asarray(full_BLV[:, length - 1:length - 1 + new])
  np.testing.assert_allclose(logits_BTV, want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_greedy_equals_argmax_of_repeated_full_forwards():
  config, params = tiny()
  got = pi_jax.generate(config, params, prompt(2, 11), 12)
  # One fixed-size buffer (one compilation): causal logits at t see only tokens <= t.
  seq = jnp.zeros((2, 23), jnp.int32).at[:, :11].set(prompt(2, 11))
  forward = jax.jit(lambda t: pi_jax.forward(config, params, t))
  for t in range(11, 23):
    seq = seq.at[:, t].set(jnp.argmax(forward(seq)[:, t - 1], axis=-1).astype(jnp.int32))
  np.testing.assert_array_equal(got, seq[:, 11:])


HF_SCALINGS = {  # plain RoPE is the linear case's code path with factor 1 (test_properties)
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32, "factor": 4.0,
                 "short_factor": [1.0 + 0.1 * i for i in range(6)],
                 "long_factor": [1.0 + 0.7 * i for i in range(6)]},
}


@pytest.mark.parametrize("kind", list(HF_SCALINGS))
def test_greedy_equals_transformers_generate(tmp_path, kind):
  import torch
  from convert.to_pi_jax import convert
  extra = {"max_position_embeddings": 128} if kind == "longrope" else {}
  model = make_hf_model(tmp_path / "hf", HF_SCALINGS[kind], seed=3, **extra)
  convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  config, params = pi_jax.load_checkpoint(str(tmp_path / "ckpt"))
  # Dynamic NTK and LongRoPE switch tables as the sequence crosses the trained window (32).
  length = 24 if kind in ("dynamic", "longrope") else 40
  prompt_BL = np.random.RandomState(5).randint(3, 128, (2, length))
  model.generation_config.eos_token_id = None  # run the full length, as ours without eos_id
  with torch.no_grad():
    want = model.generate(torch.tensor(prompt_BL), max_new_tokens=16, do_sample=False,
                          pad_token_id=0)[:, length:].numpy()
  got = pi_jax.generate(config, params, jnp.asarray(prompt_BL, jnp.int32), 16)
  np.testing.assert_array_equal(got, want)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
  config, params = tiny()
  p = prompt(2, 9)
  before = _generate_jit._cache_size()
  greedy = pi_jax.generate(config, params, p, 12)
  a = pi_jax.generate(config, params, p, 12, temperature=1.0, key=jax.random.key(7))
  b = pi_jax.generate(config, params, p, 12, temperature=1.0, key=jax.random.key(7))
  c = pi_jax.generate(config, params, p, 12, temperature=1.0, key=jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
  top1 = pi_jax.generate(config, params, p, 12, temperature=1.5, top_k=1, key=jax.random.key(7))
  np.testing.assert_array_equal(top1, greedy)
  # A nucleus smaller than the top token's probability is the top token alone.
  tiny_p = pi_jax.generate(config, params, p, 12, temperature=1.0, top_p=1e-6,
                           key=jax.random.key(7))
  np.testing.assert_array_equal(tiny_p, greedy)
  # Sampling settings are traced: all of the above share at most one compilation.
  assert _generate_jit._cache_size() <= before + 1


def test_filter_logits_equals_brute_force():
  rng = np.random.RandomState(0)
  logits = rng.randn(4, 50).astype(np.float32) * 3
  for top_k, top_p in [(5, None), (None, 0.5), (None, 0.9), (10, 0.7), (50, 1.0), (1, None)]:
    got = _filter_logits(jnp.asarray(logits), jnp.int32(top_k or 50), jnp.float32(top_p or 1.0))
    got = np.asarray(got) > -1e30
    for row, kept in zip(logits, got):
      order = np.argsort(-row)
      keep = np.zeros(50, bool)
      keep[order[:top_k or 50]] = True
      if top_p is not None and top_p < 1:
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs  # mass of the strictly more likely tokens
        nucleus = np.zeros(50, bool)
        nucleus[order[before < top_p]] = True
        # top-k then top-p renormalized over the survivors (as applied in sequence)
        if top_k is not None:
          sub = row[order[:top_k]]
          sp = np.exp(sub - sub.max())
          sp /= sp.sum()
          nucleus = np.zeros(50, bool)
          nucleus[order[:top_k][(np.cumsum(sp) - sp) < top_p]] = True
        keep &= nucleus
      np.testing.assert_array_equal(kept, keep, err_msg=f"top_k={top_k} top_p={top_p}")


@jax.jit
def _draw(logits, keys, sampling):
  return jax.vmap(lambda k: _next_token(logits, k, sampling)[0])(keys)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 12, 1.0), (0.7, 12, 1.0),
                                                    (1.0, 3, 1.0), (1.0, 12, 0.6)])
def test_sampling_frequencies_follow_the_softmax(temperature, top_k, top_p):
  """Sampled token frequencies match softmax(logits / T) over the top-k / top-p survivors."""
  logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -5.0]])
  sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  keys = jax.random.split(jax.random.key(0), 20000)
  freq = np.bincount(np.asarray(_draw(logits, keys, sampling)), minlength=12) / len(keys)
  probs = np.exp(np.asarray(logits[0], np.float64) / temperature)
  probs[top_k:] = 0  # the logits are sorted, so the top k are the first k
  probs /= probs.sum()
  mass_before = np.cumsum(probs) - probs
  probs[mass_before >= top_p] = 0
  probs /= probs.sum()
  np.testing.assert_allclose(freq, probs, atol=0.015)


def test_after_eos_keeps_emitting_eos():
  config, params = tiny()
  p = prompt(2, 9, seed=4)
  free = np.asarray(pi_jax.generate(config, params, p, 12))
  eos = int(free[0, 3])  # the token row 0 emits at step 3
  first = int(np.argmax(free[0] == eos))
  got = np.asarray(pi_jax.generate(config, params, p, 12, eos_id=eos))
  np.testing.assert_array_equal(got[0, :first + 1], free[0, :first + 1])
  assert np.all(got[0, first:] == eos)
  row1 = np.flatnonzero(free[1] == eos)
  stop = row1[0] if len(row1) else 12
  np.testing.assert_array_equal(got[1, :stop], free[1, :stop])  # row 1 runs on until its eos
  assert np.all(got[1, stop:] == eos)


def test_prompts_in_one_bucket_share_one_compilation():
  config, params = tiny()
  pi_jax.generate(config, params, prompt(2, 10), 12)
  before = _generate_jit._cache_size()
  for length in (11, 30, 64):
    pi_jax.generate(config, params, prompt(2, length), 12)
  assert _generate_jit._cache_size() == before
  pi_jax.generate(config, params, prompt(2, 65), 12)  # the next bucket compiles once more
  assert _generate_jit._cache_size() == before + 1


def test_zero_new_tokens_and_bad_arguments():
  config, params = tiny()
  assert pi_jax.generate(config, params, prompt(2, 5), 0).shape == (2, 0)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    pi_jax.generate(config, params, prompt(1, 5), 3, temperature=0.7)
  with pytest.raises(ValueError, match=r"prompt must be \[batch, length >= 1\]"):
    pi_jax.generate(config, params, jnp.zeros((5,), jnp.int32), 3)
  with pytest.raises(ValueError, match="integer token ids"):
    pi_jax.generate(config, params, jnp.zeros((1, 5), jnp.float32), 3)
  with pytest.raises(ValueError, match="top_k must be a positive integer"):
    pi_jax.generate(config, params, prompt(1, 5), 3, temperature=1.0, top_k=0,
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
    pi_jax.generate(config, params, prompt(1, 5), 3, temperature=1.0, top_p=1.5,
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    pi_jax.generate(config, params, prompt(1, 5), 3, temperature=-1.0)
