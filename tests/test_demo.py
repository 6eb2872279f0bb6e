"""demo.py and the miniature: the committed base, the pipeline end to end at a tiny size, the
findings' verdicts."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from miniature import report as mini_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "assets", "mini_base")


def _demo(*args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(REPO, "demo.py"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_committed_mini_base_is_small_described_and_in_the_papers_regime():
  with open(os.path.join(BASE, "config.json")) as f:
    config = json.load(f)
  assert config["max_position_embeddings"] == 256 and config["head_dim"] == 64
  assert config["rope_theta"] == 500.0 and config["vocab_size"] == 1024
  assert os.path.isfile(os.path.join(BASE, "tokenizer", "tokenizer.json"))
  size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(BASE, "**"), recursive=True)
             if os.path.isfile(p))
  assert size < 15e6, f"assets/mini_base is {size} bytes; keep the committed model small"
  with open(os.path.join(BASE, "README.md")) as f:
    readme = f.read()
  assert "python demo.py pretrain" in readme


def test_committed_mini_base_retrieves_the_key_at_distances_across_its_window():
  """The demo's premise: the base retrieves inside L (fresh keys, not the published summary)."""
  from pi_jax import checkpoint, tokenizer
  from pi_jax.evals import passkey
  config, params = checkpoint.load_checkpoint(BASE)
  tok = tokenizer.load_tokenizer(os.path.join(BASE, "tokenizer"))
  builder = passkey.PromptBuilder(tok, passkey.get_template("mini"))
  trials = builder.trials([256], depths=8, num_trials=3, seed=123)
  assert len({t.actual_k for t in trials}) == 7  # k = 0 and 32 both clip to the nearest (~37)
  results = passkey.run_trials(config, params, tok, trials, mode="score", batch_size=24)
  accuracy = sum(r["success"] for r in results) / len(results)
  assert accuracy >= 0.9, [(r["k"], r["success"]) for r in results]


