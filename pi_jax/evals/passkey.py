"""Passkey retrieval (Mohtashami & Jaggi 2023) and the effective context window (PI §3.3).

The prompt is the paper's template: a task line, the filler sentence group repeated, the pass key
line at a chosen depth, more filler, and the question. k is the distance in tokens from the
key's first token to the end of the input; for each length L, `depths` values of k are evenly
spaced over [0, L) (k = 0 puts the key just before the question, the nearest it can be) and each
gets `trials` random 5-digit keys. The filler count is chosen so the prompt is as long as
possible without exceeding L tokens.

Modes:
  generate  greedy decoding with the KV cache; success when the continuation, leading spaces
            stripped, starts with the key (the paper's protocol).
  score     teacher forcing, no decoding loop: the prompt plus " KEY" in one forward; success
            when every key token is the argmax given what precedes it. Also reports the key's
            log-probability.

Summary per length (pi_jax.evals.retrieval.distance_summary): each grid point is reported at
its REAL distance (`k`, the mean measured k of its trials; the grid value is `nominal_k`), and a
distance passes when >= 20% of its trials succeed (PI §3.3). k_max (the effective context
window) = the largest k such that every k' <= k passes; it is undefined (null, "–" in text)
when the nearest distance fails, even if every farther one passes. So the summary also gives
`nearest_k` and whether it passes, `largest_passing_k`, `far_run_from` (the smallest k with
every k' >= k passing) and `verdict`, one line that says all of it. `depths` is a COUNT of
distances measured from the END of the prompt (nominal k = 0: key right before the question,
really ~31 tokens with the paper's template), not the "depth %" from the start that
needle-in-a-haystack tools use: depth % ≈ 100·(1 − k/L).
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pi_jax.config import ModelConfig
from pi_jax.evals import retrieval

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
        "them. I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
KEY_HEAD = " The pass key is"  # the text of the key line before the key itself
SUCCESS_THRESHOLD = 0.2  # PI §3.3: a distance counts when >= 20% of its trials succeed
MODES = ("generate", "score")


def effective_window(ks, accuracies, threshold: float = SUCCESS_THRESHOLD):
  """k_max: the largest k such that every k' <= k has accuracy >= threshold (None if none)."""
  return retrieval.effective_window(ks, accuracies, threshold)


@dataclasses.dataclass(frozen=True)
class Template:
  """The text of a passkey prompt: task line, filler group, key line ({key}), question."""
  task: str
  filler: str
  key_line: str
  question: str
  # The prompt and its answer (" KEY") fill the length exactly, as a training row is filled,
  # and the filler is cut at token level so the key sits at exactly k (PromptBuilder.fill):
  # for small windows, where the few tokens after the prompt would otherwise sit past the
  # trained positions and whole filler groups would leave only a handful of distances.
  answer_in_window: bool = False

  def prompt(self, key: int | str, n_before: int, n_after: int) -> str:
    return (self.task + self.filler * n_before + self.key_line.format(key=key)
            + self.filler * n_after + self.question)

  @property
  def key_head(self) -> str:
    """The key line's text before the key itself."""
    return self.key_line.split("{key}", 1)[0].rstrip()


TEMPLATES = {
    # PI §3.3's prompt, as in Mohtashami & Jaggi (2023).
    "paper": Template(TASK, FILLER, KEY_LINE, QUESTION),
    # Scaled down for the miniature's 256-token window: the same text without the task line.
    "mini": Template("", FILLER, KEY_LINE, QUESTION, answer_in_window=True),
}


