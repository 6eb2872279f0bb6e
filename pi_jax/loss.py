"""Next-token losses computed in chunks along the sequence.

The float32 logits of a whole long window never exist at once: the final hidden states are
projected to the vocabulary one chunk of positions at a time, under `jax.checkpoint`, so the
backward pass recomputes each chunk's logits instead of keeping them (32K × 128K float32 logits
would be 16.8 GB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pi_jax import model as model_lib
from pi_jax.config import ModelConfig

# Positions per chunk. On the 2-core CPU, 256 (with attention tiles of 256) made the 8K
# SmolLM2 forward + NLL ~10% faster than 1024 (docs/performance.md): a chunk's logits
# ([256, 49152] float32, 50 MB) stay closer to the cache for the max and exp-sum passes.
DEFAULT_CHUNK = 256


def chunked_nll(config: ModelConfig, params, h_BLD: jax.Array, targets_BL: jax.Array,
                chunk: int = DEFAULT_CHUNK) -> jax.Array:
  """Per-position negative log-likelihood [B, L] (float32) of `targets` given hidden states."""
  b, l, d = h_BLD.shape
  if not isinstance(chunk, int) or chunk <= 0:
    raise ValueError(f"loss chunk must be a positive number of positions, got {chunk!r}")
  if targets_BL.shape != (b, l):
    raise ValueError(f"targets shape {targets_BL.shape} does not match hidden states {(b, l)}")
  chunk = min(chunk, l)
  pad = (-l) % chunk
  if pad:
    h_BLD = jnp.pad(h_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
  n = (l + pad) // chunk
  h_CBTD = h_BLD.reshape(b, n, chunk, d).swapaxes(0, 1)
  t_CBT = targets_BL.reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(h_BTD, t_BT):
    logits_BTV = model_lib.logits_from_hidden(config, params, h_BTD)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, t_BT[..., None], axis=-1)[..., 0]
    return logz_BT - picked_BT

  nll_CBT = jax.lax.map(lambda xs: one_chunk(*xs), (h_CBTD, t_CBT))
  return nll_CBT.swapaxes(0, 1).reshape(b, n * chunk)[:, :l]


def token_nll(config: ModelConfig, params, tokens_BL: jax.Array, targets_BL: jax.Array,
              positions_BL: jax.Array | None = None, chunk: int = DEFAULT_CHUNK) -> jax.Array:
  """NLL [B, L] of targets_BL[:, t] given tokens_BL[:, :t+1] (targets are usually tokens shifted)."""
  h_BLD = model_lib.hidden_states(config, params, tokens_BL, positions_BL)
  return chunked_nll(config, params, h_BLD, targets_BL, chunk)


def mean_loss(config: ModelConfig, params, tokens_BL, targets_BL, mask_BL,
              positions_BL=None, chunk: int = DEFAULT_CHUNK):
  """(mean NLL over mask, number of scored tokens): the training objective."""
  nll_BL = token_nll(config, params, tokens_BL, targets_BL, positions_BL, chunk)
  mask = mask_BL.astype(jnp.float32)
  count = jnp.sum(mask)
  return jnp.sum(nll_BL * mask) / jnp.maximum(count, 1.0), count
