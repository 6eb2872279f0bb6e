"""demo.py: the miniature end to end with absurdly small settings, and the committed tiny model."""

import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(REPO, "assets", "tiny_base")


def _demo(*args, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, "demo.py"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def _byte_unigram_perplexity(paths, max_bytes):
  """exp(entropy) of the byte distribution of the evaluated text: a no-context baseline."""
  counts = np.zeros(256)
  for p in paths:
    with open(p, "rb") as f:
      counts += np.bincount(np.frombuffer(f.read()[:max_bytes], np.uint8), minlength=256)
  prob = counts[counts > 0] / counts.sum()
  return math.exp(-(prob * np.log(prob)).sum())


def test_committed_tiny_base_is_small_and_described():
  with open(os.path.join(BASE, "config.json")) as f:
    config = json.load(f)
  assert config["max_position_embeddings"] == 128
  assert config["vocab_size"] == 258
  size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(BASE, "**"), recursive=True)
             if os.path.isfile(p))
  assert size < 5e6, f"assets/tiny_base is {size} bytes; keep the committed model small"
  with open(os.path.join(BASE, "README.md")) as f:
    readme = f.read()
  assert "python train.py --config configs/tiny_pretrain.py" in readme


def test_quick_demo_writes_a_report_whose_numbers_come_from_the_run(tmp_path):
  out = tmp_path / "demo"
  proc = _demo("--quick", "--skip-real", "--out", str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = (out / "report.md").read_text()
  assert "status: **complete**" in report
  assert (out / "miniature_perplexity.png").stat().st_size > 1000

  # Every perplexity in the main table is the one eval.py wrote to its JSON in this run.
  def ppl(name, scaling_window):
    data = json.loads((out / "mini" / f"{name}.json").read_text())
    (run,) = data["runs"]
    return {r["window"]: r["perplexity"] for r in run["results"]}[scaling_window]

  rows = {m.group(1): m for m in re.finditer(
      r"^\| (base \(128\) \| none \(extrapolation\)|FT to 256 \| direct fine-tuning|"
      r"PI to 256 \| PI fine-tuning \(linear:2\)) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$",
      report, re.M)}
  assert len(rows) == 3, report
  for key, name in (("base (128) | none (extrapolation)", "base_extrapolation"),
                    ("FT to 256 | direct fine-tuning", "ft2"),
                    ("PI to 256 | PI fine-tuning (linear:2)", "pi2")):
    m = rows[key]
    assert float(m.group(3)) == pytest.approx(ppl(name, 128), abs=6e-4)
    assert float(m.group(4)) == pytest.approx(ppl(name, 256), abs=6e-4)
  assert rows["FT to 256 | direct fine-tuning"].group(2) == "2"  # the steps that were run

  # The committed model has learned the text: far below the no-context byte baseline.
  heldout = sorted(glob.glob(os.path.join(REPO, "data", "pg19_standin", "Psa_14?.txt")))[:1]
  baseline = _byte_unigram_perplexity(heldout, 600)
  assert ppl("base_extrapolation", 128) < baseline / 2, (ppl("base_extrapolation", 128), baseline)

  # The fine-tuned checkpoints really have the extended windows and scalings.
  ft = json.loads((out / "runs" / "ft2" / "final" / "config.json").read_text())
  pi = json.loads((out / "runs" / "pi2" / "final" / "config.json").read_text())
  assert ft["max_position_embeddings"] == 256 and ft["rope_scaling"]["kind"] == "none"
  assert pi["max_position_embeddings"] == 256
  assert (pi["rope_scaling"]["kind"], pi["rope_scaling"]["factor"]) == ("linear", 2.0)

  # Each command is listed with its timing, and its log exists.
  commands = re.findall(r"^\| \d+ \| .* \| `python (?:train|eval)\.py .*` \| [\d.]+ \| [\d.]+ \|$",
                        report, re.M)
  assert len(commands) == 6, report
  assert len(list((out / "logs").glob("*.log"))) == 6


def test_missing_base_checkpoint_is_a_clear_error(tmp_path):
  proc = _demo("--quick", "--skip-real", "--base", str(tmp_path / "nope"), "--out",
               str(tmp_path / "o"), timeout=60)
  assert proc.returncode == 2
  assert "nope" in proc.stderr and "no checkpoint" in proc.stderr


def test_bad_window_list_is_a_clear_error(tmp_path):
  proc = _demo("--real-windows", "4k,8k", "--out", str(tmp_path / "o"), timeout=60)
  assert proc.returncode == 2
  assert "4k,8k" in proc.stderr


def test_real_eval_prefix_perplexity_equals_one_window_of_eval(tmp_path):
  """real-eval scores every window from one forward over the longest: equal to eval.py's
  sliding-window definition for one window of W tokens (a document cut to W+1 tokens)."""
  import pi_jax
  from pi_jax import data as data_lib
  from pi_jax.evals import perplexity as ppl_lib

  doc = os.path.join(REPO, "data", "pg19_standin", "Psa_140.txt")
  out = tmp_path / "real.json"
  proc = _demo("real-eval", "--ckpt", BASE, "--data", doc, "--windows", "64,128,256",
               "--scalings", "none,linear:2", "--passkey-lengths", "512",
               "--passkey-scalings", "none", "--json", str(out), timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())

  config, params = pi_jax.load_checkpoint(BASE)
  tok = pi_jax.load_tokenizer(BASE)
  docs = list(data_lib.iter_documents(doc))
  for spec in ("none", "linear:2"):
    cfg = config.with_rope_scaling(spec)
    for w in (64, 128, 256):
      documents = ppl_lib.tokenize_documents(tok, docs, w + 1)
      (want,) = ppl_lib.evaluate_perplexity(cfg, params, documents, [w], w)
      assert want.tokens == w
      assert got["ppl"][cfg.rope_scaling.describe()][str(w)] == pytest.approx(
          want.perplexity(), rel=1e-5)
  (key,) = got["passkey"]["none"]["512"]["actual_k"]
  assert abs(key - 256) < 40  # the key sits in the middle of the prompt
  assert got["passkey"]["none"]["512"]["trials"] == 1
