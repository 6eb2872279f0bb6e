"""Sliding-window perplexity (Press et al. 2022), the measure PI §3.2 reports.

The definition every number from `evaluate_perplexity` uses (`definition="sliding"`):
  - Each document is tokenized on its own. BOS is prepended iff the model's tokenizer adds one
    (`tok.add_bos`); the BOS is context only, never a scored target. `max_tokens` cuts the
    token sequence (BOS included) to its first N tokens.
  - A sequence of N tokens has targets 1..N-1. Window k feeds tokens [kS, kS+W) at positions
    0..W-1 and predicts tokens kS+1..kS+W (clipped at the end); windows start at 0, S, 2S, …
    until one reaches the last token.
  - Each window scores only the targets no earlier window scored: all of the first window's,
    then the last S of each later one (fewer in the final window). Every target is scored
    exactly once, with at least W-S tokens of context outside the first window.
  - perplexity = exp(Σ NLL / Σ scored targets) over all documents.
  Documents with at most W targets are one window and are scored whole (`short_documents`
  counts them); with `skip_short` they are dropped instead (`skipped_documents`), using the
  LARGEST evaluated window, so every window sees the same documents (as PI's proof-pile set).

`definition="per_window_mean"` is the YaRN repository's average: the mean NLL of each
window's scored targets, averaged over all windows of all documents, then exp. Only the
averaging differs; the windows and scored targets are the ones above.

Efficiency: one compiled function per window size (short windows and the last batch are padded
and masked), batches of windows from any documents, the chunked loss (no [W, V] float32 logits),
and a mesh: parameters restored sharded and window batches split over the data axes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from pi_jax import loss as loss_lib
from pi_jax.config import ModelConfig
from pi_jax.evals import runtime
from pi_jax.inputs import check_token_ids
from pi_jax.memory import check_compiled_fits
from pi_jax.run import RunOptions

DEFINITIONS = ("sliding", "per_window_mean")


def plan_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(start, length, score_from) per window of a `num_tokens` sequence.

  The window feeds tokens[start:start+length] and predicts tokens[start+1:start+length+1];
  positions score_from..length-1 of it are scored.
  """
  if window < 1 or not 1 <= stride <= window:
    raise ValueError(f"need window >= 1 and 1 <= stride <= window, got window={window}, "
                     f"stride={stride} (a stride above the window would skip targets)")
  last_target = num_tokens - 1
  plan, start, scored_until = [], 0, 0  # targets 1..scored_until are done
  while last_target > scored_until:
    end = min(start + window, last_target)  # this window's last target
    plan.append((start, end - start, scored_until - start if plan else 0))
    scored_until = end
    start += stride
  return plan


@dataclasses.dataclass
class WindowResult:
  window: int
  nll_sum: float = 0.0
  tokens: int = 0
  windows: int = 0
  window_mean_sum: float = 0.0  # Σ over windows of each window's mean NLL (YaRN's average)
  documents: int = 0
  short_documents: int = 0
  skipped_documents: int = 0
  seconds: float = 0.0
  compile_seconds: float = 0.0
  computed_tokens: int = 0  # window tokens run through the model, overlap and padding included
  memory_bytes: int | None = None

  def perplexity(self, definition: str = "sliding") -> float:
    if definition == "per_window_mean":
      return math.exp(self.window_mean_sum / max(self.windows, 1))
    return math.exp(self.nll_sum / max(self.tokens, 1))

  def record(self, definition: str, max_position: int) -> dict:
    return {
        "window": self.window,
        "perplexity": self.perplexity(definition),
        "mean_nll": (self.window_mean_sum / max(self.windows, 1) if definition == "per_window_mean"
                     else self.nll_sum / max(self.tokens, 1)),
        "tokens": self.tokens,
        "documents": self.documents,
        "short_documents": self.short_documents,
        "skipped_documents": self.skipped_documents,
        "windows": self.windows,
        "beyond_model_window": self.window > max_position,
        "seconds": round(self.seconds, 3),
        "compile_seconds": round(self.compile_seconds, 3),
        "scored_tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds else None,
        "computed_tokens_per_second": (round(self.computed_tokens / self.seconds, 2)
                                       if self.seconds else None),
        "activation_memory_bytes": self.memory_bytes,
    }


def tokenize_documents(tok, docs: Iterable[tuple[str, str]], max_tokens: int | None = None):
  """[(doc_id, int32 tokens)] with the tokenizer's own BOS policy, cut to max_tokens."""
  out = []
  for doc_id, text in docs:
    ids = np.asarray(tok.encode(text), np.int32)
    if max_tokens is not None:
      ids = ids[:max_tokens]
    out.append((doc_id, ids))
  return out


