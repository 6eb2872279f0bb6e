"""The miniature's results as the paper tabulates them, its findings as explicit checks, plots.

Table 1: perplexity by evaluation window; Table 3: perplexity at the extended window by
fine-tuning step; Table 4: passkey k_max by step (PI §3.3: the largest distance k such that
every k' <= k succeeds in >= 20% of its trials). The findings (a)-(c) are decided here from the
numbers, with the thresholds written next to each verdict.
"""

from __future__ import annotations

from miniature.experiment import LABELS
from pi_jax.evals.retrieval import MISSING

# Thresholds of the findings (stated in the report next to each verdict).
BLOWUP = 2.0  # (a) perplexity at the largest window over perplexity at L
IN_WINDOW = 0.05  # (b) PI's in-window perplexity within +5% of the base's
REACH = 0.75  # (c) PI's k_max >= 75% of L' ...
EARLY = 200  # ... at some checkpoint <= 200 steps
NEAR_L = 2.0  # (c) direct fine-tuning's k_max <= 2 L at those checkpoints


def fmt(x) -> str:
  if x is None:
    return MISSING
  if isinstance(x, int):
    return str(x)
  return f"{x:.3g}" if x >= 1000 else f"{x:.3f}"


def _arms(res: dict, factor: int) -> dict[str, dict[int, dict]]:
  """{method: {step: model}} for one factor, with step 0 = the base as that method starts it."""
  models = res["models"]
  out: dict[str, dict[int, dict]] = {}
  for m in models.values():
    if m.get("factor") == factor and m.get("step", 0) > 0 and m["method"] in LABELS:
      out.setdefault(m["method"], {})[m["step"]] = m
  starts = {"pi": f"base+linear:{factor}", "ntk": f"base+ntk:{factor}",
            "yarn": f"base+yarn:{factor}", "direct": "base"}
  for method, steps in out.items():
    if starts.get(method) in models:
      steps[0] = models[starts[method]]
  return out


def kmax(model: dict, length: int):
  s = model["passkey"].get(length)
  return None if s is None else s["k_max"]


def beyond(model: dict, length: int, L: int):
  """Mean passkey accuracy over the distances k >= L (past the original window)."""
  s = model["passkey"].get(length)
  if s is None:
    return None
  acc = [a for k, a in zip(s["k"], s["accuracy"]) if k >= L]
  return sum(acc) / len(acc) if acc else None


