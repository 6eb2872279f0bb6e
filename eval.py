"""Evaluate a pi_jax checkpoint: sliding-window perplexity and passkey retrieval (PI §3.2, §3.3).

  python eval.py perplexity --ckpt CKPT --data pg19_standin --windows 2048,4096,8192 --stride 256 \\
      --rope-scaling none,linear:2 --json out.json --plot out.png
  python eval.py passkey --ckpt CKPT --lengths 4096,8192 --trials 10 --depths 32 \\
      --rope-scaling linear:2 --json out.json --plot out.png

Each writes a Markdown table to stdout, progress to stderr, and optionally JSON and a PNG.
The definitions are in pi_jax/evals/perplexity.py and pi_jax/evals/passkey.py.
"""

from __future__ import annotations

import argparse
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
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="compute dtype (default: the checkpoint's)")
  p.add_argument("--attention-impl", default=None, help="override the attention implementation")
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
  """Before loading anything: refuse lengths whose parameters + activations (+ KV cache) cannot
  fit in the memory there is. A rough lower bound: the exact XLA estimate comes later."""
  import pi_jax
  from pi_jax.evals import runtime
  from pi_jax import checkpoint
  config = checkpoint.load_config(args.ckpt)
  batch = args.batch_size or 1
  free, name = runtime.free_device_memory()
  if free is None:
    return
  act = 4 if (args.dtype or config.compute_dtype) == "float32" else 2
  params = pi_jax.count_params(config) * (4 if config.param_dtype == "float32" else 2)
  for length in lengths:
    need = params + batch * length * (2 * config.hidden_size + config.intermediate_size) * act
    if kv_cache:
      need += 2 * config.num_layers * batch * length * config.num_kv_heads * config.head_dim * act
    if need > runtime.MEMORY_HEADROOM * free:
      raise MemoryError(
          f"{what} {length}: needs at least {need / 2**30:.1f} GiB (parameters, activations"
          f"{', KV cache' if kv_cache else ''}) but {name} has {free / 2**30:.1f} GiB free; "
          "use shorter lengths")


def _load(args):
  """(mesh, config, params, tok, batch size)."""
  import pi_jax
  from pi_jax.evals import runtime
  mesh = None
  if args.mesh:
    from pi_jax import sharding
    mesh = sharding.make_mesh(args.mesh)
  batch = runtime.check_batch_size(
      runtime.batch_shards(mesh) if args.batch_size is None else args.batch_size, mesh)
  overrides = {k: v for k, v in (("compute_dtype", args.dtype),
                                 ("attention_impl", args.attention_impl)) if v}
  config, params = pi_jax.load_checkpoint(args.ckpt, mesh=mesh, config_overrides=overrides or None)
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
        skip_short=args.skip_short, chunk=args.chunk,
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
                   "compute_dtype": config.compute_dtype,
                   "attention_impl": config.attention_impl, "chunk": args.chunk,
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
                                   progress=lambda n, label=label: bar(f"passkey {label}", n))
    summary = passkey.summarize(results)
    runs.append({"rope_scaling": label, "model_window": cfg.max_position_embeddings,
                 "lengths": summary, "trials": results})
    for length, s in summary.items():
      print(f"[{label}] length {length}: mean accuracy {s['mean_accuracy']:.2f}, "
            f"k_max {s['k_max']}", file=sys.stderr, flush=True)
  return {
      "task": "passkey",
      "protocol": "PI §3.3 / Mohtashami & Jaggi 2023; k = tokens from the key to the end; "
                  "k_max = largest k with every k' <= k at >= 20% accuracy (null when k = 0 "
                  "fails); far_run_from = smallest k with every k' >= k at >= 20%; "
                  "largest_passing_k = largest k at >= 20%",
      "settings": {"ckpt": files.portable(args.ckpt), "lengths": lengths, "trials": args.trials,
                   "depths": args.depths, "mode": args.mode, "template": args.template,
                   "seed": args.seed,
                   "batch_size": batch, "mesh": args.mesh, "compute_dtype": config.compute_dtype,
                   "attention_impl": config.attention_impl},
      **info,
      "k_max": {r["rope_scaling"]: {L: s["k_max"] for L, s in r["lengths"].items()} for r in runs},
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
  if len(tasks) != 1 or tasks - {"perplexity", "passkey"}:
    raise ValueError(f"report needs JSON files of one task (perplexity or passkey), got {tasks}")
  task = tasks.pop()
  ckpts = list(dict.fromkeys(str((p.get("settings") or {}).get("ckpt")) for p in payloads))
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
  overrides = {k: v for k, v in (("compute_dtype", args.dtype),
                                 ("attention_impl", args.attention_impl)) if v}
  config = config.replace(**overrides) if overrides else config
  records = []
  for spec in _scalings(args.rope_scaling):
    cfg = _with_scaling(config, spec, args.ckpt or args.model)
    for window in _int_list(args.windows, "--windows"):
      try:
        record = aot.compile_perplexity_step(cfg, args.topology, window, args.batch_size,
                                             args.mesh, min(args.chunk, window), source)
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
  if args.task in ("perplexity", "passkey"):
    compile_only = getattr(args, "compile_only", False)
    if compile_only != bool(getattr(args, "topology", None)):
      parser.error("--compile-only and --topology go together")
    if not args.ckpt and not (compile_only and args.model):
      parser.error("--ckpt is required" + (" (or --model PRESET)" if compile_only else ""))
    if args.task == "perplexity" and not compile_only and not args.data:
      parser.error("--data is required")
  try:
    from pi_jax.evals import report
    if args.task == "report":
      out = run_report(args)
      table = report.perplexity_table if out["task"] == "perplexity" else report.passkey_table
      print(table(out["runs"]))
      if args.plot:
        plot = report.plot_perplexity if out["task"] == "perplexity" else report.plot_passkey
        plot(out["runs"], args.plot, f"{out['task']}: {', '.join(out['checkpoints'])} "
             f"({len(args.inputs)} files merged)")
    elif args.task == "perplexity" and args.compile_only:
      return compile_perplexity(args)
    elif args.task == "perplexity":
      out = run_perplexity(args)
      print(report.perplexity_table(out["runs"]))
      if args.plot:
        s = out["settings"]
        report.plot_perplexity(out["runs"], args.plot,
                               f"{s['ckpt']} on {s['data']}, stride {s['stride']} ({out['definition']})")
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
