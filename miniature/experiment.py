"""The miniature's plan and its execution: every model, fine-tuning arm, checkpoint and evaluation.

Every arm starts from the same base (trained at L tokens), reads the same fine-tuning text and
the same number of tokens per step, with the paper's recipe (configs/mini_extend.py):

  extrapolation  the base at longer windows, no scaling, no fine-tuning
  zero shot      the base with PI (linear), NTK or YaRN scaling by the factor, no fine-tuning
  pi             PI fine-tuning: positions × L/L' (rope_scaling linear:f), seq_len L'
  direct         direct fine-tuning: window L', no interpolation
  ntk, yarn      fine-tuning with NTK-aware or YaRN scaling
  control        keep training at L (seq_len L): "more training" without "longer window"

Each fine-tuned arm is trained in stages (train.py resumes its own run), and the model after
each stage is kept under OUT/checkpoints/ and evaluated: sliding-window perplexity on held-out
books at every window up to its own, and passkey retrieval at its window (score mode, the
miniature's prompt, `passkey_depths` distances × `passkey_trials` keys). Outputs that exist are
not recomputed, so an interrupted run picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os

from miniature.runner import REPO, Runner

HELDOUT = "data/pg19_standin/Psa_14?.txt"  # Psalms 140-149: never in pre-training or fine-tuning
EXTEND_CONFIG = "configs/mini_extend.py"
SCALED = {"pi": "linear", "ntk": "ntk", "yarn": "yarn"}  # arm -> RoPE scaling kind
LABELS = {"pi": "PI fine-tuning", "direct": "direct fine-tuning", "ntk": "NTK fine-tuning",
          "yarn": "YaRN fine-tuning", "control": "keep training at L"}


@dataclasses.dataclass(frozen=True)
class Plan:
  base: str = "assets/mini_base"
  factors: tuple[int, ...] = (4,)
  methods: tuple[str, ...] = ("pi", "direct")  # fine-tuned arms at every factor
  steps: tuple[int, ...] = (100, 200)  # checkpoints evaluated (the base is step 0)
  direct_steps: tuple[int, ...] = ()  # further checkpoints of direct fine-tuning only
  control: bool = False  # also keep training at L for max(steps)
  zero_shot: tuple[str, ...] = ("linear", "yarn")  # scalings of the base, no fine-tuning
  tokens_per_step: int = 4096
  learning_rate: float = 3e-4
  heldout_docs: int = 8
  heldout_tokens: int = 4096  # per document, BOS included
  passkey_depths: int = 16
  passkey_trials: int = 10
  seed: int = 0
  # Ablation (not the paper's recipe): this share of fine-tuning rows are passkey episodes at
  # the new window. 0 = plain text, as in the paper.
  ft_passkey_fraction: float = 0.0

  def __post_init__(self):
    unknown = set(self.methods) - set(LABELS)
    if unknown:
      raise ValueError(f"unknown fine-tuning methods {sorted(unknown)}; known: {sorted(LABELS)}")
    if not 0.0 <= self.ft_passkey_fraction <= 1.0:
      raise ValueError(f"ft_passkey_fraction must be in [0, 1], got {self.ft_passkey_fraction}")
    if not self.steps or list(self.steps) != sorted(set(self.steps)) or self.steps[0] < 1:
      raise ValueError(f"steps must be increasing positive integers, got {self.steps}")


DEMO = Plan()
FULL = Plan(factors=(4, 8), methods=("pi", "direct", "ntk", "yarn"), steps=(50, 100, 200, 400),
            direct_steps=(800,), control=True, zero_shot=("linear", "ntk", "yarn"))
QUICK = Plan(steps=(2,), zero_shot=("linear",), tokens_per_step=2048, heldout_docs=1,
             heldout_tokens=1100, passkey_depths=4, passkey_trials=2)


def base_passkey_fraction(base: str) -> float | None:
  """The share of the base's pre-training rows that were passkey episodes: from its
  pretrain_summary.json (the committed base), else from the run_config.json of the training run
  whose final checkpoint it is (runs/<run>/final); None when neither says."""
  for path in (os.path.join(base, "pretrain_summary.json"),
               os.path.join(os.path.dirname(os.path.normpath(base)), "run_config.json")):
    if os.path.isfile(path):
      fraction = _load(path).get("passkey_fraction")
      if fraction is not None:
        return fraction
  return None


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


class Experiment:
  """Runs a Plan into OUT (checkpoints/, evals/, runs/, logs/) and collects the results."""

  def __init__(self, plan: Plan, run: Runner, out: str):
    self.plan, self.run, self.out = plan, run, out
    base_config = _load(os.path.join(REPO, plan.base, "config.json"))
    self.base_config = base_config
    self.L = int(base_config["max_position_embeddings"])
    top = max(plan.factors)
    self.windows = [self.L * 2 ** i for i in range(top.bit_length())]
    self.windows = sorted(set(self.windows) | {self.L * f for f in plan.factors})
    self.models: dict[str, dict] = {}
    for sub in ("checkpoints", "evals", "runs"):
      os.makedirs(os.path.join(out, sub), exist_ok=True)

  # -- evaluation --

  def evaluate(self, name: str, ckpt: str, scaling: str | None, window: int,
               passkey_lengths: list[int], **info) -> dict:
    """Perplexity at every window <= `window` and passkey at `passkey_lengths`; cached."""
    p = self.plan
    wins = [w for w in self.windows if w <= window]
    scale = ["--rope-scaling", scaling] if scaling else []
    ppl_json = os.path.join(self.out, "evals", f"{name}.perplexity.json")
    what = f"perplexity of {name} at {', '.join(map(str, wins))}"
    if os.path.isfile(ppl_json):
      self.run.skipped(f"ppl_{name}", what, ppl_json)
    else:
      self.run(f"ppl_{name}", [
          "eval.py", "perplexity", "--ckpt", ckpt, *scale, "--data", HELDOUT,
          "--max-docs", str(p.heldout_docs), "--max-tokens", str(p.heldout_tokens),
          "--windows", ",".join(map(str, wins)), "--stride", str(self.L), "--batch-size", "8",
          "--no-progress", "--json", ppl_json], what)
    pk_json = os.path.join(self.out, "evals", f"{name}.passkey.json")
    what = (f"passkey of {name} at {', '.join(map(str, passkey_lengths))} "
            f"({p.passkey_depths} distances x {p.passkey_trials} keys)")
    if os.path.isfile(pk_json):
      self.run.skipped(f"passkey_{name}", what, pk_json)
    else:
      self.run(f"passkey_{name}", [
          "eval.py", "passkey", "--ckpt", ckpt, *scale, "--template", "mini", "--mode", "score",
          "--lengths", ",".join(map(str, passkey_lengths)), "--depths", str(p.passkey_depths),
          "--trials", str(p.passkey_trials), "--seed", str(p.seed), "--batch-size", "8",
          "--no-progress", "--json", pk_json], what)
    (ppl_run,) = _load(ppl_json)["runs"]
    (pk_run,) = _load(pk_json)["runs"]
    model = {"name": name, "checkpoint": os.path.relpath(ckpt, self.out) if ckpt.startswith(
                 self.out) else ckpt, "scaling": ppl_run["rope_scaling"], "window": window,
             "ppl": {int(r["window"]): float(r["perplexity"]) for r in ppl_run["results"]},
             "passkey": {int(length): {k: v for k, v in s.items()}
                         for length, s in pk_run["lengths"].items()},
             "evals": [os.path.relpath(ppl_json, self.out), os.path.relpath(pk_json, self.out)],
             **info}
    self.models[name] = model
    return model

  # -- fine-tuning --

  def fine_tune(self, method: str, factor: int, steps: list[int]) -> None:
    """Trains one arm in stages; evaluates the model after each stage."""
    p, L = self.plan, self.L
    W = L * factor
    arm = f"{method}{factor}" if method != "control" else "control"
    workdir = os.path.join(self.out, "runs", arm)
    extend = {"pi": [f"rope_scaling=linear:{factor}"], "ntk": [f"rope_scaling=ntk:{factor}"],
              "yarn": [f"rope_scaling=yarn:{factor}"], "direct": [f"max_position_embeddings={W}"],
              "control": []}[method]
    batch = max(1, p.tokens_per_step // W)
    for s in steps:
      ckpt = os.path.join(self.out, "checkpoints", arm, f"step{s}")
      what = f"{LABELS[method]} to {W} ({factor}x): {s} steps of {batch}x{W} tokens"
      argv = ["train.py", "--config", EXTEND_CONFIG, "--set", f"init_checkpoint={p.base}",
              "--set", f"workdir={workdir}", "--set", f"seq_len={W}",
              "--set", f"global_batch={batch}", "--set", f"steps={s}",
              "--set", f"learning_rate={p.learning_rate}", "--set", f"loss_chunk={min(W, 1024)}",
              "--set", f"seed={p.seed}"]
      for item in extend:
        argv += ["--set", item]
      if p.ft_passkey_fraction and method != "control":
        argv += ["--set", f"passkey_fraction={p.ft_passkey_fraction:g}",
                 "--set", "passkey_template=mini"]
      self.run.train(f"train_{arm}_{s}", what, argv, workdir, ckpt)
      self.evaluate(f"{arm}@{s}", ckpt, None, W if method != "control" else max(self.windows),
                    [W] if method != "control" else [L],
                    method=method, factor=factor if method != "control" else 1, step=s,
                    seq_len=W, batch=batch)

  # -- the whole plan --

  def run_all(self) -> dict:
    p, L = self.plan, self.L
    base_ckpt = os.path.join(self.out, "checkpoints", "base")
    if not os.path.exists(base_ckpt):  # where a reader finds every compared model
      os.symlink(os.path.join(REPO, p.base), base_ckpt)
    self.evaluate("base", p.base, "none", max(self.windows), [L] + [L * f for f in p.factors],
                  method="none", factor=1, step=0)
    for f in p.factors:
      for kind in p.zero_shot:
        self.evaluate(f"base+{kind}:{f}", p.base, f"{kind}:{f}", L * f, [L * f],
                      method=f"{kind} zero-shot", factor=f, step=0)
    for f in p.factors:
      for method in p.methods:
        extra = p.direct_steps if method == "direct" else ()
        self.fine_tune(method, f, list(p.steps) + [s for s in extra if s > max(p.steps)])
    if p.control:
      self.fine_tune("control", 1, list(p.steps))
    return self.results()

  def results(self) -> dict:
    return {"plan": dataclasses.asdict(self.plan), "trained_window": self.L,
            "windows": self.windows, "base_config": self.base_config,
            "base_passkey_fraction": base_passkey_fraction(os.path.join(REPO, self.plan.base)),
            "models": self.models}
