"""Long-document summarization with ROUGE (PI §3.4, Table 6: GovReport at 16K).

Data and prompt: pi_jax.data.summaries (the summarization fine-tune builds its prompts with the
same function). When the prompt would not leave room for `max_new_tokens` in `max_length`, the
report's END is cut and the document is counted in `truncated`. The summary is the
greedy (or sampled) continuation from pi_jax.generate, cut at EOS, scored against the reference
with Google's rouge-score package: ROUGE-1/2/L F1 (stemmed), averaged over documents, × 100.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from pi_jax import sharding as sharding_lib
from pi_jax.config import ModelConfig
from pi_jax.data.summaries import DEFAULT_TEMPLATE, build_prompt
from pi_jax.evals import runtime
from pi_jax.generate import generate

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: list[str], references: list[str]) -> dict:
  """Mean ROUGE-1/2/L F1 × 100 and the per-document F1s (rouge-score, Porter stemmer)."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  per_doc = [{k: v.fmeasure * 100 for k, v in scorer.score(ref, pred).items()}
             for pred, ref in zip(predictions, references)]
  return {k: float(np.mean([d[k] for d in per_doc])) for k in ROUGE_TYPES}, per_doc


def summarize(config: ModelConfig, params, tok, docs: list[dict], *, max_length: int,
              max_new_tokens: int, template: str = DEFAULT_TEMPLATE, temperature: float = 0.0,
              top_p: float | None = None, seed: int = 0, mesh=None,
              progress: Callable[[int], object] | None = None, run=None) -> dict:
  """Generates a summary per document and scores it; returns the run's record. run: the
  pi_jax.run.RunOptions to compute with."""
  if max_new_tokens < 1 or max_new_tokens >= max_length:
    raise ValueError(f"--max-new-tokens {max_new_tokens} must be in [1, max length "
                     f"{max_length})")
  prompts = [build_prompt(tok, d["report"], template, max_length - max_new_tokens) for d in docs]
  shards = sharding_lib.batch_shards(mesh)
  key = jax.random.key(seed)
  predictions, rows = [], []
  bar = progress(len(docs)) if progress else None
  with runtime.mesh_context(mesh):
    for i, (ids, cut) in enumerate(prompts):
      prompt = np.asarray([ids] * shards, np.int32)  # one document, every data shard a copy
      out = np.asarray(generate(config, params, runtime.put_batch(prompt, mesh), max_new_tokens,
                                temperature=temperature, top_p=top_p,
                                key=jax.random.fold_in(key, i), eos_id=tok.eos_id,
                                run=run))[0].tolist()
      if tok.eos_id is not None and tok.eos_id in out:
        out = out[:out.index(tok.eos_id)]
      predictions.append(tok.decode(out).strip())
      rows.append({"prompt_tokens": len(ids), "truncated": cut, "generated_tokens": len(out)})
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  means, per_doc = rouge_scores(predictions, [d["summary"] for d in docs])
  for row, pred, scores in zip(rows, predictions, per_doc):
    row.update(prediction=pred, **{k: round(v, 4) for k, v in scores.items()})
  return {"rouge": means, "documents": len(docs), "truncated": sum(r["truncated"] for r in rows),
          "per_document": rows}
