"""Table 6 in miniature: a summarization fine-tune with PI, then generation + ROUGE (PI §3.4).

The paper fine-tunes LLaMA 7B extended to 16K on GovReport's training split (report -> summary)
and scores greedy summaries of its test reports with ROUGE-1/2/L. The miniature keeps every step
of that pipeline on the miniature's base (assets/mini_base, trained at 256 tokens) and text this
repository ships:

- pairs: each Psalm file of the PG-19 stand-in (data/pg19_standin) is a commentary whose author
  opens with an OVERVIEW of the psalm, followed by a verse-by-verse EXPOSITION. The report is the
  exposition (thousands of tokens), the summary is the overview's opening sentences (at most
  SUMMARY_WORDS words, cut at a sentence end when one fits). Train: Psalms 1-139 (1-99 were
  pre-training text, as plain text, never as this task); test: Psalms 140-150, held out of
  everything. Psalms whose file lacks the three headings are left out (listed in the report).
- stores: `python -m pi_jax.data prepare --format summaries` at each training window (the report
  cut at its end so that the whole summary fits; the loss is on the summary and EOS only).
- arms (same pairs, steps, batch and learning rate): PI to 4x (1024 tokens, linear:4) and the
  original 256-token window without interpolation, both from the base; the base itself zero
  shot at 256 and with linear:4 at 1024; and a lead baseline (the report's first words, as many
  as the train summaries' mean), the usual floor of summarization tables.
- evaluation: `eval.py summarize` on the test pairs, greedy, ROUGE with rouge-score.

The commands a user runs on the real GovReport files are in docs/evaluation.md ("Table 6").
`python demo.py table6` runs this, resumably, into runs/table6 (report.md, results.json, a plot).
"""

from __future__ import annotations

import datetime
import json
import os
import re

from miniature.runner import REPO, Runner, commands_table

BASE = "assets/mini_base"
FACTOR = 4
SUMMARY_WORDS = 40
MAX_NEW_TOKENS = 96
TRAIN_PSALMS = range(1, 140)
TEST_PSALMS = range(140, 151)
CONFIG = "configs/mini_extend.py"


