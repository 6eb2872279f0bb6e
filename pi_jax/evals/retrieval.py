"""What the retrieval tests (passkey, needle) share: decoding prompts and the distance summary.

Distances are real token counts: k = tokens from the first token of what must be retrieved (the
pass key, the needle) to the end of the prompt, as measured on the prompt that was run, never
the nominal grid value (the nearest grid point of a passkey prompt, nominal k = 0, is ~31 tokens
away, because the rest of the key line and the question follow the key).

The summary of accuracy by distance (PI §3.3's effective context window and what it hides); a
distance passes when its accuracy is >= the threshold:
  nearest_k          the smallest distance of the grid, and `nearest_passes` whether it passes.
  k_max              the largest k such that every k' <= k passes (PI's k_max). None when the
                     nearest distance fails: then k_max is undefined, however far the model
                     retrieves, and the next two numbers say what it does.
  largest_passing_k  the largest k that passes at all (None when none does).
  far_run_from       the smallest k such that every k' >= k up to the farthest passes (None when
                     the farthest fails).
  verdict            one line that states the above, e.g. "nearest distance k = 31 fails, so
                     k_max is undefined; largest passing k = 2053; every k >= 1029 passes".
A missing value is `null` in JSON and MISSING ("–") in every text (console, tables, reports).
"""

from __future__ import annotations

import numpy as np

MISSING = "–"  # how text shows a value that does not exist (JSON: null)


def fmt(value) -> str:
  """A value for text, MISSING when there is none."""
  return MISSING if value is None else str(value)


def effective_window(ks, accuracies, threshold: float):
  """k_max: the largest k such that every k' <= k has accuracy >= threshold (None if none)."""
  best = None
  for k, acc in sorted(zip(ks, accuracies)):
    if acc < threshold:
      break
    best = k
  return best


def far_run_from(ks, accuracies, threshold: float):
  """The smallest k such that every k' >= k of the grid passes (None if the farthest fails)."""
  best = None
  for k, acc in sorted(zip(ks, accuracies), reverse=True):
    if acc < threshold:
      break
    best = k
  return best


def largest_passing_k(ks, accuracies, threshold: float):
  passing = [k for k, a in zip(ks, accuracies) if a >= threshold]
  return max(passing) if passing else None


def distance_summary(ks, accuracies, threshold: float) -> dict:
  """k_max and what it hides, for accuracies at real token distances ks (module docstring)."""
  if not len(ks):
    raise ValueError("distance_summary needs at least one distance")
  order = sorted(zip(ks, accuracies))
  nearest, nearest_acc = order[0]
  out = {"nearest_k": nearest, "nearest_passes": bool(nearest_acc >= threshold),
         "k_max": effective_window(ks, accuracies, threshold),
         "largest_passing_k": largest_passing_k(ks, accuracies, threshold),
         "far_run_from": far_run_from(ks, accuracies, threshold),
         "passing": int(sum(a >= threshold for a in accuracies)), "threshold": threshold}
  out["verdict"] = verdict(out, farthest=order[-1][0])
  return out


def verdict(s: dict, farthest) -> str:
  """One line a user can act on, also when the nearest distance fails."""
  k_max, largest, far = s["k_max"], s["largest_passing_k"], s["far_run_from"]
  if largest is None:
    return f"no distance passes (nearest k = {s['nearest_k']}, farthest k = {farthest})"
  if k_max == farthest:
    return f"k_max = {k_max}: every distance passes"
  far_text = (f"every k >= {far} passes" if far is not None
              else f"the farthest k = {farthest} fails")
  if k_max is None:
    return (f"nearest distance k = {s['nearest_k']} fails, so k_max is undefined; largest "
            f"passing k = {largest}; {far_text}")
  return f"k_max = {k_max}; largest passing k = {largest}; {far_text}"


def generate_continuations(config, params, tok, prompts: list, max_new_tokens: int,
                           batch_size: int, generate_fn=None,
                           run=None) -> list[tuple[str, list[int]]]:
  """(text, ids) of the greedy continuation of each prompt (equal lengths), cut at EOS.

  One batch of `batch_size` rows (a short batch is padded with copies of its first prompt so
  every batch of a length shares one compiled program); decoding uses the KV cache. run: the
  pi_jax.run.RunOptions to compute with.
  """
  import jax.numpy as jnp
  if generate_fn is None:
    from pi_jax.generate import generate as generate_fn
  if len({len(p) for p in prompts}) != 1:
    raise ValueError("generate_continuations: prompts of one batch must have equal lengths")
  rows = [list(p) for p in prompts] + [list(prompts[0])] * (batch_size - len(prompts))
  extra = {"run": run} if run is not None else {}  # a test's fake generate_fn takes none
  out = np.asarray(generate_fn(config, params, jnp.asarray(np.array(rows, np.int32)),
                               max_new_tokens, temperature=0.0, eos_id=tok.eos_id, **extra))
  results = []
  for row in out[:len(prompts)]:
    ids = [int(i) for i in row]
    if tok.eos_id is not None and tok.eos_id in ids:
      ids = ids[:ids.index(tok.eos_id)]
    results.append((tok.decode(ids), ids))
  return results
