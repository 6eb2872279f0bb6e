"""The demo's report document: runs/demo/report.md and results.json (the miniature's tables and
plots come from miniature.report), and publishing a full run to results/miniature."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import shutil
import time

from miniature import experiment
from miniature.report import markdown
from miniature.runner import REPO, Runner, commands_table
from pi_jax import files


def versions() -> dict:
  """Python's and the numerical packages' versions, for a report's provenance line."""
  out = {"python": platform.python_version()}
  for name in ("pi_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "gguf",
               "matplotlib"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out




def share(fraction) -> str:
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
      f"{L}-token window, with passkey episodes in {share(res.get('base_passkey_fraction'))} "
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
  lines += markdown(res)
  lines += [f"![{n}]({n})" for n in res.get("plots", [])] + [""]
  return lines


def write_demo_report(out: str, argv: list[str], mini, runner: Runner, started: float,
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
  lines += ["## Versions and commands", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", ""]
  lines += commands_table(runner.records)
  path = os.path.join(out, "report.md")
  files.write_text(path, "\n".join(lines))
  files.write_json(os.path.join(out, "results.json"),  # the numbers, machine-readable
                   {"status": status, "versions": versions(), "miniature": mini,
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


def run_demo(plan, out: str, argv: list[str], *, full: bool, quick: bool) -> int:
  """Runs the miniature's `plan` into `out` (resuming what is there), writes the report, and
  publishes a complete full run to results/miniature; 0 when complete, 1 on a failed step."""
  import sys
  from miniature import report as mini_report
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
    if not full and not quick:  # the two fine-tunes a reader compares
      for name, arm in (("pi", "pi"), ("ft", "direct")):
        link = os.path.join(out, "checkpoints", name)
        target = os.path.join(f"{arm}{plan.factors[0]}", f"step{max(plan.steps)}")
        if os.path.islink(link):
          os.remove(link)
        os.symlink(target, link)
  except (RuntimeError, KeyError, ValueError, OSError) as e:
    status = f"FAILED: {str(e).splitlines()[0]}"
    print(f"demo.py: error: {e}", file=sys.stderr)
  path = write_demo_report(out, argv, mini, runner, started, status)
  if full and status == "complete":
    publish(out, "results/miniature")
    print("[demo] published to results/miniature")
  print(f"[demo] report: {path} ({time.perf_counter() - started:.0f} s)")
  return 0 if status == "complete" else 1