def findings(res: dict) -> list[dict]:
  """Each of the paper's three findings: reproduced or not, with the numbers that decide it."""
  L, models = res["trained_window"], res["models"]
  out = []
  base = models["base"]
  top = max(base["ppl"])
  ratio = base["ppl"][top] / base["ppl"][L]
  out.append({"finding": "(a) extrapolation past L blows up",
              "reproduced": ratio > BLOWUP,
              "numbers": f"base perplexity {fmt(base['ppl'][L])} at {L} -> {fmt(base['ppl'][top])} "
                         f"at {top} ({ratio:.2f}x; threshold > {BLOWUP}x)"})
  for f in res["plan"]["factors"]:
    W = L * f
    arms = _arms(res, f)
    pi, direct = arms.get("pi", {}), arms.get("direct", {})
    common = sorted(s for s in pi if s in direct and s > 0)
    if common:
      wins = [pi[s]["ppl"][W] <= direct[s]["ppl"][W] for s in common]
      last = common[-1]
      in_win = pi[last]["ppl"][L] / base["ppl"][L] - 1
      cells = ", ".join(f"step {s}: PI {fmt(pi[s]['ppl'][W])} vs direct {fmt(direct[s]['ppl'][W])}"
                        for s in common)
      out.append({"finding": f"(b) {f}x: at equal steps PI's perplexity at {W} is at or below "
                             "direct fine-tuning's",
                  "reproduced": all(wins), "numbers": cells})
      out.append({"finding": f"(b) {f}x: PI's in-window perplexity (at {L}) stays within "
                             f"{IN_WINDOW:.0%} of the base's",
                  "reproduced": in_win <= IN_WINDOW,
                  "numbers": f"base {fmt(base['ppl'][L])}, PI after {last} steps "
                             f"{fmt(pi[last]['ppl'][L])} ({in_win:+.1%})"})
      early = [s for s in common if s <= EARLY]
      pi_k = {s: kmax(pi[s], W) for s in common}
      dir_k = {s: kmax(direct[s], W) for s in common}
      reach = any((pi_k[s] or 0) >= REACH * W for s in early)
      stays = all((dir_k[s] or 0) <= NEAR_L * L for s in early)
      out.append({"finding": f"(c) {f}x: PI's k_max reaches ~{W} within the first checkpoints "
                             f"while direct fine-tuning's stays near {L}",
                  "reproduced": bool(early) and reach and stays,
                  "numbers": "; ".join(f"step {s}: PI {fmt(pi_k[s])}, direct {fmt(dir_k[s])}"
                                       for s in common)
                             + f" (thresholds: PI >= {REACH:g}x{W} = {int(REACH * W)} at some "
                               f"step <= {EARLY}; direct <= {NEAR_L:g}x{L} = {int(NEAR_L * L)} "
                               f"at those steps)"})
  return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(res: dict) -> list[str]:
  """Tables 1, 3, 4, in-window perplexity and the findings, as Markdown lines."""
  L, windows, models, plan = res["trained_window"], res["windows"], res["models"], res["plan"]
  base = models["base"]
  lines = []
  # Table 1
  rows = [["base (no scaling: extrapolation)", "0"] + [fmt(base["ppl"].get(w)) for w in windows]]
  for f in plan["factors"]:
    for kind in plan["zero_shot"]:
      m = models.get(f"base+{kind}:{f}")
      if m:
        rows.append([f"base + {kind}:{f}, no fine-tuning", "0"]
                    + [fmt(m["ppl"].get(w)) for w in windows])
    for method, steps in _arms(res, f).items():
      last = max(steps)
      if last:
        rows.append([f"{LABELS[method]} to {L * f}", str(last)]
                    + [fmt(steps[last]["ppl"].get(w)) for w in windows])
  control = sorted((m for m in models.values() if m.get("method") == "control"),
                   key=lambda m: m["step"])
  if control:
    m = control[-1]
    rows.append([f"{LABELS['control']} ({L})", str(m["step"])]
                + [fmt(m["ppl"].get(w)) for w in windows])
  lines += ["### Table 1: perplexity by evaluation window (held-out books)", "",
            *_table(["model", "steps"] + [str(w) for w in windows], rows), "",
            "'–': beyond the model's window, not evaluated (as in the paper).", ""]
  # Table 3 and Table 4
  for f in plan["factors"]:
    W = L * f
    arms = _arms(res, f)
    steps = sorted({s for a in arms.values() for s in a})
    if not arms:
      continue
    rows3 = [[LABELS[m]] + [fmt(a[s]["ppl"].get(W)) if s in a else "" for s in steps]
             for m, a in arms.items()]
    rows4 = [[LABELS[m]] + [fmt(kmax(a[s], W)) if s in a else "" for s in steps]
             for m, a in arms.items()]
    rows4b = [[LABELS[m]] + [fmt(beyond(a[s], W, L)) if s in a else "" for s in steps]
              for m, a in arms.items()]
    lines += [f"### Table 3 ({f}x): perplexity at {W} by fine-tuning step", "",
              *_table(["method"] + [str(s) for s in steps], rows3), "",
              f"### Table 4 ({f}x): passkey k_max at {W} by fine-tuning step", "",
              *_table(["method"] + [str(s) for s in steps], rows4), "",
              "Step 0 is the base model as each arm starts from it (PI: linear scaling, "
              "direct: no scaling). k_max: the largest distance k of the grid such that every "
              "k' <= k succeeds in >= 20% of its trials ('–': not even the nearest).", "",
              f"Passkey accuracy at {W}, mean over the distances k >= {L} (past the original "
              "window; not in the paper, shown because k_max stops at the first miss):", "",
              *_table(["method"] + [str(s) for s in steps], rows4b), ""]
  # Zero shot at L': every scaling of the base with no fine-tuning, side by side
  rows = []
  for f in plan["factors"]:
    W = L * f
    scalings = [("none (extrapolation)", "base")] + [
        (f"{kind}:{f}", f"base+{kind}:{f}") for kind in plan["zero_shot"]]
    for label, name in scalings:
      m = models.get(name)
      s = m and m["passkey"].get(W)
      if s:
        rows.append([str(W), label, fmt(m["ppl"].get(W)), f"{s['mean_accuracy']:.2f}",
                     fmt(s["k_max"])])
  if rows:
    lines += ["### Zero shot at the extended window (the base, no fine-tuning)", "",
              *_table(["window", "scaling", "perplexity", "passkey mean accuracy", "k_max"], rows),
              ""]
  # In-window quality and the base's retrieval inside L
  rows = [[m["name"], fmt(m["ppl"].get(L)), f"{m['ppl'][L] / base['ppl'][L] - 1:+.1%}"]
          for m in models.values() if L in m["ppl"]]
  lines += [f"### In-window perplexity (at {L}) before and after", "",
            *_table(["model", f"perplexity at {L}", "vs base"], rows), ""]
  pk = base["passkey"].get(L)
  if pk:
    lines += [f"The base's passkey retrieval inside its window ({L}): mean accuracy "
              f"{pk['mean_accuracy']:.2f} over {len(pk['k'])} distances in [0, {L}), "
              f"k_max {fmt(pk['k_max'])}; by real distance (k tokens: accuracy): "
              + ", ".join(f"{k}: {a:.1f}" for k, a in zip(pk["k"], pk["accuracy"])) + ".", ""]
  lines += ["### The paper's findings, checked", ""]
  for x in findings(res):
    verdict = "**reproduced**" if x["reproduced"] else "**not reproduced**"
    lines.append(f"- {x['finding']}: {verdict}. {x['numbers']}.")
  return lines + [""]