def test_quick_demo_runs_pi_and_direct_fine_tuning_and_reports_the_runs_numbers(tmp_path):
  out = tmp_path / "demo"
  proc = _demo("--quick", "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = (out / "report.md").read_text()
  assert "status: **complete**" in report
  for name in ("table1_perplexity_by_window.png", "tables3_4_by_step.png",
               "passkey_by_distance.png"):
    assert (out / name).stat().st_size > 1000

  def ppl(name):
    (run,) = json.loads((out / "evals" / f"{name}.perplexity.json").read_text())["runs"]
    return {r["window"]: r["perplexity"] for r in run["results"]}

  # Table 1's rows are the numbers eval.py wrote in this run.
  rows = {m.group(1): [float(x) for x in m.group(3, 4, 5)] for m in re.finditer(
      r"^\| (base \(no scaling: extrapolation\)|PI fine-tuning to 1024|direct fine-tuning to "
      r"1024) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", report, re.M)}
  assert len(rows) == 3, report
  for row, name in (("base (no scaling: extrapolation)", "base"),
                    ("PI fine-tuning to 1024", "pi4@2"), ("direct fine-tuning to 1024", "direct4@2")):
    want = ppl(name)
    assert rows[row] == pytest.approx([want[256], want[512], want[1024]], abs=6e-4)
  assert report.count("**reproduced**") + report.count("**not reproduced**") == 4

  # The fine-tuned checkpoints have the extended windows and scalings, and stay where a reader
  # can evaluate them again.
  pi = json.loads((out / "checkpoints" / "pi4" / "step2" / "config.json").read_text())
  ft = json.loads((out / "checkpoints" / "direct4" / "step2" / "config.json").read_text())
  assert (pi["rope_scaling"]["kind"], pi["rope_scaling"]["factor"]) == ("linear", 4.0)
  assert pi["max_position_embeddings"] == 1024
  assert ft["max_position_embeddings"] == 1024 and ft["rope_scaling"]["kind"] == "none"
  assert (out / "checkpoints" / "base" / "config.json").is_file()

  # Each command is listed with its timing, and its log exists; a rerun recomputes nothing.
  commands = re.findall(r"^\| \d+ \| .* \| `python (?:train|eval)\.py .*` \|", report, re.M)
  assert len(commands) == 10, report
  assert len(list((out / "logs").glob("*.log"))) == 10
  again = _demo("--quick", "--out", str(out))
  assert again.returncode == 0 and again.stdout.count("done before") == 10
  # ... and its report still lists every command, with the earlier run's times.
  resumed = (out / "report.md").read_text()
  assert re.findall(r"^\| \d+ \| .* \| `python (?:train|eval)\.py .*` \|", resumed, re.M) == [
      re.sub(r"^(\| \d+ \| [^|]*?) \|", r"\1 (an earlier run) |", c, count=1) for c in commands]


def _model(name, method, factor, step, ppl, kmax, L=256):
  W = L * factor
  return {"name": name, "method": method, "factor": factor, "step": step, "ppl": ppl,
          "passkey": {W: {"k_max": kmax, "k": [0], "accuracy": [1.0], "mean_accuracy": 1.0}}}


def test_findings_verdicts_follow_the_numbers():
  res = {"trained_window": 256, "windows": [256, 1024],
         "plan": {"factors": [4], "zero_shot": ["linear"]},
         "models": {"base": _model("base", "none", 1, 0, {256: 10.0, 1024: 50.0}, 200, L=64)}}
  res["models"]["base"]["passkey"][256] = {"k_max": 240, "k": [0], "accuracy": [1.0],
                                          "mean_accuracy": 1.0}
  for step, pi, ft, pk, fk in ((100, 11.0, 12.0, 900, 300), (200, 10.3, 11.0, 960, 400)):
    res["models"][f"pi4@{step}"] = _model(f"pi4@{step}", "pi", 4, step, {256: pi, 1024: pi}, pk)
    res["models"][f"direct4@{step}"] = _model(f"direct4@{step}", "direct", 4, step,
                                              {256: ft, 1024: ft}, fk)
  verdicts = [x["reproduced"] for x in mini_report.findings(res)]
  assert verdicts == [True, True, True, True]
  res["models"]["pi4@200"]["ppl"][256] = 10.8  # +8% inside the window
  res["models"]["direct4@100"]["passkey"][1024]["k_max"] = 700  # direct reaches far too
  verdicts = [x["reproduced"] for x in mini_report.findings(res)]
  assert verdicts == [True, True, False, False]
  assert "\n".join(mini_report.markdown(res)).count("**not reproduced**") == 2


def test_full_plan_renders_every_arm_factor_and_the_control(tmp_path):
  """`demo.py --full`'s report (hours of runs) renders every table and plot for its plan."""
  from miniature import experiment
  plan = experiment.FULL
  L, windows = 256, [256, 512, 1024, 2048]
  ppl = lambda w_max, x: {w: x for w in windows if w <= w_max}
  res = {"trained_window": L, "windows": windows, "plan": dataclasses.asdict(plan), "models": {
      "base": _model("base", "none", 1, 0, ppl(2048, 20.0), 240)}}
  for f in plan.factors:
    res["models"]["base"]["passkey"][L * f] = {"k_max": None, "k": [0], "accuracy": [0.0],
                                               "mean_accuracy": 0.0}
    for kind in plan.zero_shot:
      res["models"][f"base+{kind}:{f}"] = _model(f"base+{kind}:{f}", f"{kind} zero-shot", f, 0,
                                                 ppl(L * f, 40.0), None)
    for method in plan.methods:
      extra = plan.direct_steps if method == "direct" else ()
      for s in (*plan.steps, *extra):
        res["models"][f"{method}{f}@{s}"] = _model(f"{method}{f}@{s}", method, f, s,
                                                   ppl(L * f, 20.0 + 1 / s), 64)
  for s in plan.steps:
    res["models"][f"control@{s}"] = {**_model(f"control@{s}", "control", 1, s, ppl(2048, 19.0),
                                              240), "factor": 1}
  text = "\n".join(mini_report.markdown(res))
  for f in plan.factors:
    assert f"### Table 3 ({f}x)" in text and f"### Table 4 ({f}x)" in text
    for label in ("PI fine-tuning", "direct fine-tuning", "NTK fine-tuning", "YaRN fine-tuning"):
      assert f"| {label} |" in text
  assert "| direct fine-tuning to 1024 | 800 |" in text  # the further direct checkpoint
  assert f"| keep training at L ({L}) | {max(plan.steps)} |" in text
  assert text.count("(c) ") == len(plan.factors)
  zero_shot = text.split("### Zero shot at the extended window")[1].split("###")[0]
  assert zero_shot.count("| 2048 |") == 1 + len(plan.zero_shot)  # the base and each scaling
  assert "| 2048 | yarn:8 | 40.000 | 1.00 | – |" in zero_shot
  names = mini_report.plots(res, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == sorted(names) and len(names) == 3


def test_missing_base_checkpoint_is_a_clear_error(tmp_path):
  proc = _demo("--quick", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
               timeout=60)
  assert proc.returncode == 2
  assert "nope" in proc.stderr and "no checkpoint" in proc.stderr


def test_bad_step_list_is_a_clear_error(tmp_path):
  proc = _demo("--steps", "100,x", "--out", str(tmp_path / "o"), timeout=60)
  assert proc.returncode == 2
  assert "100,x" in proc.stderr


def test_the_base_passkey_share_comes_from_its_summary_or_its_run(tmp_path):
  """The committed base records it in pretrain_summary.json; a run's final checkpoint in the
  run's run_config.json; anything else is unrecorded (the report says so, never 'None')."""
  from miniature import demo_report
  from miniature.experiment import base_passkey_fraction
  assert base_passkey_fraction(BASE) == 0.5
  run = tmp_path / "run"
  (run / "final").mkdir(parents=True)
  (run / "run_config.json").write_text(json.dumps({"passkey_fraction": 0.25}))
  assert base_passkey_fraction(str(run / "final")) == 0.25
  (tmp_path / "bare").mkdir()
  assert base_passkey_fraction(str(tmp_path / "bare")) is None
  assert demo_report.share(None) == "an unrecorded share" and demo_report.share(0.5) == "0.5"