def get_template(name: str) -> Template:
  if name not in TEMPLATES:
    raise ValueError(f"passkey template {name!r}: expected one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def passkey_prompt(key: int | str, n_before: int, n_after: int) -> str:
  """The paper's prompt with `n_before` filler groups before the key line and `n_after` after."""
  return TEMPLATES["paper"].prompt(key, n_before, n_after)


def depth_grid(length: int, depths: int) -> list[int]:
  """`depths` values of k evenly spaced over [0, length)."""
  if depths < 1:
    raise ValueError(f"--depths must be >= 1, got {depths}")
  return [int(i * length // depths) for i in range(depths)]


@dataclasses.dataclass(frozen=True)
class Trial:
  length: int  # the target L
  k: int  # the nominal distance from the grid
  key: int
  ids: tuple[int, ...]  # prompt tokens (BOS as the model's tokenizer adds it)
  key_ids: tuple[int, ...]  # the tokens of " KEY" that follow the prompt
  actual_k: int  # measured distance of the key's first token from the end


class PromptBuilder:
  """Chooses filler counts so a prompt is <= L tokens with its key ~k tokens from the end."""

  def __init__(self, tok, template: Template = TEMPLATES["paper"]):
    self.tok = tok
    self.template = template
    self._len_cache: dict[tuple, int] = {}
    self._fixed_pieces: dict[str, list[int]] | None = None

  def _len(self, key, n_before, n_after) -> int:
    sig = (len(str(key)), n_before, n_after)
    if sig not in self._len_cache:
      self._len_cache[sig] = len(self.tok.encode(self.template.prompt(key, n_before, n_after)))
    return self._len_cache[sig]

  def trial(self, length: int, k: int, key: int) -> Trial:
    if self.template.answer_in_window:
      lead = self.tok.encode("")  # BOS, when the tokenizer adds one
      ids, key_ids, actual_k = self.fill(length, k, key, lead)
      return Trial(length, k, key, tuple(ids), tuple(key_ids), actual_k)
    tok = self.tok
    base = self._len(key, 0, 0)
    if base >= length:
      raise ValueError(f"passkey length {length} is shorter than the prompt without filler "
                       f"({base} tokens)")
    per = self._len(key, 0, 1) - base  # tokens per filler group
    total = (length - base) // per
    while total > 0 and self._len(key, 0, total) > length:  # merges at the seams may add tokens
      total -= 1
    tpl = self.template
    tail = base - len(tok.encode(tpl.task + tpl.key_head))  # k with no filler after the key
    n_after = min(total, max(0, round((k - tail) / per)))
    text = tpl.prompt(key, total - n_after, n_after)
    ids = tok.encode(text)
    head = tok.encode(tpl.task + tpl.filler * (total - n_after) + tpl.key_head)
    full = tok.encode(text + f" {key}")
    if full[:len(ids)] != ids:
      raise ValueError("the tokenizer merges the key into the prompt's last token; cannot "
                       "score the key's tokens separately")
    return Trial(length, k, key, tuple(ids), tuple(full[len(ids):]), len(ids) - len(head))

  # -- token-level prompts (templates with answer_in_window) --

  def _pieces(self, key: int) -> dict[str, list[int]]:
    """The template's parts as token ids; the parts meet at spaces, so they concatenate."""
    tpl = self.template
    enc = lambda text: self.tok.encode(text, add_bos=False)
    if self._fixed_pieces is None:  # the parts that do not depend on the key, encoded once
      self._fixed_pieces = {"task": enc(tpl.task) if tpl.task else [], "filler": enc(tpl.filler),
                            "key_head": enc(tpl.key_head), "question": enc(tpl.question)}
    parts = dict(self._fixed_pieces, key_line=enc(tpl.key_line.format(key=key)),
                 answer=enc(f" {key}"))
    if parts["key_line"][:len(parts["key_head"])] != parts["key_head"]:
      raise ValueError("the tokenizer merges the pass key into the text before it; cannot "
                       "place the key at a token distance")
    return parts

  def distance_range(self, length: int, key: int, lead: int = 1) -> tuple[int, int]:
    """The nearest and farthest k a token-level prompt of `length` tokens can hold."""
    return self._range(self._pieces(key), length, lead)

  @staticmethod
  def _range(p: dict[str, list[int]], length: int, lead: int) -> tuple[int, int]:
    nearest = len(p["key_line"]) - len(p["key_head"]) + len(p["question"])
    fixed = (lead + len(p["task"]) + len(p["key_line"]) + len(p["question"])
             + len(p["answer"]))
    if fixed > length:
      raise ValueError(f"passkey length {length} is too short for a passkey prompt ({fixed} "
                       f"tokens without filler)")
    return nearest, nearest + length - fixed

  def fill(self, length: int, k: int, key: int, lead: list[int]) -> tuple[list, list, int]:
    """(prompt ids, answer ids, actual k): lead + prompt + answer is exactly `length` tokens.

    Filler is cut at token level (the last tokens of repeated filler groups), before the key
    line as padding and after it to set the distance, so k is exact within distance_range
    rather than rounded to whole filler groups: a model cannot pass by learning a few fixed
    offsets. Used by both the training episodes and the evaluation of the mini template.
    """
    p = self._pieces(key)
    nearest, farthest = self._range(p, length, len(lead))
    k = min(max(k, nearest), farthest)
    gap = k - nearest  # filler tokens between the key line and the question
    pad = farthest - k  # filler tokens between the task and the key line
    filler = p["filler"] * ((max(gap, pad) // len(p["filler"])) + 1)
    tail = lambda n: filler[len(filler) - n:] if n else []
    prompt = (lead + p["task"] + tail(pad) + p["key_line"] + tail(gap) + p["question"])
    return prompt, p["answer"], k

  def trials(self, lengths, depths: int, num_trials: int, seed: int) -> list[Trial]:
    rng = random.Random(seed)
    out = []
    for length in lengths:
      for k in depth_grid(length, depths):
        for _ in range(num_trials):
          out.append(self.trial(length, k, rng.randint(10000, 99999)))
    return out


def _score_fn(config: ModelConfig, run=None):
  from pi_jax import model as model_lib

  def fn(params, tokens_BL, key_pos_BM, key_ids_BM):
    """Argmax hit and log-prob of each key token [B, M] (positions predict the next token)."""
    h_BLD = model_lib.hidden_states(config, params, tokens_BL, run=run)
    h_BMD = jnp.take_along_axis(h_BLD, key_pos_BM[..., None], axis=1)
    logits_BMV = model_lib.logits_from_hidden(config, params, h_BMD, run=run)
    logp_BMV = jax.nn.log_softmax(logits_BMV, axis=-1)
    hit_BM = jnp.argmax(logits_BMV, axis=-1) == key_ids_BM
    return hit_BM, jnp.take_along_axis(logp_BMV, key_ids_BM[..., None], axis=-1)[..., 0]

  return jax.jit(fn)


def run_trials(config: ModelConfig, params, tok, trials: list[Trial], *, mode: str = "generate",
               batch_size: int = 1, progress: Callable[[int], object] | None = None,
               generate_fn=None, run=None) -> list[dict]:
  """One result dict per trial: success, generated text or key log-prob, timings. run: the
  pi_jax.run.RunOptions to compute with (None: the defaults)."""
  if mode not in MODES:
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
  from pi_jax.inputs import check_token_ids
  for t in trials:
    check_token_ids(np.asarray(t.ids + t.key_ids), config.vocab_size,
                    f"passkey prompt (length {t.length}, k {t.k})")
  bar = progress(len(trials)) if progress else None
  results = []
  groups: dict[tuple, list[Trial]] = {}
  for t in trials:  # equal-length prompts share one batch (and one compilation)
    groups.setdefault((t.length, len(t.ids) if mode == "generate" else 0), []).append(t)
  score = _score_fn(config, run) if mode == "score" else None
  for group in groups.values():
    for b0 in range(0, len(group), batch_size):
      batch = group[b0:b0 + batch_size]
      t0 = time.perf_counter()
      if mode == "generate":
        out = _generate_batch(config, params, tok, batch, batch_size, generate_fn, run)
      else:
        out = _score_batch(score, params, batch, batch_size)
      seconds = (time.perf_counter() - t0) / len(batch)
      for t, o in zip(batch, out):
        results.append({"length": t.length, "k": t.k, "actual_k": t.actual_k, "key": t.key,
                        "tokens": len(t.ids), "seconds": round(seconds, 3), **o})
      if bar is not None:
        bar.update(len(batch))
  if bar is not None:
    bar.close()
  return results


def _generate_batch(config, params, tok, batch, batch_size, generate_fn, run=None):
  new = max(len(t.key_ids) for t in batch) + 2
  outs = retrieval.generate_continuations(config, params, tok, [t.ids for t in batch], new,
                                          batch_size, generate_fn, run=run)
  return [{"success": text.lstrip().startswith(str(t.key)), "output": text, "output_ids": ids}
          for t, (text, ids) in zip(batch, outs)]


def _score_batch(score, params, batch, batch_size):
  # One shape per target length (prompts of a length differ by a few tokens), not per prompt.
  width = max(batch[0].length + 16, max(len(t.ids) + len(t.key_ids) for t in batch))
  m = max(len(t.key_ids) for t in batch)
  tokens = np.zeros((batch_size, width), np.int32)
  pos = np.zeros((batch_size, m), np.int32)
  key_ids = np.zeros((batch_size, m), np.int32)
  valid = np.zeros((batch_size, m), bool)
  for row, t in enumerate(batch):
    seq = t.ids + t.key_ids
    tokens[row, :len(seq)] = seq
    n = len(t.key_ids)
    pos[row, :n] = np.arange(len(t.ids) - 1, len(t.ids) - 1 + n)  # logits there predict the key
    key_ids[row, :n] = t.key_ids
    valid[row, :n] = True
  hit, logp = score(params, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(key_ids))
  hit, logp = np.asarray(hit), np.asarray(logp, np.float64)
  return [{"success": bool(hit[r][valid[r]].all()),
           "key_logprob": float(logp[r][valid[r]].sum())} for r in range(len(batch))]


def summarize(results: list[dict]) -> dict:
  """Per length: accuracy at each real distance k, and k_max with what it hides (retrieval)."""
  by_length: dict[int, dict[int, list]] = {}
  for r in results:
    by_length.setdefault(r["length"], {}).setdefault(r["k"], []).append(r)
  out = {}
  for length, by_k in sorted(by_length.items()):
    nominal = sorted(by_k)
    actual = [float(np.mean([r["actual_k"] for r in by_k[k]])) for k in nominal]
    ks = [int(round(a)) for a in actual]
    acc = [float(np.mean([r["success"] for r in by_k[k]])) for k in nominal]
    out[length] = {
        "k": ks,
        "nominal_k": nominal,
        "actual_k": actual,
        "accuracy": acc,
        "trials": [len(by_k[k]) for k in nominal],
        "mean_accuracy": float(np.mean(acc)),
        **retrieval.distance_summary(ks, acc, SUCCESS_THRESHOLD),
    }
  return out
