"""Next-token losses computed in chunks along the sequence.

The float32 logits of a whole long window never exist at once: the final hidden states are
projected to the vocabulary one chunk of positions at a time, under `jax.checkpoint`, so the
backward pass recomputes each chunk's logits instead of keeping them (32K × 128K float32 logits
would be 16.8 GB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pi_jax import dispatch, native
from pi_jax import model as model_lib
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions

# Positions per chunk (the training default, TrainConfig.loss_chunk, is the same). On the 2-core
# CPU, with the native kernels, the 8K SmolLM2 NLL part took 1.81 s at 1024, 1.82 at 2048, 1.88
# at 512, 2.05 at 256 and 2.47 at 128 (docs/performance.md): fewer chunks pack the vocabulary
# matrix fewer times, and a chunk's logits ([1024, 49152] float32, 200 MB) are read once by the
# native log-sum-exp.
DEFAULT_CHUNK = 1024


@jax.custom_vjp
def _native_terms(logits_MV, targets_M):
  return native.logsumexp_pick(logits_MV, targets_M)


def _native_terms_fwd(logits_MV, targets_M):
  logz_M, picked_M = native.logsumexp_pick(logits_MV, targets_M)
  return (logz_M, picked_M), (logits_MV, logz_M, targets_M)


def _native_terms_bwd(res, cotangents):
  logits_MV, logz_M, targets_M = res
  g_logz, g_picked = cotangents
  probs_MV = jnp.exp(logits_MV - logz_M[:, None])
  onehot_MV = jax.nn.one_hot(targets_M, logits_MV.shape[1], dtype=logits_MV.dtype)
  return g_logz[:, None] * probs_MV + g_picked[:, None] * onehot_MV, None


_native_terms.defvjp(_native_terms_fwd, _native_terms_bwd)


def logsumexp_and_target(logits_BTV: jax.Array, targets_BT: jax.Array, native_kernel: bool):
  """(logsumexp over the vocabulary, the target's logit), each [B, T]: NLL = the first minus
  the second. native_kernel (pi_jax.dispatch decides: the CPU, float32, one device): one pass of
  the native kernel over the logits (pi_jax.native.logsumexp_pick); else XLA's logsumexp and
  gather."""
  if not native_kernel or logits_BTV.dtype != jnp.float32:
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz_BT, picked_BT
  b, t, v = logits_BTV.shape
  logz_M, picked_M = _native_terms(logits_BTV.reshape(b * t, v), targets_BT.reshape(b * t))
  return logz_M.reshape(b, t), picked_M.reshape(b, t)


def chunked_nll(config: ModelConfig, params, h_BLD: jax.Array, targets_BL: jax.Array,
                chunk: int = DEFAULT_CHUNK, *, run: RunOptions | None = None) -> jax.Array:
  """Per-position negative log-likelihood [B, L] (float32) of `targets` given hidden states."""
  native_kernel = dispatch.choose(run).native_matmul
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
    logits_BTV = model_lib.logits_from_hidden(config, params, h_BTD, run=run)
    logz_BT, picked_BT = logsumexp_and_target(logits_BTV, t_BT, native_kernel)
    return logz_BT - picked_BT

  nll_CBT = jax.lax.map(lambda xs: one_chunk(*xs), (h_CBTD, t_CBT))
  return nll_CBT.swapaxes(0, 1).reshape(b, n * chunk)[:, :l]


def token_nll(config: ModelConfig, params, tokens_BL: jax.Array, targets_BL: jax.Array,
              positions_BL: jax.Array | None = None, chunk: int = DEFAULT_CHUNK,
              segment_ids_BL: jax.Array | None = None, *,
              run: RunOptions | None = None) -> jax.Array:
  """NLL [B, L] of targets_BL[:, t] given tokens_BL[:, :t+1] (targets are usually tokens shifted).

  segment_ids_BL: packed documents (model.forward); position t then sees only its own document.
  """
  h_BLD = model_lib.hidden_states(config, params, tokens_BL, positions_BL,
                                  segment_ids_BL=segment_ids_BL, run=run)
  return chunked_nll(config, params, h_BLD, targets_BL, chunk, run=run)


def summed_loss(config: ModelConfig, params, tokens_BL, targets_BL, mask_BL,
                positions_BL=None, chunk: int = DEFAULT_CHUNK, segment_ids_BL=None, *,
                run: RunOptions | None = None):
  """(sum of NLL over mask, number of scored tokens): what micro-batches add up."""
  nll_BL = token_nll(config, params, tokens_BL, targets_BL, positions_BL, chunk, segment_ids_BL,
                     run=run)
  mask = mask_BL.astype(jnp.float32)
  return pairwise_sum(nll_BL * mask), jnp.sum(mask)


def pairwise_sum(x: jax.Array) -> jax.Array:
  """The sum of all of x's elements by halving (zero-padded to a power of two): the same
  additions in the same order in every program. XLA's reduce orders its additions by how it
  fused the operand, so the same masked NLL summed 1-2 ulp apart in the concat and documents
  training steps on an AVX-512 host (tests/test_packing.py); log2(size) elementwise adds.

  Under a mesh of several devices it is jnp.sum (partial sums and an all-reduce): halving a
  sharded array moves its halves between devices, and on XLA:CPU those collective permutes,
  issued beside the step's other collectives, deadlocked 8 fake devices."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    return jnp.sum(x)
  x = x.reshape(-1)
  size = 1 << max(0, (x.shape[0] - 1).bit_length())
  x = jnp.pad(x, (0, size - x.shape[0]))
  while x.shape[0] > 1:
    x = x[:x.shape[0] // 2] + x[x.shape[0] // 2:]
  return x[0]


def mean_loss(config: ModelConfig, params, tokens_BL, targets_BL, mask_BL,
              positions_BL=None, chunk: int = DEFAULT_CHUNK, segment_ids_BL=None, *,
              run: RunOptions | None = None):
  """(mean NLL over mask, number of scored tokens): the training objective."""
  total, count = summed_loss(config, params, tokens_BL, targets_BL, mask_BL, positions_BL, chunk,
                             segment_ids_BL, run=run)
  return total / jnp.maximum(count, 1.0), count
