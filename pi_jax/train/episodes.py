"""Passkey episodes mixed into training rows (the miniature's pre-training, PI §3.3's prompt).

A fraction of the rows of every training batch is replaced by a passkey episode of exactly
seq_len + 1 tokens: filler, the key line with a random 5-digit key, more filler, the question,
and the key again as the answer (PromptBuilder.fill, the same layout the mini template's
evaluation uses). The key-question distance in tokens is uniform over everything that fits,
[~20, ~seq_len - 20], not a few whole-filler-group offsets. Which rows are episodes,
their keys and distances are a pure function of (seed, step, row), like the rest of the batch,
so a resumed run sees exactly the same rows.
"""

from __future__ import annotations

import numpy as np

from pi_jax.evals import passkey


class PasskeyMixture:
  """A TrainData (see pipeline.TrainData) whose training rows are partly passkey episodes.

  Held-out rows stay plain text, so eval_loss is comparable with a run without episodes.
  """

  def __init__(self, base, tokenizer, seq_len: int, global_batch: int, fraction: float,
               seed: int, template: str = "mini"):
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"passkey_fraction must be in (0, 1], got {fraction}")
    self.base, self.tok, self.fraction, self.seed = base, tokenizer, fraction, seed
    self.global_batch = global_batch
    self.template_name = template
    self.template = passkey.get_template(template)
    self.width = seq_len + 1
    self.builder = passkey.PromptBuilder(tokenizer, self.template)
    self.lead = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    try:
      self.builder.distance_range(self.width, 10000, len(self.lead))
    except ValueError as e:
      raise ValueError(f"seq_len {seq_len} is too short for a passkey episode: {e}") from None

  @property
  def num_eval(self) -> int:
    return self.base.num_eval

  def episode(self, rng: np.random.Generator) -> np.ndarray:
    """One episode row [seq_len + 1]: BOS, filler, the prompt, the key as the answer."""
    key = int(rng.integers(10000, 100000))
    nearest, farthest = self.builder.distance_range(self.width, key, len(self.lead))
    k = int(rng.integers(nearest, farthest + 1))
    prompt, answer, _ = self.builder.fill(self.width, k, key, self.lead)
    return np.asarray(prompt + answer, np.int32)

  def train_batch(self, step: int, rows: slice) -> np.ndarray:
    out = np.array(self.base.train_batch(step, rows), np.int32)
    global_rows = np.arange(self.global_batch)[rows]
    for i, j in enumerate(global_rows):
      rng = np.random.default_rng([self.seed, step, int(j), 0x9A55])
      if rng.random() < self.fraction:
        out[i] = self.episode(rng)
    return out

  def eval_batch(self, index: int, batch: int, rows: slice) -> np.ndarray:
    return self.base.eval_batch(index, batch, rows)

  def fingerprint(self) -> str:
    return (f"{self.base.fingerprint()}:passkey:{self.fraction:g}:{self.template_name}"
            ":token-distance")

  def store_meta(self) -> dict | None:
    return self.base.store_meta() if hasattr(self.base, "store_meta") else None
