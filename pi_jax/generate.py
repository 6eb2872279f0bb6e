"""Autoregressive generation with the KV cache: a prefill, then a `lax.fori_loop` decode.

The prompt goes through the ordinary causal attention path (`hidden_states(..., cache=...,
cache_index=None)`), so a long prompt costs one forward pass. Decoding is a `lax.fori_loop` of
one-token steps against the cache. Both are one jitted program, compiled once per (config,
prompt bucket, number of new tokens) and reused across calls and sampling settings.

Prompts are right-padded to a multiple of PROMPT_BUCKET so prompts of nearby lengths share one
compiled program. That is exact: the pad tokens sit after the prompt, so causal attention keeps
them out of every real position, and each decode step overwrites the next pad slot of the cache
before any query may see it. Dynamic NTK and LongRoPE choose their table from the largest
position, so for them the prompt is not padded.

Generation is one document per row: there are no segment ids here (a packed prompt would need
them in every decode step's attention over the cache; model.hidden_states refuses ids with a
cache). Pack documents for training and scoring (model.forward, loss.token_nll), not here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pi_jax import model as model_lib
from pi_jax.config import ModelConfig
from pi_jax.inputs import check_token_ids

PROMPT_BUCKET = 64


def _check_args(prompt_BL, max_new_tokens, temperature, top_k, top_p, key):
  if prompt_BL.ndim != 2 or prompt_BL.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt_BL.shape}")
  if not jnp.issubdtype(prompt_BL.dtype, jnp.integer):
    raise ValueError(f"prompt must hold integer token ids, got dtype {prompt_BL.dtype}")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(seed)")


def _filter_logits(logits_BV, top_k, top_p):
  """Masks every token outside the top_k, then outside the top_p nucleus of what is left.

  top_k (1..V) and top_p (in (0, 1]) are traced scalars, so one compiled program serves every
  setting; top_k = V and top_p = 1 filter nothing.
  """
  v = logits_BV.shape[-1]
  neg = jnp.finfo(logits_BV.dtype).min
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, top_k - 1, 1, axis=1)
  logits_BV = jnp.where(logits_BV < kth_B1, neg, logits_BV)
  # The survivors of top-k are a prefix of the sorted order; the nucleus is taken within them.
  sorted_BV = jnp.where(jnp.arange(v) < top_k, sorted_BV, neg)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep a token if the mass strictly before it is < top_p (so the top token always stays).
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept_B1 = jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True)
  cutoff_B1 = jnp.take_along_axis(sorted_BV, kept_B1 - 1, axis=-1)
  nucleus_BV = jnp.where(logits_BV < cutoff_B1, neg, logits_BV)
  return jnp.where(top_p < 1.0, nucleus_BV, logits_BV)  # top_p = 1: no float-rounding cut


def _next_token(logits_BV, key, sampling):
  """Greedy when temperature == 0, else a sample; `sampling` = (temperature, top_k, top_p)."""
  temperature, top_k, top_p = sampling

  def sample(logits_BV):
    filtered_BV = _filter_logits(logits_BV / jnp.maximum(temperature, 1e-6), top_k, top_p)
    return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)

  def greedy(logits_BV):
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, sample, greedy, logits_BV.astype(jnp.float32))


def _emit(token_B, done_B, eos_id):
  """After EOS a sequence keeps emitting EOS; eos_id < 0 means no EOS."""
  token_B = jnp.where(done_B & (eos_id >= 0), eos_id, token_B)
  return token_B, done_B | (token_B == eos_id)


def _prefill(config: ModelConfig, params, padded_BP, prompt_len, cache_size):
  """Fills a fresh cache with the (padded) prompt; returns (last real logits [B, V], cache)."""
  cache = model_lib.init_cache(config, padded_BP.shape[0], cache_size)
  h_BPD, cache = model_lib.hidden_states(config, params, padded_BP, cache=cache)
  h_B1D = jax.lax.dynamic_slice_in_dim(h_BPD, prompt_len - 1, 1, axis=1)
  return model_lib.logits_from_hidden(config, params, h_B1D)[:, 0], cache


def _decode(config: ModelConfig, params, first_logits_BV, cache, prompt_len, key, sampling,
            eos_id, *, max_new_tokens, return_logits):
  """Samples max_new_tokens tokens; token i (i >= 1) comes from a one-token cached step."""
  b, v = first_logits_BV.shape
  keys = jax.random.split(key, max_new_tokens)
  token_B = _next_token(first_logits_BV, keys[0], sampling)
  token_B, done_B = _emit(token_B, jnp.zeros((b,), bool), eos_id)
  tokens_BT = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token_B)
  logits_BTV = None
  if return_logits:
    logits_BTV = jnp.zeros((b, max_new_tokens, v), jnp.float32).at[:, 0].set(first_logits_BV)

  def step(i, carry):
    tokens_BT, cache, done_B, logits_BTV = carry
    prev_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, i - 1, 1, axis=1)
    # The previous token sits at position prompt_len + i - 1, after that many cached tokens.
    h_B1D, cache = model_lib.hidden_states(config, params, prev_B1, cache=cache,
                                           cache_index=prompt_len + i - 1)
    logits_BV = model_lib.logits_from_hidden(config, params, h_B1D)[:, 0]
    token_B, done_B = _emit(_next_token(logits_BV, keys[i], sampling), done_B, eos_id)
    tokens_BT = jax.lax.dynamic_update_slice_in_dim(tokens_BT, token_B[:, None], i, axis=1)
    if logits_BTV is not None:
      logits_BTV = jax.lax.dynamic_update_slice_in_dim(logits_BTV, logits_BV[:, None], i, axis=1)
    return tokens_BT, cache, done_B, logits_BTV

  tokens_BT, _, _, logits_BTV = jax.lax.fori_loop(
      1, max_new_tokens, step, (tokens_BT, cache, done_B, logits_BTV))
  return tokens_BT, logits_BTV


# Prefill and decode loop in one program: the cache is created inside it and updated in place by
# the loop, so a long prompt's cache exists once (two jits would hold an input and a loop copy).
# The sampling settings are traced, so changing them never recompiles.
@functools.partial(jax.jit,
                   static_argnames=("config", "cache_size", "max_new_tokens", "return_logits"))
def _generate_jit(config, params, padded_BP, prompt_len, key, sampling, eos_id, *, cache_size,
                  max_new_tokens, return_logits):
  logits_BV, cache = _prefill(config, params, padded_BP, prompt_len, cache_size)
  return _decode(config, params, logits_BV, cache, prompt_len, key, sampling, eos_id,
                 max_new_tokens=max_new_tokens, return_logits=return_logits)


def _run(config, params, prompt_BL, max_new_tokens, temperature, top_k, top_p, key, eos_id,
         return_logits):
  prompt_BL = jnp.asarray(prompt_BL)
  _check_args(prompt_BL, max_new_tokens, temperature, top_k, top_p, key)
  check_token_ids(prompt_BL, config.vocab_size, "prompt token ids")
  b, length = prompt_BL.shape
  if max_new_tokens == 0:
    empty = jnp.zeros((b, 0), jnp.int32)
    return empty, jnp.zeros((b, 0, config.vocab_size), jnp.float32)
  padded = length
  if not config.rope_scaling.depends_on_length:  # (else padding would change the RoPE table)
    padded = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
  padded_BP = jnp.pad(prompt_BL.astype(jnp.int32), ((0, 0), (0, padded - length)))
  sampling = (jnp.float32(temperature),
              jnp.int32(config.vocab_size if top_k is None else min(top_k, config.vocab_size)),
              jnp.float32(1.0 if top_p is None else top_p))
  key = jax.random.key(0) if key is None else key  # unused when greedy
  return _generate_jit(config, params, padded_BP, jnp.int32(length), key, sampling,
                       jnp.int32(-1 if eos_id is None else eos_id),
                       cache_size=padded + max_new_tokens, max_new_tokens=max_new_tokens,
                       return_logits=return_logits)


def generate(config: ModelConfig, params, prompt_BL, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             key: jax.Array | None = None, eos_id: int | None = None) -> jax.Array:
  """Continues each prompt by max_new_tokens tokens: int32 [B, max_new_tokens].

  Greedy when temperature == 0; otherwise samples from softmax(logits / temperature), restricted
  to the top_k tokens and/or the top_p nucleus, with `key`. Every prompt in the batch has the
  same length (no padding tokens). Once a sequence emits eos_id it keeps emitting eos_id.
  Dynamic NTK / LongRoPE pick their table per step from the current length while cached keys
  keep the table they were written with, exactly as transformers' cached generation does.
  """
  tokens_BT, _ = _run(config, params, prompt_BL, max_new_tokens, temperature, top_k, top_p, key,
                      eos_id, return_logits=False)
  return tokens_BT


def generate_with_logits(config: ModelConfig, params, prompt_BL, max_new_tokens: int, *,
                         temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, key: jax.Array | None = None,
                         eos_id: int | None = None) -> tuple[jax.Array, jax.Array]:
  """As `generate`, also returning the float32 logits [B, max_new_tokens, V] of every step."""
  return _run(config, params, prompt_BL, max_new_tokens, temperature, top_k, top_p, key, eos_id,
              return_logits=True)
