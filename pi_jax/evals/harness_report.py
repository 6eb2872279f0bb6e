"""Tables and plots for lm-eval results and ROUGE: several models side by side (Tables 5, 6).

No lm_eval import: these read the JSON records eval.py writes.
"""

from __future__ import annotations

from pi_jax.evals import report

# The metric a task is reported by, in order of preference (lm-eval's names, filter "none").
PRIMARY = ("acc_norm", "acc", "exact_match", "word_perplexity", "f1", "em")


def primary_metric(task_results: dict) -> tuple[str, str] | None:
  """(metric name, its key in lm-eval's results) for a task, or None."""
  keys = [k for k in task_results if "," in k and not k.split(",")[0].endswith("_stderr")]
  for name in PRIMARY:
    for k in keys:
      if k.split(",")[0] == name:
        return name, k
  return (keys[0].split(",")[0], keys[0]) if keys else None


def harness_table(runs: list[dict]) -> str:
  """Rows: task and metric; columns: one per run (checkpoint, scaling); cells: the value."""
  tasks = list(dict.fromkeys(t for run in runs for t in run["results"]))
  lines = ["| task | metric | " + " | ".join(run["label"] for run in runs) + " |",
           "|---|---|" + "---|" * len(runs)]
  for task in tasks:
    keys = list(dict.fromkeys(k for run in runs for k in run["results"].get(task, {})
                              if "," in k and "_stderr" not in k))
    for k in keys:
      cells = []
      for run in runs:
        v = run["results"].get(task, {}).get(k)
        cells.append("–" if not isinstance(v, (int, float)) else f"{v:.4f}")
      lines.append(f"| {task} | {k.replace(',none', '')} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_harness(runs: list[dict], path: str, title: str) -> None:
  """Grouped bars: each task's primary metric, one bar per run."""
  import numpy as np
  plt = report._pyplot()
  tasks = list(dict.fromkeys(t for run in runs for t in run["results"]))
  fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(tasks) * max(1, len(runs)) / 2 + 2), 4))
  width = 0.8 / max(len(runs), 1)
  labels = []
  for t in tasks:
    found = next((primary_metric(r["results"][t]) for r in runs if t in r["results"]), None)
    labels.append(f"{t}\n{found[0] if found else ''}")
  for i, run in enumerate(runs):
    values = []
    for t in tasks:
      res = run["results"].get(t, {})
      m = primary_metric(res)
      values.append(res[m[1]] if m and isinstance(res.get(m[1]), (int, float)) else np.nan)
    xs = np.arange(len(tasks)) + (i - (len(runs) - 1) / 2) * width
    bars = ax.bar(xs, values, width, label=run["label"])
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
  ax.set_xticks(np.arange(len(tasks)), labels, fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  report._save_figure(fig, path)
  plt.close(fig)


def rouge_table(runs: list[dict]) -> str:
  lines = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | documents | truncated |",
           "|---|---|---|---|---|---|"]
  for run in runs:
    r = run["rouge"]
    lines.append(f"| {run['label']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} "
                 f"| {run['documents']} | {run['truncated']} |")
  return "\n".join(lines)


def plot_rouge(runs: list[dict], path: str, title: str) -> None:
  import numpy as np
  plt = report._pyplot()
  names = ("rouge1", "rouge2", "rougeL")
  fig, ax = plt.subplots(figsize=(6, 4))
  width = 0.8 / max(len(runs), 1)
  for i, run in enumerate(runs):
    xs = np.arange(3) + (i - (len(runs) - 1) / 2) * width
    bars = ax.bar(xs, [run["rouge"][n] for n in names], width, label=run["label"])
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
  ax.set_xticks(np.arange(3), ["ROUGE-1", "ROUGE-2", "ROUGE-L"])
  ax.set_ylabel("F1 × 100")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  report._save_figure(fig, path)
  plt.close(fig)
