"""The miniature's base model: `python demo.py pretrain` trains its BPE tokenizer and pre-trains it
(configs/mini_pretrain.py), then publishes it to assets/mini_base with its loss curve, its
passkey retrieval inside the window and a summary."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from miniature.runner import REPO
from pi_jax import files


PRETRAIN_CONFIG = "configs/mini_pretrain.py"
BASE_PASSKEY_DEPTHS = 32  # distances inside the window for the base's retrieval check
BASE_PASSKEY_TRIALS = 10  # keys per distance


def pretrain(workdir: str, vocab: int, sets: list[str], publish: str) -> int:
  """The BPE tokenizer, then the base model (configs/mini_pretrain.py) in `workdir`; published
  to `publish` ('' to skip). Rerunning resumes the pre-training (the tokenizer is kept)."""
  os.chdir(REPO)
  from pi_jax import data as data_lib
  from pi_jax.tokenizer import train_bpe
  from pi_jax.train import config as config_lib
  config = config_lib.load_config_file(os.path.join(REPO, PRETRAIN_CONFIG))
  tok_dir = os.path.join(workdir, "tokenizer")
  if not os.path.isfile(os.path.join(REPO, tok_dir, "tokenizer.json")):
    texts = [t for _, t in data_lib.iter_documents(os.path.join(REPO, config.data))]
    t0 = time.perf_counter()
    tok = train_bpe(texts, vocab, os.path.join(REPO, tok_dir))
    print(f"[pretrain] BPE tokenizer: {tok.vocab_size} ids from {len(texts)} documents of "
          f"{config.data} in {time.perf_counter() - t0:.0f} s -> {tok_dir}", flush=True)
  cmd = [sys.executable, "train.py", "--config", PRETRAIN_CONFIG,
         "--set", f"workdir={workdir}", "--set", f"tokenizer={tok_dir}"]
  for item in sets:
    cmd += ["--set", item]
  print("[pretrain] $ " + shlex.join(["python"] + cmd[1:]), flush=True)
  code = subprocess.run(cmd, cwd=REPO).returncode
  if code == 0 and publish:
    publish_base(workdir, publish)
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
  with open(pk_json) as f:
    (pk,) = json.load(f)["runs"]
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