def parse_psalm(path: str) -> tuple[str, str] | None:
  """(exposition, overview) of one Psalm file, or None when a heading is missing."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  find = lambda test: next((i for i, line in enumerate(lines) if test(line.strip())), None)
  overview = find(lambda s: s.endswith("OVERVIEW"))
  exposition = find(lambda s: s.rstrip(".") == "EXPOSITION")
  notes = find(lambda s: s.startswith("EXPLANATORY NOTES"))
  if None in (overview, exposition, notes) or not overview < exposition < notes:
    return None
  text = " ".join(line.strip() for line in lines[overview + 1:exposition] if line.strip())
  report = "\n".join(lines[exposition + 1:notes]).strip()
  return (report, text) if report and text else None


def opening(text: str, words: int) -> str:
  """The first sentences of `text` within `words` words (the first `words` words if even the
  first sentence is longer)."""
  out = ""
  for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
    longer = f"{out} {sentence}".strip()
    if len(longer.split()) > words:
      break
    out = longer
  return out or " ".join(text.split()[:words])


def build_pairs(data_dir: str, out_dir: str) -> dict:
  """Writes OUT_DIR/train.jsonl and test.jsonl (module docstring); returns what went where."""
  os.makedirs(out_dir, exist_ok=True)
  record = {"source": os.path.relpath(data_dir, REPO) if os.path.isabs(data_dir) else data_dir,
            "summary_words": SUMMARY_WORDS, "left_out": []}
  for split, psalms in (("train", TRAIN_PSALMS), ("test", TEST_PSALMS)):
    rows = []
    for n in psalms:
      path = os.path.join(data_dir, f"Psa_{n:03d}.txt")
      pair = parse_psalm(path) if os.path.isfile(path) else None
      if pair is None:
        record["left_out"].append(os.path.basename(path))
        continue
      report, overview = pair
      rows.append({"id": f"Psa_{n:03d}", "report": report,
                   "summary": opening(overview, SUMMARY_WORDS)})
    tmp = os.path.join(out_dir, f"{split}.jsonl.partial")
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, os.path.join(out_dir, f"{split}.jsonl"))
    record[split] = {"pairs": len(rows), "file": os.path.join(out_dir, f"{split}.jsonl"),
                     "first": rows[0]["id"], "last": rows[-1]["id"]}
  return record


def lead_baseline(test_file: str, train_file: str) -> dict:
  """ROUGE of the report's first W words as the summary, W = the train summaries' mean."""
  from pi_jax.data import summaries
  from pi_jax.evals import summarization
  train = summaries.load_documents(train_file)
  words = round(sum(len(d["summary"].split()) for d in train) / len(train))
  test = summaries.load_documents(test_file)
  means, _ = summarization.rouge_scores([" ".join(d["report"].split()[:words]) for d in test],
                                        [d["summary"] for d in test])
  return {"words": words, "rouge": means, "documents": len(test)}


def run(out: str, steps: int, batch: int, argv: list[str]) -> int:
  """The whole pipeline into `out` (outputs that exist are kept: a rerun resumes)."""
  os.chdir(REPO)
  os.makedirs(out, exist_ok=True)
  started = datetime.datetime.now(datetime.timezone.utc)
  runner = Runner(out)
  pairs = build_pairs("data/pg19_standin", os.path.join(out, "data"))
  train_file, test_file = pairs["train"]["file"], pairs["test"]["file"]
  L = 256
  arms = {"pi": {"window": L * FACTOR, "scaling": [f"rope_scaling=linear:{FACTOR}"],
                 "what": f"summarization fine-tune with PI to {L * FACTOR} (linear:{FACTOR})"},
          "short": {"window": L, "scaling": [],
                    "what": f"summarization fine-tune at the original {L} (no interpolation)"}}
  evals = {}
  for name, arm in arms.items():
    W = arm["window"]
    store = os.path.join(out, "stores", f"train{W}")
    if os.path.isfile(os.path.join(store, "store.json")):
      runner.skipped(f"prepare{W}", f"token store of the train pairs at {W}", store)
    else:
      runner(f"prepare{W}", ["-m", "pi_jax.data", "prepare", train_file, store, "--format",
                             "summaries", "--tokenizer", BASE, "--max-length", str(W),
                             "--restart", "--no-progress"],
             f"token store of the train pairs at {W}")
    workdir = os.path.join(out, "runs", name)
    final = os.path.join(workdir, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
      runner.skipped(f"train_{name}", arm["what"], final)
    else:
      sets = [f"workdir={workdir}", f"init_checkpoint={BASE}", f"data={store}",
              "packing=documents", f"seq_len={W}", f"global_batch={batch}", f"steps={steps}",
              f"loss_chunk={W}"] + arm["scaling"]
      runner(f"train_{name}", ["train.py", "--config", CONFIG, "--no-progress"]
             + [x for s in sets for x in ("--set", s)], arm["what"])
    evals[name] = (final, W, [], arm["what"])
  evals["base"] = (BASE, L, [], f"base, zero shot at {L}")
  evals["base_pi"] = (BASE, L * FACTOR, ["--rope-scaling", f"linear:{FACTOR}"],
                      f"base + linear:{FACTOR}, zero shot at {L * FACTOR}")
  results = {}
  for name, (ckpt, W, extra, what) in evals.items():
    path = os.path.join(out, "evals", f"{name}.summarize.json")
    if os.path.isfile(path):
      runner.skipped(f"eval_{name}", f"ROUGE: {what}", path)
    else:
      runner(f"eval_{name}", ["eval.py", "summarize", "--ckpt", ckpt, "--data", test_file,
                              "--max-length", str(W), "--max-new-tokens", str(MAX_NEW_TOKENS),
                              "--no-progress", "--json", path] + extra, f"ROUGE: {what}")
    with open(path) as f:
      record = json.load(f)["runs"][0]
    results[name] = {"what": what, "window": W, "rouge": record["rouge"],
                     "truncated": record["truncated"], "documents": record["documents"],
                     "example": record["per_document"][0]["prediction"],
                     "rougeL_by_document": [d["rougeL"] for d in record["per_document"]]}
  lead = lead_baseline(test_file, train_file)
  summary = {"plan": {"base": BASE, "factor": FACTOR, "steps": steps, "global_batch": batch,
                      "config": CONFIG, "max_new_tokens": MAX_NEW_TOKENS},
             "pairs": pairs, "arms": results, "lead": lead,
             "command": "python demo.py table6 " + " ".join(argv),
             "written": started.isoformat(timespec="seconds"), "commands": runner.records}
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(summary, f, indent=1)
  _plot(summary, os.path.join(out, "table6_rouge.png"))
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(_report(summary))
  print(f"[demo] wrote {os.path.join(out, 'report.md')}")
  return 0


ORDER = ("base", "base_pi", "short", "pi")


def _plot(summary: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [n for n in ORDER if n in summary["arms"]]
  labels = [summary["arms"][n]["what"].replace(" (no interpolation)", "").replace(
      "summarization fine-tune", "fine-tune") for n in names] + ["lead baseline"]
  fig, ax = plt.subplots(figsize=(8, 3.6))
  width = 0.27
  for j, key in enumerate(("rouge1", "rouge2", "rougeL")):
    values = [summary["arms"][n]["rouge"][key] for n in names] + [summary["lead"]["rouge"][key]]
    ax.bar([i + (j - 1) * width for i in range(len(values))], values, width,
           label={"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}[key])
  ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=12)
  ax.set_ylabel("F1 x 100")
  ax.set_title("Table 6 in miniature: held-out Psalms 140-150, greedy summaries", fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _report(summary: dict) -> str:
  plan, pairs = summary["plan"], summary["pairs"]
  lines = [
      "# Table 6 in miniature: summarization after a PI fine-tune", "",
      f"Written by `{summary['command'].strip()}` (started {summary['written']}). Every number "
      "below comes from the commands listed at the end; the pipeline and its choices are in "
      "`miniature/table6.py`.", "",
      f"Pairs from `{pairs['source']}`: report = a Psalm's EXPOSITION, summary = the opening "
      f"sentences of its OVERVIEW (at most {pairs['summary_words']} words). Train: "
      f"{pairs['train']['pairs']} pairs ({pairs['train']['first']}..{pairs['train']['last']}); "
      f"test: {pairs['test']['pairs']} pairs ({pairs['test']['first']}.."
      f"{pairs['test']['last']}), held out of pre-training and fine-tuning. Left out (a heading "
      f"missing): {', '.join(pairs['left_out']) or 'none'}.", "",
      f"Fine-tunes: `{plan['config']}` from `{plan['base']}`, {plan['steps']} steps of "
      f"{plan['global_batch']} packed rows, loss on the summary tokens only. Evaluation: "
      f"`eval.py summarize`, greedy, at most {plan['max_new_tokens']} new tokens, the report cut "
      "at its end to fit the window; ROUGE-1/2/L F1 x 100 (rouge-score, stemmed), mean over "
      "the test pairs.", "",
      "| model | window | ROUGE-1 | ROUGE-2 | ROUGE-L | reports cut |",
      "|---|---|---|---|---|---|"]
  for name in ORDER:
    arm = summary["arms"].get(name)
    if arm:
      r = arm["rouge"]
      lines.append(f"| {arm['what']} | {arm['window']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} "
                   f"| {r['rougeL']:.2f} | {arm['truncated']}/{arm['documents']} |")
  lead = summary["lead"]
  r = lead["rouge"]
  lines += [f"| lead baseline: the report's first {lead['words']} words | – | {r['rouge1']:.2f} "
            f"| {r['rouge2']:.2f} | {r['rougeL']:.2f} | – |", "",
            "![ROUGE by model](table6_rouge.png)", ""]
  arms = summary["arms"]
  if "pi" in arms and "short" in arms:
    pi, short = arms["pi"]["rougeL_by_document"], arms["short"]["rougeL_by_document"]
    wins = sum(a > b for a, b in zip(pi, short))
    ties = sum(a == b for a, b in zip(pi, short))
    lines += [f"PI fine-tune at {arms['pi']['window']} against the same fine-tune at "
              f"{arms['short']['window']}: ROUGE-L higher on {wins}, equal on {ties}, lower on "
              f"{len(pi) - wins - ties} of {len(pi)} test reports (one fine-tune per arm, one seed: "
              "no claim of significance is made).", ""]
  lines += ["First test pair (" + pairs["test"]["first"] + "), the generated summaries:", ""]
  for name in ORDER:
    arm = summary["arms"].get(name)
    if arm:
      text = arm["example"].replace("\n", " ").strip() or "(empty: EOS first)"
      lines.append(f"- {arm['what']}: {text[:400]}")
  lines += ["", "## Commands", ""] + commands_table(summary["commands"])
  return "\n".join(lines) + "\n"
