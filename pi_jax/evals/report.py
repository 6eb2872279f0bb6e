"""Run metadata, Markdown tables, JSON files and plots for the evaluations."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

from pi_jax import files
from pi_jax.evals import retrieval
from pi_jax.evals.retrieval import fmt


def run_info(argv=None, prog: str = "eval.py") -> dict:
  """What a number needs to be reproduced: command line, versions, device, commit, time."""
  import jax
  import numpy
  import pi_jax
  commit = None
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(pi_jax.__file__)),
                            timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    pass
  devices = jax.devices()
  return {
      "command": shlex.join([prog] + [files.portable(a) for a in (
          sys.argv[1:] if argv is None else argv)]),
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "versions": {"pi_jax": pi_jax.__version__, "jax": jax.__version__,
                   "numpy": numpy.__version__, "python": platform.python_version()},
      "git_commit": commit,
      "device": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                 "count": len(devices)},
  }


def write_json(path: str, payload: dict) -> None:
  files.write_json(path, payload, indent=2, sort_keys=False)


def _fmt_ppl(x: float) -> str:
  if x != x:  # NaN
    return "nan"
  return f"{x:.3g}" if x >= 1000 else f"{x:.3f}"


def perplexity_table(runs: list[dict]) -> str:
  """Rows: one per RoPE scaling; columns: windows. Each cell is the perplexity."""
  windows = sorted({r["window"] for run in runs for r in run["results"]})
  lines = ["| scaling | " + " | ".join(str(w) for w in windows) + " |",
           "|---|" + "---|" * len(windows)]
  for run in runs:
    by_w = {r["window"]: r for r in run["results"]}
    cells = [_fmt_ppl(by_w[w]["perplexity"]) if w in by_w else retrieval.MISSING
             for w in windows]
    lines.append(f"| {run['rope_scaling']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


PASSKEY_LEGEND = (
    "k = real tokens from the key to the end of the prompt (the nearest grid point is ~31 "
    "tokens, not 0: the rest of the key line and the question follow the key); a k passes at "
    ">= 20% of its trials. k_max (PI §3.3): every k' <= k passes; far run: every k' >= k "
    f"passes; '{retrieval.MISSING}': no such k.")


def passkey_table(runs: list[dict]) -> str:
  """Rows: scaling × length; mean accuracy over the k grid, k_max and what it hides."""
  lines = ["| scaling | length | mean accuracy | k_max (all k' ≤ k pass) | far run (all k' ≥ k "
           "pass) | largest passing k | k passing | accuracy by k |",
           "|---|---|---|---|---|---|---|---|"]
  verdicts = []
  for run in runs:
    for length, s in run["lengths"].items():
      by_k = " ".join(f"{k}:{a:.1f}" for k, a in zip(s["k"], s["accuracy"]))
      far = s.get("far_run_from")
      largest = s.get("largest_passing_k")
      passing = s.get("passing", sum(a >= 0.2 for a in s["accuracy"]))
      lines.append(f"| {run['rope_scaling']} | {length} | {s['mean_accuracy']:.2f} | "
                   f"{fmt(s['k_max'])} | {fmt(far)} | {fmt(largest)} | "
                   f"{passing}/{len(s['k'])} | {by_k} |")
      if s.get("verdict"):
        verdicts.append(f"- {run['rope_scaling']}, length {length}: {s['verdict']}")
  lines.append("")
  lines.append(PASSKEY_LEGEND)
  if verdicts:
    lines += [""] + verdicts
  return "\n".join(lines)


NEEDLE_LEGEND = (
    "depth = % of the haystack before the asked needle (0: its start, 100: just before the "
    "question); k = real tokens from that needle to the end of the prompt; a cell passes at "
    "the threshold. k_max: every nearer depth passes; far run: every farther one passes; "
    f"'{retrieval.MISSING}': no such k.")


def needle_table(runs: list[dict]) -> str:
  """Rows: scaling × task × length; accuracy by depth, k_max and what it hides; then per task
  the largest length that passes at every depth."""
  lines = ["| scaling | task | length | mean accuracy | k_max (all nearer pass) | far run (all "
           "farther pass) | depths passing | accuracy by depth % (k) |",
           "|---|---|---|---|---|---|---|---|"]
  notes = []
  for run in runs:
    label = run["rope_scaling"]
    for task, t in run["tasks"].items():
      for length, s in t["lengths"].items():
        by_depth = " ".join(f"{d:g}% ({k}): {a:.2f}"
                            for d, k, a in zip(s["depth"], s["k"], s["accuracy"]))
        lines.append(f"| {label} | {task} | {length} | {s['mean_accuracy']:.2f} | "
                     f"{fmt(s['k_max'])} | {fmt(s['far_run_from'])} | "
                     f"{s['passing']}/{len(s['depth'])} | {by_depth} |")
        if not s["all_depths_pass"]:
          notes.append(f"- {label}, {task}, length {length}: {s['verdict']}")
      notes.append(f"- {label}, {task}: {t['verdict']} (threshold {t['threshold']:g})")
  return "\n".join(lines + ["", NEEDLE_LEGEND, ""] + notes)


def plot_needle(runs: list[dict], path: str, title: str) -> None:
  """One heat map per (scaling, task): rows = length, columns = depth %, colour = accuracy."""
  import numpy as np
  plt = _pyplot()
  tasks = list(dict.fromkeys(task for run in runs for task in run["tasks"]))
  fig, axes = plt.subplots(len(runs), len(tasks), squeeze=False,
                           figsize=(2.9 * len(tasks) + 1.2, 2.4 * len(runs) + 1.2))
  im = None
  for row, run in zip(axes, runs):
    for ax, task in zip(row, tasks):
      t = run["tasks"].get(task)
      ax.set_title(f"{task} [{run['rope_scaling']}]", fontsize=8)
      if t is None:
        ax.axis("off")
        continue
      lengths = list(t["lengths"])
      depths = sorted({d for s in t["lengths"].values() for d in s["depth"]})
      grid = np.full((len(lengths), len(depths)), np.nan)
      for i, length in enumerate(lengths):
        s = t["lengths"][length]
        for d, a in zip(s["depth"], s["accuracy"]):
          grid[i, depths.index(d)] = a
      im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
      for (i, j), a in np.ndenumerate(grid):
        if a == a:
          ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=6,
                  color="black" if a > 0.5 else "white")
      ax.set_yticks(range(len(lengths)), [str(x) for x in lengths], fontsize=7)
      ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
      ax.set_xlabel("needle depth (% of haystack)", fontsize=7)
      if ax is row[0]:
        ax.set_ylabel("length L (tokens)", fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, 0, 0.86, 0.95))
  if im is not None:
    cax = fig.add_axes((0.88, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax, label="accuracy")
  _save_figure(fig, path)
  plt.close(fig)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def matplotlib_ticker():
  import matplotlib.ticker
  return matplotlib.ticker


def plot_perplexity(runs: list[dict], path: str, title: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for run in runs:
    rs = sorted(run["results"], key=lambda r: r["window"])
    ax.plot([r["window"] for r in rs], [r["perplexity"] for r in rs], marker="o",
            label=run["rope_scaling"])
  ax.set_xscale("log", base=2)
  windows = sorted({r["window"] for run in runs for r in run["results"]})
  ax.set_xticks(windows, [str(w) for w in windows])
  ax.xaxis.set_minor_locator(matplotlib_ticker().NullLocator())
  values = [r["perplexity"] for run in runs for r in run["results"]]
  if values and max(values) > 10 * min(values):  # a blow-up past the window: log scale
    ax.set_yscale("log")
  ax.set_xlabel("evaluation window (tokens)")
  ax.set_ylabel("perplexity")
  ax.set_title(wrap(title, 6, 9), fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def plot_passkey(runs: list[dict], path: str, title: str) -> None:
  """One heatmap per scaling: rows = prompt length, columns = depth index (k grid)."""
  import numpy as np
  plt = _pyplot()
  # constrained: the (wrapped) titles, suptitle and colorbar get their room, none overlaps
  fig, axes = plt.subplots(1, len(runs), figsize=(3.5 * len(runs) + 1, 3.4), squeeze=False,
                           layout="constrained")
  for ax, run in zip(axes[0], runs):
    lengths = list(run["lengths"])
    depths = max(len(s["k"]) for s in run["lengths"].values())
    grid = np.full((len(lengths), depths), np.nan)
    for i, length in enumerate(lengths):
      acc = run["lengths"][length]["accuracy"]
      grid[i, :len(acc)] = acc
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
    ticks = sorted(set(np.linspace(0, depths - 1, min(depths, 8)).round().astype(int)))
    ax.set_xticks(ticks, [f"{t / depths:.2g}" for t in ticks])
    ax.set_xlabel("k / L (key distance from the end)")
    if ax is axes[0][0]:
      ax.set_ylabel("prompt length L (tokens)")
    ax.set_title(wrap(run["rope_scaling"], 3.0, 9), fontsize=9)
  fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
  fig.suptitle(wrap(title, 3.5 * len(runs) + 1, 9), fontsize=9)
  _save_figure(fig, path)
  plt.close(fig)


def wrap(text: str, width_inches: float, fontsize: float) -> str:
  """`text` broken into lines that fit `width_inches` at `fontsize` points (a character is
  about 0.6 em wide): long titles (two checkpoints' paths) are wrapped, never clipped."""
  import textwrap
  return textwrap.fill(str(text), max(10, int(width_inches * 72 / (0.6 * fontsize))))


def _save_figure(fig, path: str) -> None:
  fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
  with files.atomic_file(path, "wb") as f:
    # tight: the saved area grows to every title and label, none is cut at the figure's edge
    fig.savefig(f, dpi=120, format=fmt, bbox_inches="tight", pad_inches=0.1)
