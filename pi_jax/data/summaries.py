"""Report -> summary pairs (PI §3.4, Table 6: GovReport): reading them, the prompt, and the
summarization fine-tune's token store.

Data: JSON Lines, one {"report": ..., "summary": ...} object per line (GovReport's fields). A
report becomes `template.format(report=...)` (default DEFAULT_TEMPLATE); when the prompt would
not fit its token budget, the report's END is cut (its opening is kept, and the instruction after
it survives). Training (`prepare_summaries`) and evaluation (pi_jax.evals.summarization) build
the prompt with the same function, so the fine-tuned model sees at evaluation exactly the token
sequence it was trained to continue: the summary (after a space) and EOS.

The fine-tune's store is an SFT store (pi_jax.data.sft): one example per pair, the loss on the
summary's tokens and EOS only. Each example fits `max_length` tokens (the training window): the
report is cut to leave room for the whole summary; a pair whose summary alone (with the template)
does not fit is skipped and counted, never trained with a cut summary.
"""

from __future__ import annotations

import json
import os

import numpy as np

from pi_jax.data import sft

DEFAULT_TEMPLATE = "{report}\n\nSummary:"


def load_documents(path: str, limit: int | None = None) -> list[dict]:
  """[{"report", "summary"}] from a JSONL file; a bad line raises naming the file and line."""
  if not os.path.isfile(path):
    raise ValueError(f"--data {path}: no such file (expected JSON Lines with report/summary)")
  docs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {n}: not JSON ({e})") from None
      if not (isinstance(doc, dict) and isinstance(doc.get("report"), str)
              and isinstance(doc.get("summary"), str)):
        raise ValueError(f"{path} line {n}: expected an object with string fields "
                         "'report' and 'summary'")
      docs.append(doc)
      if limit and len(docs) >= limit:
        break
  if not docs:
    raise ValueError(f"{path}: no documents")
  return docs


def split_template(template: str) -> tuple[str, str]:
  """(text before, text after) the template's {report} field; an error naming it if it has none."""
  if "{report}" not in template:
    raise ValueError(f"prompt template {template!r} has no {{report}} field")
  head, tail = template.split("{report}", 1)
  return head, tail


def template_ids(tok, template: str) -> tuple[list[int], list[int]]:
  """The ids of the template's text before (with BOS, if any) and after the report."""
  head, tail = split_template(template)
  return tok.encode(head) if head else tok.encode(""), tok.encode(tail, add_bos=False)


def build_prompt(tok, report: str, template: str, max_prompt: int) -> tuple[list[int], bool]:
  """(prompt ids of at most max_prompt tokens, whether the report was cut)."""
  prefix, tail_ids = template_ids(tok, template)
  ids = tok.encode(template.replace("{report}", report, 1))
  if len(ids) <= max_prompt:
    return ids, False
  room = max_prompt - len(prefix) - len(tail_ids)
  if room < 1:
    raise ValueError(f"the prompt template alone needs {len(prefix) + len(tail_ids)} tokens; "
                     f"max_length leaves {max_prompt} for the prompt")
  body = tok.encode(report, add_bos=False)[:room]
  return prefix + body + tail_ids, True


def summary_ids(tok, summary: str) -> list[int]:
  """The tokens a fine-tuned model generates after the prompt: ' ' + summary, then EOS."""
  if tok.eos_id is None:
    raise ValueError("the tokenizer has no EOS token: a summary would have no end to learn")
  return tok.encode(" " + summary.strip(), add_bos=False) + [tok.eos_id]


def encode_pair(tok, doc: dict, template: str, max_length: int):
  """(int32 ids, uint8 completion flags, whether the report was cut) of one pair in at most
  max_length tokens, or None when the summary leaves no room for one report token."""
  target = summary_ids(tok, doc["summary"])
  if max_length - len(target) - sum(map(len, template_ids(tok, template))) < 1:
    return None
  prompt, cut = build_prompt(tok, doc["report"], template, max_length - len(target))
  ids = np.asarray(prompt + target, np.int32)
  flags = np.zeros(len(ids), np.uint8)
  flags[len(prompt):] = 1
  return ids, flags, cut


def prepare_summaries(path: str, out: str, checkpoint: str, *, max_length: int,
                      template: str = DEFAULT_TEMPLATE, max_examples: int | None = None,
                      restart: bool = False, progress_bar: bool = True, log=print) -> dict:
  """The summarization fine-tune's SFT store at `out` from the pairs in `path` (module
  docstring), tokenized with `checkpoint`'s tokenizer; its summary counts the reports cut and
  the pairs skipped."""
  from pi_jax.tokenizer import load_tokenizer
  if max_length < 2:
    raise ValueError(f"--max-length {max_length} must be at least 2 tokens")
  split_template(template)  # before any work
  docs = load_documents(path, max_examples)
  tok = load_tokenizer(checkpoint)
  counts = {"cut": 0, "skipped": 0}

  def examples():
    for doc in docs:
      encoded = encode_pair(tok, doc, template, max_length)
      if encoded is None:
        counts["skipped"] += 1
        continue
      ids, flags, cut = encoded
      counts["cut"] += cut
      yield ids, flags, json.dumps(doc, sort_keys=True)

  try:
    summary = sft.write_store(
        out, examples(), tok, checkpoint, restart=restart, progress_bar=progress_bar, log=log,
        source={"spec": path, "format": "summaries", "template": template,
                "max_length": max_length},
        meta_extra={"summaries": counts})
  except sft.SFTError:
    if counts["skipped"] == len(docs):
      raise sft.SFTError(f"{path}: every summary alone is longer than --max-length "
                         f"{max_length} tokens: nothing to train on") from None
    raise
  if counts["cut"] or counts["skipped"]:
    log(f"{path}: {counts['cut']} report(s) cut at the end to fit {max_length} tokens; "
        f"{counts['skipped']} pair(s) skipped (the summary alone does not fit)")
  return {**summary, "reports_cut": counts["cut"], "pairs_skipped": counts["skipped"]}
