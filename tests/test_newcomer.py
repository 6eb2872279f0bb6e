"""What a newcomer trips over: --help defaults and run sizes, the passkey table's meaning, the HF
export read by transformers in both RoPE forms, TensorBoard, and `eval.py report` merging two
checkpoints. (The README's code blocks are tests/test_readme.py.)"""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import numpy as np
import pytest

import pi_jax
from pi_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BASE = os.path.join(REPO, "assets", "tiny_base")
sys.path.insert(0, REPO)
import eval as eval_cli  # noqa: E402


# --- 16. --help shows defaults; a long evaluation says how long ---------------------------------

def test_help_shows_the_defaults(capsys):
  for args in (["passkey", "--help"], ["perplexity", "--help"]):
    with pytest.raises(SystemExit):
      eval_cli.main(args)
    out = capsys.readouterr().out
    assert "(default: " in out, out
  with pytest.raises(SystemExit):
    eval_cli.main(["passkey", "--help"])
  out = " ".join(capsys.readouterr().out.split())
  assert "(default: 4096,8192)" in out and "(default: 32)" in out and "(default: 10)" in out
  assert "from the END of the prompt" in out
  import train
  with pytest.raises(SystemExit):
    train.main(["--help"])
  assert "(default: " in capsys.readouterr().out
  from convert import to_hf, to_pi_jax
  for module in (to_hf, to_pi_jax):
    assert "(default: " in module.build_parser().format_help()


def test_passkey_prints_the_forward_passes_and_an_estimate(tmp_path, capsys):
  code = eval_cli.main(["passkey", "--ckpt", TINY_BASE, "--lengths", "300,400", "--depths", "3",
                        "--trials", "2", "--mode", "score", "--no-progress",
                        "--json", str(tmp_path / "pk.json")])
  err = capsys.readouterr().err
  assert code == 0, err
  assert "passkey: 12 prompts = 2 lengths × 3 depths × 2 trials × 1 scaling(s), in 12 forward " \
         "passes of batch 1" in err, err
  assert "estimated total about" in err, err


# --- 17. passkey: k_max and what it hides ------------------------------------------------------

def test_passkey_table_names_its_columns_and_what_k_max_hides():
  from pi_jax.evals import passkey, report
  results = [{"length": 100, "k": k, "success": ok, "actual_k": k}
             for k, ok in ((0, False), (25, True), (50, True), (75, True))]
  s = passkey.summarize(results)[100]
  assert s["k_max"] is None and s["far_run_from"] == 25 and s["largest_passing_k"] == 75
  table = report.passkey_table([{"rope_scaling": "none", "lengths": {100: s}}])
  row = [l for l in table.splitlines() if l.startswith("| none | 100 |")][0]
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[3:7] == ["–", "25", "75", "3/4"], cells  # not "none": that is a scaling's name
  assert "k_max (all k' ≤ k pass)" in table and "k = real tokens from the key to the end" in table


# --- 18. the HF export carries the scaling in both forms ---------------------------------------

@pytest.fixture(scope="module")
def pi_export(tmp_path_factory):
  from convert.to_hf import export
  root = tmp_path_factory.mktemp("export")
  config, params = pi_jax.load_checkpoint(TINY_BASE)
  config = config.with_rope_scaling("linear:4")
  checkpoint.save_checkpoint(str(root / "ckpt"), config, params)
  return config, params, export(str(root / "ckpt"), str(root / "hf"))


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
def test_transformers_loads_the_export_with_the_scaling_in_each_form(pi_export, form, tmp_path):
  """Each form alone (the other deleted) gives transformers the PI factor and pi_jax's logits
  past the trained window: transformers 4.x and the serving stacks read `rope_scaling`."""
  import shutil
  import torch
  import transformers
  config, params, out = pi_export
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["rope_parameters"]["rope_type"] == "linear" and cfg["rope_parameters"]["factor"] == 4
  assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
  assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
  one = tmp_path / "one"
  shutil.copytree(out, one)
  other = "rope_scaling" if form == "rope_parameters" else "rope_parameters"
  del cfg[other]
  if other == "rope_scaling":
    del cfg["rope_theta"]
  json.dump(cfg, open(one / "config.json", "w"))
  model = transformers.LlamaForCausalLM.from_pretrained(str(one)).eval()
  rope = model.config.rope_parameters
  assert rope["rope_type"] == "linear" and rope["factor"] == 4.0
  length = config.original_window * 2  # past the trained window: only right with the factor
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, length))
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(pi_jax.forward(config, params, tokens.astype(np.int32)))
  assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


# --- 19. TensorBoard, and report over two checkpoints ------------------------------------------

def _events(folder):
  """(step, tag or kind, value) of every event in a TensorBoard folder (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = []
  for file in sorted(glob.glob(os.path.join(folder, "events.*"))):
    data = open(file, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("summary"):
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
      elif event.HasField("session_log"):
        out.append((event.step, "session_start", None))
  return out


def test_tensorboard_events_are_written_and_purged_on_resume(tmp_path):
  from pi_jax.train.metrics import MetricsWriter
  w = MetricsWriter(str(tmp_path), tensorboard=True, resume_step=0)
  for step in range(4):
    w.write({"step": step, "loss": float(step)})
  w.close()
  import time
  time.sleep(1.1)  # event file names carry the second: a resume is a new file
  w = MetricsWriter(str(tmp_path), tensorboard=True, resume_step=2)  # resumed from step 2
  w.write({"step": 2, "loss": 20.0})
  w.close()
  events = _events(str(tmp_path / "tensorboard"))
  assert [(s, v) for s, t, v in events if t == "train/loss"] == [
      (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (2, 20.0)]
  assert (2, "session_start", None) in events  # TensorBoard drops the old steps >= 2
  steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")]
  assert steps == [0, 1, 2]


def test_report_keeps_two_checkpoints_apart_and_titles_both(tmp_path, capsys):
  def payload(ckpt, acc):
    s = {"k": [0, 50], "accuracy": [acc, acc], "actual_k": [0, 50], "trials": [1, 1],
         "mean_accuracy": acc, "k_max": 50 if acc else None}
    return {"task": "passkey", "settings": {"ckpt": ckpt}, "runs": [
        {"rope_scaling": "none", "lengths": {"100": s}}]}
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(payload("runs/A/final", 1.0)))
  b.write_text(json.dumps(payload("runs/B/final", 1.0)))  # equal cells: still two rows
  code = eval_cli.main(["report", str(a), str(b), "--json", str(tmp_path / "m.json"),
                        "--plot", str(tmp_path / "m.png")])
  out = capsys.readouterr()
  assert code == 0, out.err
  assert "| runs/A/final [none] | 100 |" in out.out and "| runs/B/final [none] | 100 |" in out.out
  merged = json.load(open(tmp_path / "m.json"))
  assert merged["checkpoints"] == ["runs/A/final", "runs/B/final"]
  assert os.path.getsize(tmp_path / "m.png") > 0
  code = eval_cli.main(["report", str(a), str(a)])  # the same cell twice: refused, not picked
  err = capsys.readouterr().err
  assert code == 2 and "both have runs/A/final [none] at length 100" in err, err
