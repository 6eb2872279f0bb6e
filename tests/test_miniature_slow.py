"""`make demo` end to end on the committed base (slow: ~10 minutes), checked three ways.

1. It reruns to the committed numbers (results/demo), so README's tables are what the command
   gives. 2. What the miniature does establish holds: the base retrieves inside its window,
   extrapolation blows up (finding a), and YaRN zero shot retrieves across the 4x window.
3. The paper's findings (b) and (c) as the demo checks them: they do NOT reproduce on this
   base (results/miniature, results/sweep/README.md say why), so that test is a strict xfail;
   the day they do, it fails and the README must change with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from miniature import report as mini_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _numeric_keys(res: dict) -> dict:
  res["models"] = {k: {**m, "ppl": {int(w): v for w, v in m["ppl"].items()},
                       "passkey": {int(n): v for n, v in m["passkey"].items()}}
                   for k, m in res["models"].items()}
  return res


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("demo")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "demo.py"), "--out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return _numeric_keys(json.loads((out / "results.json").read_text())["miniature"])


@pytest.mark.slow
def test_demo_reruns_to_the_committed_numbers(demo):
  with open(os.path.join(REPO, "results", "demo", "results.json")) as f:
    committed = _numeric_keys(json.load(f)["miniature"])
  assert sorted(demo["models"]) == sorted(committed["models"])
  for name, want in committed["models"].items():
    got = demo["models"][name]
    assert got["ppl"] == pytest.approx(want["ppl"], rel=2e-3), name
    for length, s in want["passkey"].items():
      assert got["passkey"][length]["mean_accuracy"] == pytest.approx(
          s["mean_accuracy"], abs=0.05), (name, length)


@pytest.mark.slow
def test_what_the_miniature_establishes(demo):
  L, models = demo["trained_window"], demo["models"]
  assert models["base"]["passkey"][L]["mean_accuracy"] >= 0.9
  verdicts = {x["finding"]: x["reproduced"] for x in mini_report.findings(demo)}
  assert verdicts["(a) extrapolation past L blows up"]
  assert models["base+yarn:4"]["passkey"][4 * L]["mean_accuracy"] >= 0.9


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="PI's findings (b) and (c) do not reproduce on this base: "
                   "results/miniature/report.md, results/sweep/README.md")
def test_demo_reproduces_the_papers_findings_on_the_committed_base(demo):
  verdicts = {x["finding"]: (x["reproduced"], x["numbers"]) for x in mini_report.findings(demo)}
  failed = {k: v for k, v in verdicts.items() if not v[0]}
  assert not failed, failed


@pytest.mark.slow
def test_table6_in_miniature_reruns_to_the_committed_numbers(tmp_path):
  """`python demo.py table6` (about 10 minutes) gives results/table6's ROUGE for every arm, and
  the fine-tunes score above the zero-shot base (what the pipeline is for: the summary task is
  learned from the summaries alone)."""
  out = tmp_path / "table6"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "demo.py"), "table6", "--out",
                         str(out)], cwd=REPO, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  got = json.loads((out / "results.json").read_text())
  with open(os.path.join(REPO, "results", "table6", "results.json")) as f:
    want = json.load(f)
  for name, arm in want["arms"].items():
    for key, value in arm["rouge"].items():
      assert abs(got["arms"][name]["rouge"][key] - value) < 1e-6, (name, key)
  for tuned in ("pi", "short"):
    assert got["arms"][tuned]["rouge"]["rougeL"] > got["arms"]["base"]["rouge"]["rougeL"] + 5
