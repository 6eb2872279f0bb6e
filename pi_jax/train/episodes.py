"""Passkey episodes mixed into training rows (the miniature's pre-training, PI §3.3's prompt).

A fraction of the rows of every training batch is replaced by a passkey episode of exactly
seq_len + 1 tokens: filler groups, the key line with a random 5-digit key, more filler, the
question, and the key again as the answer. The number of filler groups after the key is uniform
over what fits, so the key-question distance spreads over [0, seq_len]. Which rows are episodes,
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
    self._filler_ids = tokenizer.encode(self.template.filler * 4, add_bos=False)
    builder = passkey.PromptBuilder(tokenizer, self.template)
    base_len = builder._len(10000, 0, 0) + 5  # + the answer's 5 digits
    self._per_group = builder._len(10000, 0, 1) - builder._len(10000, 0, 0)
    self._groups = (self.width - base_len) // self._per_group
    if self._groups < 1:
      raise ValueError(f"seq_len {seq_len} is too short for a passkey episode "
                       f"({base_len} tokens without filler)")

  @property
  def num_eval(self) -> int:
    return self.base.num_eval

  def episode(self, rng: np.random.Generator) -> np.ndarray:
    """One episode row [seq_len + 1]: BOS, filler padding, the prompt, the key as the answer."""
    key = int(rng.integers(10000, 100000))
    n_after = int(rng.integers(0, self._groups + 1))
    text = self.template.prompt(key, self._groups - n_after, n_after) + f" {key}"
    ids = self.tok.encode(text, add_bos=False)[-(self.width - 1):]
    pad = self.width - 1 - len(ids)
    filler = self._filler_ids * (pad // len(self._filler_ids) + 1)
    head = filler[len(filler) - pad:] if pad else []
    bos = [self.tok.bos_id] if self.tok.bos_id is not None else [self.tok.eos_id]
    return np.asarray(bos + head + ids, np.int32)

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
    return f"{self.base.fingerprint()}:passkey:{self.fraction:g}:{self.template_name}"

  def store_meta(self) -> dict | None:
    return self.base.store_meta() if hasattr(self.base, "store_meta") else None