def _legend(ax, **kwargs) -> None:
  """A legend when the axes have labelled lines (a run still under way may have none yet)."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(**kwargs)


def _save(fig, folder: str, name: str) -> str:
  """Lays out, writes and closes one figure; returns its file name."""
  import os
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(os.path.join(folder, name), dpi=110, bbox_inches="tight", pad_inches=0.1)
  plt.close(fig)
  return name


def plots(res: dict, folder: str) -> list[str]:
  """Writes the PNG plots into `folder`; returns their file names."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  L, windows, models, plan = res["trained_window"], res["windows"], res["models"], res["plan"]
  names = []
  # Table 1
  fig, ax = plt.subplots(figsize=(9, 4.4))
  shown = [m for m in models.values()
           if not m["step"] or m["step"] == max(s["step"] for s in models.values()
                                                if s.get("method") == m.get("method")
                                                and s.get("factor") == m.get("factor"))]
  colors = plt.get_cmap("tab20" if len(shown) > 10 else "tab10").colors
  for i, m in enumerate(shown):
    ws = sorted(m["ppl"])
    label = (f"{m['name']}" if m["step"] == 0 else
             f"{LABELS.get(m['method'], m['method'])} {m['factor']}x, {m['step']} steps")
    ax.plot(ws, [m["ppl"][w] for w in ws], "--" if m["step"] == 0 else "-", marker="o",
            label=label, color=colors[i % len(colors)])
  ax.axvline(L, color="gray", lw=0.8, ls=":")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xticks(windows, [str(w) for w in windows])
  ax.set_xlabel("evaluation window (tokens)")
  ax.set_ylabel("perplexity (held-out books)")
  ax.set_title(res.get("title", f"Table 1 in miniature: base trained at {L}"), fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  _legend(ax, fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
  names.append(_save(fig, folder, "table1_perplexity_by_window.png"))
  # Tables 3 and 4
  factors = plan["factors"]
  fig, axes = plt.subplots(2, len(factors), figsize=(5 * len(factors), 6.5), squeeze=False)
  for col, f in enumerate(factors):
    W = L * f
    for method, steps in _arms(res, f).items():
      ss = sorted(steps)
      axes[0][col].plot(ss, [steps[s]["ppl"][W] for s in ss], marker="o", label=LABELS[method])
      axes[1][col].plot(ss, [kmax(steps[s], W) or 0 for s in ss], marker="o",
                        label=LABELS[method])
    axes[0][col].set_title(f"Table 3: perplexity at {W} ({f}x)", fontsize=9)
    axes[0][col].set_yscale("log")
    axes[1][col].set_title(f"Table 4: passkey k_max at {W} ({f}x)", fontsize=9)
    axes[1][col].axhline(L, color="gray", lw=0.8, ls=":", label=f"L = {L}")
    axes[1][col].axhline(W, color="black", lw=0.8, ls=":", label=f"L' = {W}")
    for ax in axes[:, col]:
      ax.set_xlabel("fine-tuning steps")
      ax.grid(True, alpha=0.3)
      _legend(ax, fontsize=7)
  names.append(_save(fig, folder, "tables3_4_by_step.png"))
  # Passkey accuracy by distance, final checkpoints
  fig, axes = plt.subplots(1, len(factors), figsize=(5 * len(factors), 3.6), squeeze=False)
  for col, f in enumerate(factors):
    W = L * f
    ax = axes[0][col]
    for method, steps in _arms(res, f).items():
      s = steps[max(steps)]["passkey"].get(W)
      if s:
        ax.plot(s["k"], s["accuracy"], marker=".", label=f"{LABELS[method]}, {max(steps)} steps")
    b = models["base"]["passkey"].get(W)
    if b:
      ax.plot(b["k"], b["accuracy"], ls="--", color="gray", label="base, no scaling")
    ax.axvline(L, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("distance k of the key from the question (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"passkey at {W} ({f}x)", fontsize=9)
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=7)
  names.append(_save(fig, folder, "passkey_by_distance.png"))
  return names
