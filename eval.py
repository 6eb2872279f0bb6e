"""Evaluate a pi_jax checkpoint: sliding-window perplexity and passkey retrieval (PI §3.2, §3.3).

  python eval.py perplexity --ckpt CKPT --data pg19_standin --windows 2048,4096,8192 --stride 256 \\
      --rope-scaling none,linear:2 --json out.json --plot out.png
  python eval.py passkey --ckpt CKPT --lengths 4096,8192 --trials 10 --depths 32 \\
      --rope-scaling linear:2 --json out.json --plot out.png
  python eval.py needle --ckpt CKPT --haystack pg19_standin --tasks single,multikey \\
      --lengths 2048,4096 --depths 5 --trials 4 --json out.json --plot out.png
  python eval.py harness --ckpt BASE --ckpt EXTENDED --tasks boolq,piqa --json out.json \\
      --plot out.png                      (lm-evaluation-harness tasks; pip install pi_jax[harness])
  python eval.py summarize --ckpt CKPT --data govreport.jsonl --max-length 16384 --json out.json

Each writes a Markdown table to stdout, progress to stderr, and optionally JSON and a PNG.
The definitions are in pi_jax/evals/perplexity.py, passkey.py and needle.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time


def _int_list(text: str, what: str) -> list[int]:
  out = []
  for part in text.split(","):
    part = part.strip().lower()
    mult = 1024 if part.endswith("k") else 1
    try:
      value = int(part[:-1] if mult > 1 else part) * mult
    except ValueError:
      raise ValueError(f"{what}: {part!r} in {text!r} is not an integer (e.g. 2048,4096 or 4k)")
    if value < 1:
      raise ValueError(f"{what}: {value} must be positive")
    out.append(value)
  if not out:
    raise ValueError(f"{what}: empty list")
  return out


def _scalings(values: list[str] | None) -> list[str | None]:
  """--rope-scaling may repeat and each may be a comma list; JSON objects are kept whole."""
  if not values:
    return [None]  # the checkpoint's own scaling
  out = []
  for v in values:
    out.extend([v] if v.strip().startswith("{") else [p.strip() for p in v.split(",") if p.strip()])
  return out


def _common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--ckpt", default=None, help="pi_jax checkpoint directory (required)")
  p.add_argument("--rope-scaling", action="append", metavar="KIND:FACTOR",
                 help="replace the checkpoint's RoPE scaling (none, linear:2, ntk:2, yarn:2, "
                      "dynamic:2, or JSON); repeat or comma-separate to compare several; "
                      "default: the checkpoint's own")
  p.add_argument("--batch-size", type=int, default=None,
                 help="sequences per step (default: the number of data shards of the mesh)")
  p.add_argument("--mesh", default=None, help="e.g. data:2,fsdp:2,tensor:2 (default: one device)")
  from pi_jax import run as run_lib
  run_lib.add_arguments(p)  # --set run.FIELD=VALUE, --dtype, --attention-impl
  p.add_argument("--json", dest="json_out", default=None, help="write the results here")
  p.add_argument("--plot", default=None, help="write a PNG plot here")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _harness_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--ckpt", action="append", required=True,
                 help="pi_jax checkpoint directory; repeat to compare models side by side "
                      "(e.g. the base and the extended model)")
  p.add_argument("--rope-scaling", action="append", metavar="KIND:FACTOR",
                 help="replace each checkpoint's RoPE scaling (none, linear:4, ...); repeat or "
                      "comma-separate for several columns; default: each checkpoint's own")
  p.add_argument("--max-length", type=int, default=None,
                 help="tokens the model sees (default: the model's window); longer requests are "
                      "left-truncated as lm-eval does and counted")
  p.add_argument("--batch-size", type=int, default=1, help="requests per step")
  p.add_argument("--mesh", default=None, help="e.g. data:8 (default: one device)")
  from pi_jax import run as run_lib
  run_lib.add_arguments(p)  # --set run.FIELD=VALUE, --dtype, --attention-impl
  p.add_argument("--seed", type=int, default=0, help="sampling and few-shot seed")
  p.add_argument("--json", dest="json_out", default=None, help="write the results here")
  p.add_argument("--plot", default=None, help="write a PNG plot here")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The docstring as written, and every option's default in --help."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                   formatter_class=HelpFormatter)
  sub = parser.add_subparsers(dest="task", required=True)
  p = sub.add_parser("perplexity", help="sliding-window perplexity (Press et al. 2022)",
                     formatter_class=HelpFormatter)
  _common(p)
  p.add_argument("--data", default=None,
                 help="(required) directory / glob of text files, JSONL with 'text', tfds:NAME[:SPLIT], or "
                      "a bundled name (pg19_standin, proofpile_standin)")
  p.add_argument("--data-dir", default=None, help="tfds data_dir")
  p.add_argument("--windows", default="2048,4096,8192", help="comma-separated window sizes")
  p.add_argument("--stride", type=int, default=256,
                 help="tokens the window slides by; each is scored once, with up to W - stride "
                      "tokens of context before it")
  p.add_argument("--max-tokens", type=int, default=None,
                 help="cut each document to its first N tokens (BOS included)")
  p.add_argument("--max-docs", type=int, default=None,
                 help="only the first N documents of --data (default: all)")
  p.add_argument("--skip-short", action="store_true",
                 help="drop documents shorter than the largest window + 1 (default: score whole)")
  p.add_argument("--per-window-mean", action="store_true",
                 help="YaRN's variant: exp(mean over windows of each window's mean NLL)")
  p.add_argument("--chunk", type=int, default=1024, help="loss chunk (positions per logits block)")
  p.add_argument("--compile-only", action="store_true",
                 help="compile the window scorer for --topology and report its memory per chip; "
                      "reads only the checkpoint's config.json (or --model), no data")
  p.add_argument("--topology", default=None, help="TPU slice for --compile-only (v5e-16, v5p-64)")
  p.add_argument("--model", default=None,
                 help="with --compile-only and no --ckpt: a preset name (llama-7b)")

  p = sub.add_parser("passkey", help="passkey retrieval and k_max (PI §3.3)",
                     description="Forward passes = lengths × depths × trials prompts (each a "
                                 "prefill of up to L tokens plus a few decode steps); the "
                                 "defaults at 4K-8K take hours on a CPU: start small "
                                 "(--lengths 1024 --depths 4 --trials 2).",
                     formatter_class=HelpFormatter)
  _common(p)
  p.add_argument("--lengths", default="4096,8192", help="comma-separated prompt lengths (tokens)")
  p.add_argument("--trials", type=int, default=10, help="random keys per (length, k)")
  p.add_argument("--depths", type=int, default=32,
                 help="how many key distances k per length, evenly spaced over [0, L); k is "
                      "counted in tokens back from the END of the prompt (k=0: key just before "
                      "the question), not the depth %% from the start of needle-in-a-haystack "
                      "tools")
  p.add_argument("--mode", default="generate", choices=("generate", "score"),
                 help="generate: greedy-decode the answer and compare it (the paper's test); "
                      "score: teacher-force the key's tokens and take the argmax (faster)")
  p.add_argument("--template", default="paper", choices=("paper", "mini"),
                 help="prompt text: the paper's, or the miniature's (no task line, key once)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random keys and filler")

  p = sub.add_parser("needle", help="RULER's needle families on your haystack text",
                     description="Needle-in-a-haystack retrieval beyond passkey (RULER, Hsieh et "
                                 "al. 2024): single, multikey, multivalue, multiquery and "
                                 "vartrack needles hidden in any text, by length and depth, "
                                 "scored by greedy decoding (every answer must appear). Prompts = "
                                 "tasks × lengths × depths × trials; start small on a CPU "
                                 "(--lengths 1024 --depths 3 --trials 2). Definitions: "
                                 "pi_jax/evals/needle.py.",
                     formatter_class=HelpFormatter)
  _common(p)
  p.add_argument("--haystack", default=None,
                 help="(required) the text the needles hide in: a file, directory or glob of "
                      ".txt/.tex/.md files, JSONL with 'text', or a bundled name (pg19_standin, "
                      "proofpile_standin); split into sentences here, no download")
  p.add_argument("--tasks", default="single,multikey,multivalue,multiquery,vartrack",
                 help="comma list of needle families")
  p.add_argument("--lengths", default="2048,4096",
                 help="comma-separated lengths L (tokens): prompt + answer budget = L")
  p.add_argument("--depths", type=int, default=5,
                 help="how many needle depths per length, evenly spaced over 0-100%% of the "
                      "haystack (0%%: its start, 100%%: just before the question)")
  p.add_argument("--trials", type=int, default=4, help="prompts per (task, length, depth)")
  p.add_argument("--threshold", type=float, default=0.85,
                 help="a (task, length, depth) cell passes at this accuracy (RULER's bar)")
  p.add_argument("--distractors", type=int, default=3, help="multikey: needles with other keys")
  p.add_argument("--values", type=int, default=4, help="multivalue: values of the one key")
  p.add_argument("--queries", type=int, default=4, help="multiquery: keys asked at once")
  p.add_argument("--hops", type=int, default=4,
                 help="vartrack: assignments after the first in each chain")
  p.add_argument("--chains", type=int, default=2,
                 help="vartrack: variable chains (one asked, the rest distractors)")
  p.add_argument("--allow-beyond-window", action="store_true",
                 help="run lengths beyond the model's window (zero-shot extrapolation) instead "
                      "of refusing them")
  p.add_argument("--seed", type=int, default=0, help="seed of keys, values and haystack starts")
  p = sub.add_parser("harness", help="lm-evaluation-harness tasks (PI Table 5), several models "
                     "side by side", formatter_class=HelpFormatter,
                     description="Runs lm-eval (pip install pi_jax[harness]) on pi_jax checkpoints "
                                 "through pi_jax.evals.harness.PiJaxLM; one column per "
                                 "(checkpoint, RoPE scaling).")
  _harness_common(p)
  p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
  p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: "
                 "each task's own)")
  p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
  p.add_argument("--include-path", default=None,
                 help="folder of extra task YAML files; a `dataset_path: json` task's data files "
                      "are found next to its YAML")
  p.add_argument("--rolling-stride", type=int, default=None,
                 help="perplexity tasks: the paper's sliding window with this stride instead of "
                      "lm-eval's disjoint windows")
  p.add_argument("--max-gen-toks", type=int, default=256,
                 help="generation tasks: tokens to generate when the task does not say")

  p = sub.add_parser("summarize", help="long-document summarization + ROUGE (PI Table 6)",
                     formatter_class=HelpFormatter)
  _harness_common(p)
  p.add_argument("--data", required=True,
                 help="JSON Lines with string fields 'report' and 'summary' (GovReport's)")
  p.add_argument("--limit", type=int, default=None, help="at most N documents")
  p.add_argument("--max-new-tokens", type=int, default=512, help="summary length cap (tokens)")
  p.add_argument("--template", default=None,
                 help="prompt with a {report} field (default: '{report}\\n\\nSummary:'); use "
                      "the summarization fine-tune's own")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")

  p = sub.add_parser("report", help="merge JSON files of one task into one table and plot",
                     formatter_class=HelpFormatter)
  p.add_argument("inputs", nargs="+", help="JSON files written by --json")
  p.add_argument("--json", dest="json_out", default=None,
                 help="write the merged results here (JSON)")
  p.add_argument("--plot", default=None, help="write the merged plot here (PNG, or .pdf/.svg)")
  return parser


def _progress(args):
  from tqdm import tqdm

  def make(desc, total):
    return _Estimating(tqdm(total=total, desc=desc, file=sys.stderr, unit="seq",
                            disable=args.no_progress, dynamic_ncols=True, leave=False), total, desc)
  return make


class _Estimating:
  """A progress bar that prints, after the first batch, an estimate of the whole run."""

  def __init__(self, bar, total, desc):
    self.bar, self.total, self.desc, self.done = bar, total, desc, 0
    self.t0 = time.perf_counter()

  def update(self, n):
    if self.done == 0 and n < self.total:
      seconds = time.perf_counter() - self.t0
      print(f"[{self.desc}] first batch ({n} of {self.total}) took {seconds:.1f}s including "
            f"compilation; estimated total about {_duration(seconds * self.total / n)}",
            file=sys.stderr, flush=True)
    self.done += n
    self.bar.update(n)

  def close(self):
    self.bar.close()


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f}s"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


def _check_outputs(args, inputs) -> None:
  """Before any work: --json/--plot writable and not over an input (checkpoint or JSON file)."""
  from pi_jax import files
  outs = [(args.json_out, "--json file"), (getattr(args, "plot", None), "--plot file")]
  for path, what in outs:
    if path:
      files.check_separate(path, inputs, what)
      files.check_writable(path, what)
  if args.json_out and getattr(args, "plot", None) and (
      os.path.realpath(args.json_out) == os.path.realpath(args.plot)):
    raise ValueError(f"--json and --plot are the same file {args.json_out}")


def _check_fits(args, lengths: list[int], what: str, kv_cache: bool) -> None:
  """Before loading anything: refuse lengths that cannot fit (pi_jax.memory.check_eval_fits)."""
  from pi_jax import checkpoint, memory
  run = args.run
  param_dtype = run.param_dtype or checkpoint.stored_param_dtype(args.ckpt)
  memory.check_eval_fits(checkpoint.load_config(args.ckpt), param_dtype, run.compute_dtype,
                         lengths, args.batch_size or 1, what, kv_cache)


def _load(args):
  """(mesh, config, params, tok, batch size)."""
  import pi_jax
  from pi_jax import sharding
  from pi_jax.evals import runtime
  mesh = sharding.make_mesh(args.mesh) if args.mesh else None
  batch = runtime.check_batch_size(
      sharding.batch_shards(mesh) if args.batch_size is None else args.batch_size, mesh)
  config, params = pi_jax.load_checkpoint(args.ckpt, mesh=mesh, param_dtype=args.run.param_dtype)
  tok = pi_jax.load_tokenizer(args.ckpt)
  return mesh, config, params, tok, batch


def _with_scaling(config, spec, ckpt):
  if spec is None:
    return config
  try:
    return config.with_rope_scaling(spec)
  except ValueError as e:
    raise ValueError(f"--rope-scaling {spec!r} does not fit checkpoint {ckpt}: {e}") from None


def _check_scalings(config, specs, ckpt):
  return [_with_scaling(config, s, ckpt) for s in specs]  # all of them, before any work


def run_perplexity(args) -> dict:
  from pi_jax import data as data_lib
  from pi_jax import files
  from pi_jax.evals import perplexity as ppl
  from pi_jax.evals import report
  windows = _int_list(args.windows, "--windows")
  for w in windows:
    if not 1 <= args.stride <= w:
      raise ValueError(f"--stride {args.stride} must be between 1 and every window ({w})")
  if args.max_tokens is not None and args.max_tokens < 2:
    raise ValueError(f"--max-tokens {args.max_tokens}: need at least 2 tokens to score one")
  _check_outputs(args, [args.ckpt])
  info = report.run_info(args.argv)
  docs = list(data_lib.iter_documents(args.data, data_dir=args.data_dir, max_docs=args.max_docs))
  # A document of N bytes has at most N + 1 tokens (BOS included) for byte-covering tokenizers:
  # a window beyond every document runs at that length (see evaluate_perplexity).
  longest = max((len(text.encode("utf-8")) + 2 for _, text in docs), default=1)
  _check_fits(args, sorted({min(w, longest) for w in windows}), "--windows", kv_cache=False)
  mesh, config, params, tok, batch = _load(args)
  configs = _check_scalings(config, _scalings(args.rope_scaling), args.ckpt)
  documents = ppl.tokenize_documents(tok, docs, args.max_tokens)
  passes = sum(-(-sum(len(ppl.plan_windows(len(t), w, args.stride)) for _, t in documents)
                 // batch) for w in windows) * len(configs)
  print(f"perplexity: {passes} forward passes ({len(documents)} documents, windows {windows}, "
        f"stride {args.stride}, batches of {batch}, {len(configs)} scaling(s)); an estimate "
        "follows the first batch", file=sys.stderr, flush=True)
  definition = "per_window_mean" if args.per_window_mean else "sliding"
  bar = _progress(args)
  runs = []
  for cfg in configs:
    label = cfg.rope_scaling.describe()
    results = ppl.evaluate_perplexity(
        cfg, params, documents, windows, args.stride, batch_size=batch, mesh=mesh,
        skip_short=args.skip_short, chunk=args.chunk, run=args.run,
        progress=lambda w, n, label=label: bar(f"{label} W={w}", n))
    records = [dict(r.record(definition, cfg.max_position_embeddings), rope_scaling=label)
               for r in results]
    runs.append({"rope_scaling": label, "model_window": cfg.max_position_embeddings,
                 "original_window": cfg.original_window, "results": records})
    for r in records:
      print(f"[{label}] window {r['window']}: perplexity {r['perplexity']:.4f} over "
            f"{r['tokens']} tokens, {r['documents']} docs, "
            f"{r['scored_tokens_per_second']} scored tok/s", file=sys.stderr, flush=True)
  return {
      "task": "perplexity",
      "definition": definition,
      "definition_text": (
          "sliding window (Press et al. 2022, PI §3.2): windows of W tokens at 0, S, 2S, ...; each "
          "scores only targets no earlier window scored; exp(total NLL / total scored tokens)"
          if definition == "sliding" else
          "YaRN's per-window mean: the same windows and scored targets; exp(mean over windows of "
          "each window's mean NLL)"),
      "bos_policy": (f"BOS (id {tok.bos_id}) prepended to each document, as context only"
                     if tok.add_bos else "no BOS (the model's tokenizer adds none)"),
      "short_documents_policy": ("skipped (shorter than the largest window + 1)" if args.skip_short
                                 else "scored whole as one window"),
      "settings": {"ckpt": files.portable(args.ckpt), "data": args.data, "data_dir": args.data_dir,
                   "windows": windows, "stride": args.stride, "max_tokens": args.max_tokens,
                   "max_docs": args.max_docs, "batch_size": batch, "mesh": args.mesh,
                   "run": args.run.to_dict(), "chunk": args.chunk,
                   "documents_loaded": len(documents),
                   "document_tokens": int(sum(len(t) for _, t in documents))},
      **info,
      "runs": runs,
  }


def run_passkey(args) -> dict:
  from pi_jax import files
  from pi_jax.evals import passkey
  from pi_jax.evals import report
  from pi_jax.evals import runtime
  lengths = _int_list(args.lengths, "--lengths")
  if args.trials < 1:
    raise ValueError(f"--trials must be >= 1, got {args.trials}")
  passkey.depth_grid(1, args.depths)  # validates --depths before any work
  _check_outputs(args, [args.ckpt])
  info = report.run_info(args.argv)
  _check_fits(args, lengths, "--lengths", kv_cache=args.mode == "generate")
  mesh, config, params, tok, batch = _load(args)
  configs = _check_scalings(config, _scalings(args.rope_scaling), args.ckpt)
  builder = passkey.PromptBuilder(tok, passkey.get_template(args.template))
  trials = builder.trials(lengths, args.depths, args.trials, args.seed)
  batches = -(-len(trials) // batch) * len(configs)
  steps = "" if args.mode == "score" else " plus about 7 one-token decode steps each"
  print(f"passkey: {len(trials) * len(configs)} prompts = {len(lengths)} lengths × "
        f"{args.depths} depths × {args.trials} trials × {len(configs)} scaling(s), in "
        f"{batches} forward passes of batch {batch} (prefills of up to {max(lengths)} tokens"
        f"{steps}); an estimate follows the first batch", file=sys.stderr, flush=True)
  bar = _progress(args)
  runs = []
  for cfg in configs:
    label = cfg.rope_scaling.describe()
    with runtime.mesh_context(mesh):  # activations follow the logical layout on a mesh
      results = passkey.run_trials(cfg, params, tok, trials, mode=args.mode, batch_size=batch,
                                   progress=lambda n, label=label: bar(f"passkey {label}", n),
                                   run=args.run)
    summary = passkey.summarize(results)
    runs.append({"rope_scaling": label, "model_window": cfg.max_position_embeddings,
                 "lengths": summary, "trials": results})
    for length, s in summary.items():
      print(f"[{label}] length {length}: mean accuracy {s['mean_accuracy']:.2f}; "
            f"{s['verdict']}", file=sys.stderr, flush=True)
  return {
      "task": "passkey",
      "protocol": "PI §3.3 / Mohtashami & Jaggi 2023; k = real tokens from the key to the end "
                  "(nominal_k: the grid value); k_max = largest k with every k' <= k at >= 20% "
                  "accuracy (null when the nearest k fails: see nearest_k, verdict); "
                  "far_run_from = smallest k with every k' >= k at >= 20%; "
                  "largest_passing_k = largest k at >= 20%",
      "settings": {"ckpt": files.portable(args.ckpt), "lengths": lengths, "trials": args.trials,
                   "depths": args.depths, "mode": args.mode, "template": args.template,
                   "seed": args.seed,
                   "batch_size": batch, "mesh": args.mesh, "run": args.run.to_dict()},
      **info,
      "k_max": {r["rope_scaling"]: {L: s["k_max"] for L, s in r["lengths"].items()} for r in runs},
      "verdict": {r["rope_scaling"]: {L: s["verdict"] for L, s in r["lengths"].items()}
                  for r in runs},
      "runs": runs,
  }


def run_needle(args) -> dict:
  from pi_jax import data as data_lib
  from pi_jax import files
  from pi_jax.evals import needle
  from pi_jax.evals import report
  from pi_jax.evals import runtime
  tasks = needle.parse_tasks(args.tasks)
  lengths = _int_list(args.lengths, "--lengths")
  if args.trials < 1:
    raise ValueError(f"--trials must be >= 1, got {args.trials}")
  if not 0.0 < args.threshold <= 1.0:
    raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}")
  depths = needle.depth_grid(args.depths)
  settings = needle.Settings(args.distractors, args.values, args.queries, args.hops, args.chains)
  _check_outputs(args, [args.ckpt])
  info = report.run_info(args.argv)
  from pi_jax import checkpoint
  base = checkpoint.load_config(args.ckpt)
  for cfg in _check_scalings(base, _scalings(args.rope_scaling), args.ckpt):
    window = cfg.max_position_embeddings
    if max(lengths) > window and not args.allow_beyond_window:
      raise ValueError(f"--lengths {max(lengths)} is beyond the window of {args.ckpt} with RoPE "
                       f"scaling {cfg.rope_scaling.describe()} ({window} tokens); give "
                       f"--rope-scaling linear:{-(-max(lengths) // base.original_window)}, "
                       "shorter --lengths, or --allow-beyond-window to measure extrapolation")
  empty = []
  try:
    docs = list(data_lib.iter_documents(args.haystack, on_empty=empty.append))
  except ValueError as e:
    if empty:
      raise ValueError(f"--haystack {args.haystack}: no text, every document is empty "
                       f"({', '.join(files.portable(x) for x in empty[:3])}); give text files "
                       "with sentences") from None
    raise ValueError(f"--haystack {args.haystack}: {e}") from None
  _check_fits(args, lengths, "--lengths", kv_cache=True)
  mesh, config, params, tok, batch = _load(args)
  configs = _check_scalings(config, _scalings(args.rope_scaling), args.ckpt)
  builder = needle.PromptBuilder(tok, needle.Haystack(tok, docs), settings)
  trials = builder.trials(tasks, lengths, args.depths, args.trials, args.seed)
  print(f"needle: {len(trials) * len(configs)} prompts = {len(tasks)} tasks × {len(lengths)} "
        f"lengths × {len(depths)} depths × {args.trials} trials × {len(configs)} scaling(s), "
        f"batches of {batch} (prefills of up to {max(lengths)} tokens plus up to "
        f"{max(t.new_tokens for t in trials)} decode steps); an estimate follows the first "
        "batch", file=sys.stderr, flush=True)
  bar = _progress(args)
  runs = []
  for cfg in configs:
    label = cfg.rope_scaling.describe()
    with runtime.mesh_context(mesh):
      results = needle.run_trials(cfg, params, tok, trials, batch_size=batch,
                                  progress=lambda n, label=label: bar(f"needle {label}", n),
                                  run=args.run)
    summary = needle.summarize(results, args.threshold)
    runs.append({"rope_scaling": label, "model_window": cfg.max_position_embeddings,
                 "tasks": summary, "trials": results})
    for task, s in summary.items():
      for length, c in s["lengths"].items():
        print(f"[{label}] {task} length {length}: mean accuracy {c['mean_accuracy']:.2f}; "
              f"{c['verdict']}", file=sys.stderr, flush=True)
      print(f"[{label}] {task}: {s['verdict']}", file=sys.stderr, flush=True)
  return {
      "task": "needle",
      "protocol": "RULER (Hsieh et al. 2024) synthetic needles on the given haystack; depth = "
                  "% of the haystack before the asked needle; k = real tokens from it to the "
                  "end of the prompt; success = every answer in the greedy continuation; a "
                  f"cell passes at accuracy >= {args.threshold}; k_max = largest k with every "
                  "nearer depth passing (null when the nearest fails: see verdict); "
                  "max_length = largest length with it and every shorter one passing at "
                  "every depth (null when the shortest fails)",
      "settings": {"ckpt": files.portable(args.ckpt), "haystack": files.portable(args.haystack),
                   "haystack_documents": len(docs),
                   "haystack_sentences": len(builder.haystack.sentences), "tasks": tasks,
                   "lengths": lengths, "depths": depths, "trials": args.trials,
                   "threshold": args.threshold, **dataclasses.asdict(settings),
                   "seed": args.seed, "batch_size": batch, "mesh": args.mesh,
                   "run": args.run.to_dict()},
      **info,
      "max_length": {r["rope_scaling"]: {t: s["max_length"] for t, s in r["tasks"].items()}
                     for r in runs},
      "runs": runs,
  }


def run_report(args) -> dict:
  """Merges runs of one task. A row is (checkpoint, RoPE scaling): runs of one checkpoint with
  the same scaling are joined (their windows or lengths); the same cell in two files is an error,
  never a silent pick."""
  import json
  if args.json_out or args.plot:
    _check_outputs(args, args.inputs)
  payloads = []
  for path in args.inputs:
    try:
      with open(path) as f:
        payloads.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: cannot read an eval.py JSON file: {e}") from None
  tasks = {p.get("task") for p in payloads}
  if len(tasks) != 1 or tasks - {"perplexity", "passkey", "needle"}:
    raise ValueError("report needs JSON files of one task (perplexity, passkey or needle), got "
                     f"{tasks}")
  task = tasks.pop()
  ckpts = list(dict.fromkeys(str((p.get("settings") or {}).get("ckpt")) for p in payloads))
  if task == "needle":
    return _merge_needle(args.inputs, payloads, ckpts)
  field = "results" if task == "perplexity" else "lengths"
  runs: dict[tuple, dict] = {}
  seen: dict[tuple, str] = {}  # (row, window or length) -> the file it came from
  for path, p in zip(args.inputs, payloads):
    ckpt = str((p.get("settings") or {}).get("ckpt"))
    for run in p["runs"]:
      scaling = run["rope_scaling"]
      label = scaling if len(ckpts) == 1 else f"{ckpt} [{scaling}]"
      merged = runs.setdefault((ckpt, scaling), {"rope_scaling": label, "ckpt": ckpt,
                                                 "scaling": scaling,
                                                 field: [] if field == "results" else {}})
      cells = [r["window"] for r in run["results"]] if field == "results" else list(run["lengths"])
      for cell in cells:
        if ((ckpt, scaling), cell) in seen:
          raise ValueError(f"{path} and {seen[((ckpt, scaling), cell)]} both have "
                           f"{ckpt} [{scaling}] at {'window' if field == 'results' else 'length'} "
                           f"{cell}; keep one of them")
        seen[((ckpt, scaling), cell)] = path
      if field == "results":
        merged["results"] = sorted(merged["results"] + run["results"], key=lambda r: r["window"])
      else:
        merged["lengths"].update(run["lengths"])
  return {"task": task, "checkpoints": ckpts,
          "sources": [{"file": f, "command": p.get("command"), "settings": p.get("settings")}
                      for f, p in zip(args.inputs, payloads)],
          "runs": list(runs.values())}


def _merge_needle(paths, payloads, ckpts) -> dict:
  """Needle runs of one (checkpoint, scaling) joined per task; max_length is recomputed over
  the joined lengths; one (task, length) cell in two files is an error."""
  from pi_jax.evals import needle
  runs: dict[tuple, dict] = {}
  seen: dict[tuple, str] = {}
  thresholds = set()
  for path, p in zip(paths, payloads):
    ckpt = str((p.get("settings") or {}).get("ckpt"))
    for run in p["runs"]:
      scaling = run["rope_scaling"]
      label = scaling if len(ckpts) == 1 else f"{ckpt} [{scaling}]"
      merged = runs.setdefault((ckpt, scaling), {"rope_scaling": label, "ckpt": ckpt,
                                                 "scaling": scaling, "tasks": {}})
      for task, t in run["tasks"].items():
        thresholds.add(t["threshold"])
        for length, cell in t["lengths"].items():
          where = (ckpt, scaling, task, str(length))
          if where in seen:
            raise ValueError(f"{path} and {seen[where]} both have {ckpt} [{scaling}] {task} at "
                             f"length {length}; keep one of them")
          seen[where] = path
          merged["tasks"].setdefault(task, {})[str(length)] = cell
  if len(thresholds) > 1:
    raise ValueError(f"report: the needle files use different thresholds {sorted(thresholds)}")
  threshold = next(iter(thresholds))
  for merged in runs.values():
    merged["tasks"] = {task: needle.task_summary(lengths, threshold)
                       for task, lengths in merged["tasks"].items()}
  return {"task": "needle", "checkpoints": ckpts,
          "sources": [{"file": f, "command": p.get("command"), "settings": p.get("settings")}
                      for f, p in zip(paths, payloads)],
          "runs": list(runs.values())}
def _columns(args):
  """[(checkpoint, scaling spec or None)]: every checkpoint under every --rope-scaling."""
  return [(c, s) for c in args.ckpt for s in _scalings(args.rope_scaling)]


def _label(ckpt, model_record, several):
  name = os.path.basename(os.path.normpath(ckpt))
  return f"{name} [{model_record['rope_scaling']}]" if several else model_record["rope_scaling"]


def run_harness(args) -> dict:
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    raise ImportError("lm-evaluation-harness is not installed: pip install pi_jax[harness]") \
        from None
  from pi_jax import files
  from pi_jax.evals import harness, report
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not tasks:
    raise ValueError("--tasks: no task names")
  _check_outputs(args, list(args.ckpt))
  info = report.run_info(args.argv)
  harness.resolve_tasks(tasks, args.include_path)  # unknown tasks / bad data before any model
  columns = _columns(args)
  several = len(args.ckpt) > 1
  runs = []
  for ckpt, spec in columns:
    print(f"harness: {ckpt} [{spec or 'own scaling'}] on {', '.join(tasks)}", file=sys.stderr,
          flush=True)
    lm = harness.PiJaxLM(ckpt, rope_scaling=spec, max_length=args.max_length,
                         batch_size=args.batch_size, run=args.run, mesh=args.mesh,
                         rolling_stride=args.rolling_stride, max_gen_toks=args.max_gen_toks,
                         seed=args.seed, progress=not args.no_progress)
    out = harness.evaluate(lm, tasks, include_path=args.include_path,
                           num_fewshot=args.num_fewshot, limit=args.limit, random_seed=args.seed)
    model = lm.record()
    model["checkpoint"] = files.portable(ckpt)
    runs.append({"label": _label(ckpt, model, several), "model": model,
                 "results": out["results"], "n-samples": out.get("n-samples"),
                 "versions": out.get("versions"), "n_shot": out.get("n-shot")})
    print(f"[{runs[-1]['label']}] truncated requests: {model['truncated_requests']}",
          file=sys.stderr, flush=True)
  from importlib import metadata
  return {"task": "harness", "lm_eval_version": metadata.version("lm_eval"),
          "settings": {"ckpt": [files.portable(c) for c in args.ckpt], "tasks": tasks,
                       "num_fewshot": args.num_fewshot, "limit": args.limit,
                       "include_path": args.include_path and files.portable(args.include_path),
                       "max_length": args.max_length, "batch_size": args.batch_size,
                       "mesh": args.mesh, "run": args.run.to_dict(),
                       "rolling_stride": args.rolling_stride, "seed": args.seed},
          "truncated_requests": {r["label"]: r["model"]["truncated_requests"] for r in runs},
          **info, "runs": runs}


def run_summarize(args) -> dict:
  import pi_jax
  from pi_jax import files
  from pi_jax.data import summaries
  from pi_jax.evals import report, summarization
  try:
    import rouge_score  # noqa: F401
  except ImportError:
    raise ImportError("rouge-score is not installed: pip install pi_jax[harness]") from None
  _check_outputs(args, list(args.ckpt) + [args.data])
  info = report.run_info(args.argv)
  docs = summaries.load_documents(args.data, args.limit)
  mesh = None
  if args.mesh:
    from pi_jax import sharding
    mesh = sharding.make_mesh(args.mesh)
  template = args.template or summaries.DEFAULT_TEMPLATE
  several = len(args.ckpt) > 1
  bar = _progress(args)
  runs = []
  for ckpt in args.ckpt:
    config, params = pi_jax.load_checkpoint(ckpt, mesh=mesh)
    try:
      tok = pi_jax.load_tokenizer(ckpt)
    except FileNotFoundError:
      raise ValueError(f"checkpoint {ckpt} has no tokenizer (its tokenizer/ folder)") from None
    for spec in _scalings(args.rope_scaling):
      cfg = _with_scaling(config, spec, ckpt)
      max_length = args.max_length or cfg.max_position_embeddings
      label = cfg.rope_scaling.describe()
      record = summarization.summarize(
          cfg, params, tok, docs, max_length=max_length, max_new_tokens=args.max_new_tokens,
          template=template, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
          mesh=mesh, progress=lambda n, label=label: bar(f"summarize {label}", n), run=args.run)
      model = {"checkpoint": files.portable(ckpt), "rope_scaling": label,
               "max_length": max_length, "run": args.run.to_dict()}
      runs.append({"label": _label(ckpt, model, several), "model": model, **record})
      r = record["rouge"]
      print(f"[{runs[-1]['label']}] ROUGE-1/2/L {r['rouge1']:.2f} / {r['rouge2']:.2f} / "
            f"{r['rougeL']:.2f} over {record['documents']} documents "
            f"({record['truncated']} truncated)", file=sys.stderr, flush=True)
  return {"task": "summarize", "metric": "ROUGE-1/2/L F1 x 100 (rouge-score, Porter stemmer), "
                                         "mean over documents",
          "settings": {"ckpt": [files.portable(c) for c in args.ckpt],
                       "data": files.portable(args.data), "limit": args.limit,
                       "max_length": args.max_length, "max_new_tokens": args.max_new_tokens,
                       "template": template, "temperature": args.temperature,
                       "top_p": args.top_p, "seed": args.seed, "mesh": args.mesh},
          **info, "runs": runs}


def compile_perplexity(args) -> int:
  """--compile-only: 0 if every window fits the slice, 1 if one does not, with the numbers."""
  import json
  from pi_jax.train import aot
  if args.ckpt:
    from pi_jax import checkpoint
    config, source = checkpoint.load_config(args.ckpt), args.ckpt
  else:
    from pi_jax import presets
    config, source = presets.preset(args.model), f"preset {args.model}"
  records = []
  for spec in _scalings(args.rope_scaling):
    cfg = _with_scaling(config, spec, args.ckpt or args.model)
    for window in _int_list(args.windows, "--windows"):
      try:
        record = aot.compile_perplexity_step(cfg, args.topology, window, args.batch_size,
                                             args.mesh, min(args.chunk, window), source,
                                             run=args.run)
      except RuntimeError as e:
        raise ValueError(str(e)) from None
      print(aot.format_record(record))
      records.append(record)
  if args.json_out:
    with open(args.json_out, "w") as f:
      out = records[0] if len(records) == 1 else {
          "fits": all(r["fits"] for r in records),
          "per_chip_bytes": max(r["per_chip_bytes"] for r in records),
          "hbm_bytes_per_chip": records[0]["hbm_bytes_per_chip"], "records": records}
      json.dump(out, f, indent=2)
  return 0 if all(r["fits"] for r in records) else 1


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else list(argv)
  if hasattr(args, "run_settings"):
    from pi_jax import run as run_lib
    try:
      args.run = run_lib.from_arguments(args)
    except ValueError as e:
      parser.error(str(e))
  if args.task in ("perplexity", "passkey", "needle"):
    compile_only = getattr(args, "compile_only", False)
    if compile_only != bool(getattr(args, "topology", None)):
      parser.error("--compile-only and --topology go together")
    if not args.ckpt and not (compile_only and args.model):
      parser.error("--ckpt is required" + (" (or --model PRESET)" if compile_only else ""))
    if args.task == "perplexity" and not compile_only and not args.data:
      parser.error("--data is required")
    if args.task == "needle" and not args.haystack:
      parser.error("--haystack is required (a text file, folder, glob or pg19_standin)")
  try:
    from pi_jax.evals import report
    if args.task == "report":
      out = run_report(args)
      table = {"perplexity": report.perplexity_table, "passkey": report.passkey_table,
               "needle": report.needle_table}[out["task"]]
      print(table(out["runs"]))
      if args.plot:
        plot = {"perplexity": report.plot_perplexity, "passkey": report.plot_passkey,
                "needle": report.plot_needle}[out["task"]]
        plot(out["runs"], args.plot, f"{out['task']}: {', '.join(out['checkpoints'])} "
             f"({len(args.inputs)} files merged)")
    elif args.task in ("harness", "summarize"):
      from pi_jax.evals import harness_report
      out = run_harness(args) if args.task == "harness" else run_summarize(args)
      table = harness_report.harness_table if args.task == "harness" else \
          harness_report.rouge_table
      print(table(out["runs"]))
      if args.plot:
        plot = harness_report.plot_harness if args.task == "harness" else \
            harness_report.plot_rouge
        plot(out["runs"], args.plot, f"{args.task}: {', '.join(r['label'] for r in out['runs'])}")
    elif args.task == "perplexity" and args.compile_only:
      return compile_perplexity(args)
    elif args.task == "perplexity":
      out = run_perplexity(args)
      print(report.perplexity_table(out["runs"]))
      if args.plot:
        s = out["settings"]
        report.plot_perplexity(out["runs"], args.plot,
                               f"{s['ckpt']} on {s['data']}, stride {s['stride']} ({out['definition']})")
    elif args.task == "needle":
      out = run_needle(args)
      print(report.needle_table(out["runs"]))
      if args.plot:
        report.plot_needle(out["runs"], args.plot,
                           f"needle: {out['settings']['ckpt']} on {args.haystack}")
    else:
      out = run_passkey(args)
      print(report.passkey_table(out["runs"]))
      if args.plot:
        report.plot_passkey(out["runs"], args.plot, f"passkey: {args.ckpt} ({args.mode})")
    if args.json_out:
      report.write_json(args.json_out, out)
  except KeyboardInterrupt:
    print(f"eval.py {args.task}: interrupted; nothing written", file=sys.stderr)
    return 130
  except (ValueError, FileNotFoundError, ImportError, MemoryError, KeyError) as e:
    print(f"eval.py {args.task}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
