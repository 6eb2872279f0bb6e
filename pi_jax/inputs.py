"""Checks of what callers pass in, done at the API boundary (outside jit).

Inside jit an out-of-range token id is clamped by the embedding gather: a wrong tokenizer gives
plausible, wrong logits. So the public entry points check concrete ids before tracing.
"""

from __future__ import annotations

import jax
import numpy as np


def check_token_ids(tokens, vocab_size: int, what: str = "token ids") -> None:
  """Raises ValueError naming the first id outside [0, vocab_size); no-op under tracing."""
  if isinstance(tokens, jax.core.Tracer):
    return  # inside a caller's jit: the caller's own boundary checks
  if isinstance(tokens, jax.Array):
    if not tokens.is_fully_addressable:  # another host's rows: each host checks its own
      return
    # device_get, not tokens.min(): a concrete array closed over by a jitted caller is read on
    # the host, where a jax op would be traced.
    tokens = np.asarray(jax.device_get(tokens))
  arr = np.asarray(tokens)
  if arr.size == 0:
    return
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
  bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
  if bad.size:
    where = np.unravel_index(bad[0], arr.shape)
    raise ValueError(f"{what}: id {int(arr[where])} at position {tuple(int(i) for i in where)} "
                     f"is outside the model's vocabulary of size {vocab_size} (ids 0.."
                     f"{vocab_size - 1}); {bad.size} id(s) out of range. Is this the model's "
                     "own tokenizer?")
