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
  python demo.py --real     the paper on a real model: SmolLM2-135M 8192 -> 32768 by PI and
                            direct fine-tuning (one GPU; --reduced: 16384 on a CPU in hours,
                            --smoke: toy sizes), runs/real_SIZE (miniature/real.py)
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


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


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


def write_report(out: str, argv: list[str], mini, runner: Runner, started: float,
                 status: str) -> str:
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
                    "commands": runner.records}, indent=1, default=str)
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
    fig.savefig(os.path.join(tmp, "loss_curve.png"), dpi=110)
    if os.path.isfile(readme):  # the hand-written description stays
      shutil.copy2(readme, os.path.join(tmp, "README.md"))
  plt.close(fig)
  print(f"[pretrain] published to {dest}: {json.dumps(summary)}", flush=True)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["pretrain"]:
    return pretrain(argv[1:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", default=None,
                 help="output folder (default runs/demo; runs/miniature with --full; "
                      "runs/real_SIZE with --real)")
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
  real = p.add_argument_group(
      "the real model (miniature/real.py): SmolLM2-135M extended by PI and direct fine-tuning")
  real.add_argument("--real", action="store_true",
                    help="run the real-model experiment instead of the miniature: 8192 -> 32768 "
                         "(one H100-class GPU, ~8 minutes); with --reduced or --smoke a smaller "
                         "size; output runs/real_SIZE (rerun to continue)")
  real.add_argument("--reduced", action="store_true",
                    help="with --real: 8192 -> 16384 on a CPU, 10/20 steps (hours; resumable)")
  real.add_argument("--smoke", action="store_true",
                    help="with --real: the same pipeline at toy sizes on the miniature's base "
                         "(the test suite; about 2 minutes)")
  real.add_argument("--lr", type=float, default=None,
                    help="with --real: fine-tuning learning rate (default: the plan's, 5e-5)")
  real.add_argument("--estimate", action="store_true",
                    help="with --real: print the FLOP count and expected time, run nothing")
  args = p.parse_args(argv)
  if (args.reduced or args.smoke or args.lr is not None or args.estimate) and not args.real:
    p.error("--reduced, --smoke, --lr and --estimate go with --real")
  if args.real:
    if args.reduced and args.smoke:
      p.error("--reduced and --smoke are two sizes: pick one")
    if args.quick or args.steps or args.base or args.ft_episodes is not None:
      p.error("--quick, --steps, --base and --ft-episodes are the miniature's: not with --real")
    from miniature import real as real_lib
    size = "smoke" if args.smoke else "reduced" if args.reduced else "full"
    return real_lib.main(argv, size, args.out, args.lr, args.estimate)
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
  if not os.path.isfile(os.path.join(plan.base, "config.json")):
    print(f"demo.py: error: {plan.base} has no checkpoint (config.json); "
          "`python demo.py pretrain` makes one", file=sys.stderr)
    return 2
  os.makedirs(out, exist_ok=True)
  runner = Runner(out)
  started = time.perf_counter()
  mini = None
  status = "complete"
  try:
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
  except (RuntimeError, KeyError, ValueError, OSError) as e:
    status = f"FAILED: {str(e).splitlines()[0]}"
    print(f"demo.py: error: {e}", file=sys.stderr)
  path = write_report(out, argv, mini, runner, started, status)
  if args.full and status == "complete":
    publish(out, "results/miniature")
    print("[demo] published to results/miniature")
  print(f"[demo] report: {path} ({time.perf_counter() - started:.0f} s)")
  return 0 if status == "complete" else 1


if __name__ == "__main__":
  sys.exit(main())