def window_nll_fn(config: ModelConfig, window: int, chunk: int = loss_lib.DEFAULT_CHUNK,
                  run: RunOptions | None = None):
  """nll(params, tokens [B, W], targets [B, W]) -> NLL [B, W]: what each window batch runs."""
  def nll_fn(params, tokens_BL, targets_BL):
    return loss_lib.token_nll(config, params, tokens_BL, targets_BL, chunk=min(chunk, window),
                              run=run)
  return nll_fn


def make_window_scorer(config: ModelConfig, params, window: int, batch: int, *,
                       mesh=None, chunk: int = loss_lib.DEFAULT_CHUNK,
                       run: RunOptions | None = None):
  """Compiles NLL [B, W] of a batch of windows; returns (fn, memory_bytes, compile_seconds).

  Raises before any work if XLA's estimate of the activation memory exceeds what the device
  has free.
  """
  nll_fn = window_nll_fn(config, window, chunk, run)
  tokens_spec = runtime.batch_struct((batch, window), mesh)
  t0 = time.perf_counter()
  with runtime.mesh_context(mesh):
    compiled = jax.jit(nll_fn).lower(params, tokens_spec, tokens_spec).compile()
  seconds = time.perf_counter() - t0
  need = check_compiled_fits(compiled, f"window {window} × batch {batch}",
                             hint="lower --batch-size, spread it with --mesh, or use a smaller "
                                  "window")

  def run(tokens_BL: np.ndarray, targets_BL: np.ndarray):
    return compiled(params, runtime.put_batch(tokens_BL, mesh), runtime.put_batch(targets_BL, mesh))

  return run, need, seconds


def evaluate_perplexity(config: ModelConfig, params, documents: list[tuple[str, np.ndarray]],
                        windows: list[int], stride: int, *, batch_size: int = 1, mesh=None,
                        skip_short: bool = False, chunk: int = loss_lib.DEFAULT_CHUNK,
                        progress: Callable[[int, int], object] | None = None,
                        scorer_factory=make_window_scorer,
                        run: RunOptions | None = None) -> list[WindowResult]:
  """Sliding-window perplexity at each window size (see the module docstring).

  progress(window, total_windows) returns a tqdm-like object with update(n) and close().
  Everything is compiled (and its memory checked) before the first window is scored.
  """
  if not documents:
    raise ValueError("no documents to evaluate")
  for doc_id, ids in documents:
    check_token_ids(ids, config.vocab_size, f"document {doc_id}")
  for w in windows:
    if not 1 <= stride <= w:
      raise ValueError(f"--stride {stride} must be between 1 and every window (window {w})")
  results = {w: WindowResult(w) for w in windows}
  if skip_short:
    need = max(windows) + 1
    kept = [(d, t) for d, t in documents if len(t) >= need]
    for r in results.values():
      r.skipped_documents = len(documents) - len(kept)
    documents = kept
    if not documents:
      raise ValueError(f"every document is shorter than {need} tokens (--skip-short with "
                       f"window {max(windows)}); lower the window or drop --skip-short")
  # A window longer than every document would only pad: run it at the longest document's
  # length, which gives the same numbers (causal attention never sees right padding) unless the
  # RoPE table itself depends on the sequence length.
  longest = max(len(t) - 1 for _, t in documents)
  length_dependent = config.rope_scaling.kind in ("dynamic", "longrope")
  widths = {w: w if length_dependent else max(1, min(w, longest)) for w in windows}
  scorers = {}
  for w in windows:  # compile all first: a window that does not fit fails before any work
    scorers[w], results[w].memory_bytes, results[w].compile_seconds = scorer_factory(
        config, params, widths[w], batch_size, mesh=mesh, chunk=chunk, run=run)
  for w in windows:
    _score_window_size(results[w], scorers[w], documents, w, stride, batch_size, progress,
                       width=widths[w])
  return [results[w] for w in windows]


