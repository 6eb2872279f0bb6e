"""What the benchmarks share: the repository root, where results go, the real model's shape and
the synthetic tokens the speed benchmarks feed it."""

from __future__ import annotations

import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "results", "benchmarks")


def smollm2_config():
  """SmolLM2-135M's architecture (pi_jax's preset: the same numbers the real checkpoint has)."""
  from pi_jax import presets
  return presets.preset("smollm2-135m")


def tokens(length: int, vocab: int, batch: int = 1) -> np.ndarray:
  """Reproducible random token ids [batch, length] (seed 0)."""
  return np.random.RandomState(0).randint(0, vocab, size=(batch, length)).astype(np.int32)
