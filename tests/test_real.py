"""demo.py --real (miniature/real.py): the real-model pipeline end to end at toy sizes, its base
check, and its FLOP count against the parameters a checkpoint really holds."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from miniature import real, sizing
from miniature.runner import Runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "assets", "mini_base")


def _demo(*args, timeout=600):
  return subprocess.run([sys.executable, os.path.join(REPO, "demo.py"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


# The smoke run (about 90 s) is made once: its tests share one xdist worker and the fixture
# outlives the module there.
pytestmark = pytest.mark.xdist_group("real_smoke")


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("real") / "smoke"
  proc = _demo("--real", "--smoke", "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return out, proc


def _table(report: str, title: str) -> dict[str, list[str]]:
  """{first cell: other cells} of the Markdown table under the heading that starts `title`."""
  block = report.split(title, 1)[1].split("\n\n", 2)[1]
  rows = [r.strip("|").split("|") for r in block.splitlines()[2:]]
  return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def test_smoke_run_writes_checkpoints_every_table_plots_and_consistent_numbers(smoke):
  out, proc = smoke
  plan = real.SMOKE
  report = (out / "report.md").read_text()
  assert "status: **complete**" in report
  assert "FLOPs" in report and "expected s" in report  # the sizing, printed before starting
  assert "Sizing of `--smoke`" in proc.stdout
  for method in ("pi", "direct"):
    for s in plan.steps:
      assert (out / "checkpoints" / method / f"step{s}" / "config.json").is_file()
  with open(out / "checkpoints" / "pi" / f"step{plan.steps[-1]}" / "config.json") as f:
    assert json.load(f)["rope_scaling"]["kind"] == "linear"
  with open(out / "checkpoints" / "direct" / f"step{plan.steps[-1]}" / "config.json") as f:
    assert json.load(f)["max_position_embeddings"] == 1024
  for name in ("table1_perplexity_by_window.png", "tables3_4_by_step.png",
               "passkey_by_distance.png"):
    assert (out / name).stat().st_size > 10_000
    assert f"]({name})" in report
  for title in ("### Base check", "### Table 1", "### Table 3", "### Table 4",
                "### In-window perplexity", "### The paper's findings, checked"):
    assert title in report, title
  assert "Status: **matches**" in report

  results = json.loads((out / "results.json").read_text())
  assert results["status"] == "complete"
  models = results["results"]["models"]
  assert set(models) == {"base", "base+linear:4", "pi@1", "pi@2", "direct@1", "direct@2"}
  # Every number in Table 3 is the one eval.py wrote for that checkpoint.
  table3 = _table(report, "### Table 3")
  for label, method, start in (("PI fine-tuning", "pi", "base+linear:4"),
                               ("direct fine-tuning", "direct", "base")):
    names = [start] + [f"{method}@{s}" for s in plan.steps]
    want = []
    for name in names:
      with open(out / "evals" / f"{name.split('+')[0]}.perplexity.json") as f:
        runs = json.load(f)["runs"]
      run = next(r for r in runs if r["rope_scaling"] == models[name]["scaling"])
      want.append(next(r["perplexity"] for r in run["results"] if r["window"] == 1024))
    got = [float(x) for x in table3[label]]
    np.testing.assert_allclose(got, want, rtol=2e-3)
  # Table 1 has every window for the base and the last checkpoints.
  table1 = _table(report, "### Table 1")
  assert all(len(v) == 1 + len(plan.windows) and "–" not in v for v in table1.values())
  verdicts = [f["verdict"] for f in results["findings"]]
  assert len(verdicts) == 4 and set(verdicts) <= {"reproduced", "not reproduced"}
  # No machine path but the output folder the test chose (committed results carry none).
  bare = report.replace(str(out), "OUT")
  assert not re.search(r"/(tmp|work|root|home)/", bare), re.findall(r"\S*/(?:tmp|work)/\S*", bare)


def test_smoke_rerun_recomputes_nothing(smoke):
  out, _ = smoke
  proc = _demo("--real", "--smoke", "--out", str(out), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "$ python train.py" not in proc.stdout and "$ python eval.py" not in proc.stdout
  assert proc.stdout.count("done before") == 16


def test_base_check_catches_a_base_that_does_not_match_its_reference(tmp_path):
  ref_dir = os.path.join(REPO, "tests", "data", "real_smoke")
  with open(os.path.join(ref_dir, "ppl_reference.json")) as f:
    ppl = json.load(f)
  ppl["runs"][0]["results"][0]["perplexity"] *= 1.05
  bad = tmp_path / "ppl.json"
  bad.write_text(json.dumps(ppl))
  plan = dataclasses.replace(real.SMOKE, reference=(
      str(bad), os.path.join(ref_dir, "passkey_reference.json")))
  exp = real.RealExperiment(plan, Runner(str(tmp_path / "out")), str(tmp_path / "out"))
  exp.resolve_base()
  check = exp.check_base()
  assert check["status"] == "DIFFERS"
  with pytest.raises(RuntimeError, match="base check failed"):
    exp.run_all()


def test_forward_flops_count_the_parameters_the_checkpoint_holds():
  """2 x (every matrix the forward multiplies by) per token, from the real parameter tree."""
  import jax
  import pi_jax
  config, params = pi_jax.load_checkpoint(BASE)
  with open(os.path.join(BASE, "config.json")) as f:
    cfg = json.load(f)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  matrices = sum(int(np.prod(x.shape)) for p, x in leaves
                 if "norm" not in jax.tree_util.keystr(p))
  if not cfg.get("tie_word_embeddings"):  # the input table is read, not multiplied
    matrices -= cfg["vocab_size"] * cfg["hidden_size"]
  L = 512
  attention = 2 * cfg["num_layers"] * cfg["num_heads"] * cfg["head_dim"] * L * L
  assert sizing.forward_flops(cfg, L) == pytest.approx(2 * matrices * L + attention)


def test_real_flags_are_checked():
  proc = _demo("--reduced", timeout=60)
  assert proc.returncode == 2 and "go with --real" in proc.stderr
  proc = _demo("--real", "--smoke", "--reduced", timeout=60)
  assert proc.returncode == 2 and "pick one" in proc.stderr


def test_a_folder_of_another_plan_is_refused_before_anything_runs(smoke):
  out, _ = smoke
  proc = _demo("--real", "--smoke", "--lr", "1e-3", "--out", str(out), timeout=120)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "another plan" in proc.stderr and "learning_rate" in proc.stderr
  assert "Traceback" not in proc.stderr and "$ python" not in proc.stdout