def prefix_perplexities(config: ModelConfig, params, ids: np.ndarray, windows: Iterable[int], *,
                        chunk: int = loss_lib.DEFAULT_CHUNK,
                        run: RunOptions | None = None) -> dict[int, float]:
  """{W: perplexity of the first W targets of `ids`} for several W, from ONE forward pass.

  Causal attention makes the first W targets of a long forward the same computation as a
  forward of the first W + 1 tokens, i.e. `evaluate_perplexity` with window W, stride W and
  max_tokens W + 1, at the cost of one pass over max(W) + 1 tokens. That holds only for RoPE
  tables that do not depend on the sequence length (`RopeScaling.depends_on_length`); for
  dynamic NTK and LongRoPE this raises: use evaluate_perplexity.
  """
  windows = sorted(set(int(w) for w in windows))
  if not windows or windows[0] < 1:
    raise ValueError(f"windows must be positive token counts, got {windows}")
  if config.rope_scaling.depends_on_length:
    raise ValueError(f"RoPE scaling {config.rope_scaling.describe()!r} depends on the sequence "
                     "length, so a prefix of one long forward is not the forward at that window; "
                     "use evaluate_perplexity")
  ids = np.asarray(ids, np.int32)
  top = windows[-1]
  if len(ids) < top + 1:
    raise ValueError(f"{len(ids)} tokens are fewer than the largest window {top} + 1")
  tokens_BL, targets_BL = ids[None, :top], ids[None, 1:top + 1]
  nll_fn = jax.jit(lambda p, x, y: loss_lib.token_nll(config, p, x, y, chunk=min(chunk, top),
                                                      run=run))
  nll = np.asarray(nll_fn(params, tokens_BL, targets_BL)[0], np.float64)
  return {w: float(np.exp(nll[:w].mean())) for w in windows}


def _score_window_size(result: WindowResult, scorer, documents, window, stride, batch, progress,
                       width=None):
  jobs = []  # (doc index, start, length, score_from)
  for i, (_, ids) in enumerate(documents):
    plan = plan_windows(len(ids), window, stride)
    if plan:
      result.documents += 1
      result.short_documents += len(plan) == 1 and plan[0][1] < window
    jobs.extend((i, *p) for p in plan)
  bar = progress(window, len(jobs)) if progress else None
  t0 = time.perf_counter()
  pending = None  # dispatch batch n+1 before reading batch n back: the host never idles the device
  for b0 in range(0, len(jobs), batch):
    chunk_jobs = jobs[b0:b0 + batch]
    tokens = np.zeros((batch, width or window), np.int32)
    targets = np.zeros((batch, width or window), np.int32)
    for row, (i, start, length, _) in enumerate(chunk_jobs):
      ids = documents[i][1]
      tokens[row, :length] = ids[start:start + length]
      targets[row, :length] = ids[start + 1:start + length + 1]
    out = scorer(tokens, targets)
    if pending is not None:
      _accumulate(result, *pending, bar)
    pending = (out, chunk_jobs)
  if pending is not None:
    _accumulate(result, *pending, bar)
  result.seconds = time.perf_counter() - t0
  result.computed_tokens = sum(j[2] for j in jobs)
  if bar is not None:
    bar.close()


def _accumulate(result: WindowResult, out, chunk_jobs, bar):
  nll = np.asarray(jax.device_get(out), np.float64)
  for row, (_, _, length, score_from) in enumerate(chunk_jobs):
    scored = nll[row, score_from:length]
    result.nll_sum += float(scored.sum())
    result.tokens += scored.size
    result.window_mean_sum += float(scored.mean())
    result.windows += 1
  if bar is not None:
    bar.update(len(chunk_jobs))


def reference_nll(config: ModelConfig, params, ids: np.ndarray, window: int,
                  stride: int) -> np.ndarray:
  """Brute force: every target scored by its own forward over its full allowed context.

  Target t (1..N-1) belongs to the first window that reaches it, k = max(0, ceil((t-W)/S)); its
  context is tokens[kS:t] at positions 0..t-1-kS. The oracle for the batched sliding path.
  """
  from pi_jax import model as model_lib
  n = len(ids)
  rows = np.zeros((n - 1, window), np.int32)
  last = np.zeros(n - 1, np.int32)
  for t in range(1, n):
    k = max(0, -(-(t - window) // stride))
    ctx = ids[k * stride:t]
    rows[t - 1, :len(ctx)] = ctx  # right padding: causal attention never looks at it
    last[t - 1] = len(ctx) - 1
  logits = jax.jit(model_lib.forward, static_argnums=0)(config, params, jnp.asarray(rows))
  logp = jax.nn.log_softmax(logits[jnp.arange(n - 1), jnp.asarray(last)], axis=-1)
  return -np.asarray(logp[jnp.arange(n - 1), jnp.asarray(ids[1:])], np.float64)
