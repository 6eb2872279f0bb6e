"""The summarization fine-tune's data (Table 6): `prepare --format summaries` stores report ->
summary pairs prompted exactly as `eval.py summarize` prompts them, with the loss on the summary
and EOS only; reports are cut at their end to fit, summaries never; the miniature's pairs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pi_jax.data import packing, summaries
from pi_jax.tokenizer import load_tokenizer
from pi_jax.train import pipeline
from pi_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "assets", "mini_base")
PAIRS = [
    {"report": "The agency spent more than planned. " * 40, "summary": "Costs rose."},
    {"report": "A short report on bridges.", "summary": "Bridges were inspected; most passed."},
    {"report": "Water levels fell. " * 2, "summary": "Less water in the north."},
]


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _prepare(*args):
  return subprocess.run([sys.executable, "-m", "pi_jax.data", "prepare", *args,
                         "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_store_rows_are_eval_prompts_then_summary_and_eos(tmp_path):
  """Each packed row holds the prompt that eval.py summarize builds (summaries.build_prompt at
  the budget the summary leaves) and then ' ' + summary + EOS, and only those are targets."""
  tok = load_tokenizer(BASE)
  path = _write(tmp_path / "train.jsonl", PAIRS)
  out = tmp_path / "store"
  proc = _prepare(path, str(out), "--format", "summaries", "--tokenizer", BASE,
                  "--max-length", "64", "--json")
  assert proc.returncode == 0, proc.stderr
  record = json.loads(proc.stdout.strip().splitlines()[-1])
  assert record["examples"] == 3 and record["reports_cut"] == 1 and record["pairs_skipped"] == 0
  config = TrainConfig(data=str(out), init_checkpoint=BASE, seq_len=64, global_batch=1,
                       packing="documents")
  data = pipeline.load_train_data(config, tok, tok.vocab_size)
  rows = data.packed.rows(range(data.packed.num_train))
  mask = packing.target_mask(rows)
  seen = []
  for row, targets in zip(rows, mask):
    for seg in sorted(set(row[packing.SEGMENTS].tolist()) - {0}):
      where = np.flatnonzero(row[packing.SEGMENTS] == seg)
      # target j is token j + 1, predicted from token j
      seen.append((row[packing.TOKENS, where].tolist(),
                   [int(row[packing.TOKENS, p]) for p in where[1:] if targets[p - 1]]))
  assert len(seen) == 3
  for (ids, scored), pair in zip(seen, PAIRS):
    target = tok.encode(" " + pair["summary"], add_bos=False) + [tok.eos_id]
    prompt, cut = summaries.build_prompt(tok, pair["report"], summaries.DEFAULT_TEMPLATE,
                                         64 - len(target))
    assert ids == prompt + target and len(ids) <= 64
    assert scored == target  # the summary and EOS, nothing of the prompt
    assert cut == (pair is PAIRS[0])
    assert tok.decode(prompt).endswith("\n\nSummary:")  # the instruction survives the cut


def test_a_summary_that_does_not_fit_is_skipped_and_counted(tmp_path):
  long_summary = {"report": "r", "summary": "word " * 80}
  path = _write(tmp_path / "train.jsonl", [long_summary] + PAIRS[1:])
  summary = summaries.prepare_summaries(path, str(tmp_path / "s"), BASE, max_length=48,
                                        progress_bar=False, log=lambda m: None)
  assert summary["pairs_skipped"] == 1 and summary["examples"] == 2
  path = _write(tmp_path / "only.jsonl", [long_summary])
  with pytest.raises(ValueError, match="only.jsonl: every summary alone is longer than "
                     "--max-length 48"):
    summaries.prepare_summaries(path, str(tmp_path / "t"), BASE, max_length=48,
                                progress_bar=False, log=lambda m: None)
  assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "t.partial")


@pytest.mark.parametrize("args,message", [
    (["--format", "summaries"], "--format summaries needs --max-length"),
    (["--format", "sft", "--max-length", "64"], "--max-length applies to --format summaries"),
    (["--format", "summaries", "--max-length", "64", "--prompt-template", "Summary:"],
     "has no {report} field"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
  path = _write(tmp_path / "train.jsonl", PAIRS)
  proc = _prepare(path, str(tmp_path / "out"), "--tokenizer", BASE, *args)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out")


def test_a_bad_line_is_named(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(PAIRS[0]) + "\n{\"report\": \"x\"}\n")
  with pytest.raises(ValueError, match=r"train.jsonl line 2: expected an object with string "
                     "fields 'report' and 'summary'"):
    summaries.prepare_summaries(str(path), str(tmp_path / "s"), BASE, max_length=64,
                                progress_bar=False, log=lambda m: None)


def test_the_miniature_pairs_come_from_the_psalms_headings(tmp_path):
  from miniature import table6
  record = table6.build_pairs(os.path.join(REPO, "data", "pg19_standin"), str(tmp_path))
  assert record["train"]["pairs"] == 137 and record["test"]["pairs"] == 11
  assert record["left_out"] == ["Psa_070.txt", "Psa_119.txt"]  # a heading missing
  test = summaries.load_documents(record["test"]["file"])
  assert [d["id"] for d in test] == [f"Psa_{n}" for n in range(140, 151)]
  with open(os.path.join(REPO, "data", "pg19_standin", "Psa_140.txt")) as f:
    text = f.read()
  overview = text.split("OVERVIEW", 1)[1]
  assert test[0]["summary"] in " ".join(overview.split())  # the overview's opening
  assert len(test[0]["summary"].split()) <= table6.SUMMARY_WORDS
  assert test[0]["report"].startswith("Verse 1.") and "EXPLANATORY NOTES" not in test[0]["report"]
