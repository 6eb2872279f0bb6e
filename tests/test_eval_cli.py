"""eval.py: JSON, table and plot are written; bad input fails clearly; a mesh changes nothing."""

import json
import os
import subprocess
import sys

import jax
import pytest

import pi_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval as eval_cli  # noqa: E402  (the top-level script)
from tests.train_utils import subprocess_env  # noqa: E402

TINY = pi_jax.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_cli")
  tok_file = pi_jax.ByteTokenizer().save(str(root / "tok"))
  path = str(root / "ckpt")
  pi_jax.save_checkpoint(path, TINY, pi_jax.init_params(TINY, jax.random.key(0)),
                         extra_files={"tokenizer/bytes.json": tok_file})
  return path


def _ppl_args(ckpt, tmp_path, *extra):
  return ["perplexity", "--ckpt", ckpt, "--data", "proofpile_standin", "--max-docs", "2",
          "--max-tokens", "200", "--windows", "32,64", "--stride", "16", "--no-progress",
          "--json", str(tmp_path / "ppl.json"), "--plot", str(tmp_path / "ppl.png"), *extra]


def test_perplexity_writes_json_table_and_plot(ckpt, tmp_path, capsys):
  assert eval_cli.main(_ppl_args(ckpt, tmp_path, "--rope-scaling", "none,linear:2")) == 0
  table = capsys.readouterr().out
  assert "| scaling | 32 | 64 |" in table and "| linear:2 |" in table
  out = json.load(open(tmp_path / "ppl.json"))
  assert out["definition"] == "sliding" and "BOS (id 256)" in out["bos_policy"]
  assert out["settings"]["stride"] == 16 and out["command"].startswith("eval.py perplexity")
  assert out["versions"]["jax"] == jax.__version__
  assert [r["rope_scaling"] for r in out["runs"]] == ["none", "linear:2"]
  assert out["runs"][1]["model_window"] == 128  # PI ×2 of the 64-token window
  for run in out["runs"]:
    for r in run["results"]:
      assert r["documents"] == 2 and r["tokens"] == 2 * 199 and r["perplexity"] > 1
      assert f"| {r['perplexity']:.3f} |" in table or f"{r['perplexity']:.3f}" in table
  with open(tmp_path / "ppl.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # report: the same numbers from the JSON file
  assert eval_cli.main(["report", str(tmp_path / "ppl.json"), "--plot",
                        str(tmp_path / "merged.png")]) == 0
  assert capsys.readouterr().out.strip() == table.strip()


def test_per_window_mean_changes_the_average_only(ckpt, tmp_path):
  assert eval_cli.main(_ppl_args(ckpt, tmp_path)) == 0
  plain = json.load(open(tmp_path / "ppl.json"))["runs"][0]["results"]
  assert eval_cli.main(_ppl_args(ckpt, tmp_path, "--per-window-mean")) == 0
  yarn = json.load(open(tmp_path / "ppl.json"))
  assert yarn["definition"] == "per_window_mean"
  for a, b in zip(plain, yarn["runs"][0]["results"]):
    assert a["tokens"] == b["tokens"] and a["perplexity"] != b["perplexity"]
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=0.05)


def test_passkey_writes_json_table_and_plot(ckpt, tmp_path, capsys):
  args = ["passkey", "--ckpt", ckpt, "--lengths", "300,500", "--depths", "2", "--trials", "2",
          "--mode", "score", "--no-progress", "--rope-scaling", "none,ntk:2",
          "--json", str(tmp_path / "pk.json"), "--plot", str(tmp_path / "pk.png")]
  assert eval_cli.main(args) == 0
  table = capsys.readouterr().out
  assert "| scaling | length | mean accuracy | k_max (all k' ≤ k pass) |" in table
  assert "| ntk:2 | 500 |" in table
  out = json.load(open(tmp_path / "pk.json"))
  assert set(out["k_max"]) == {"none", "ntk:2"} and set(out["k_max"]["none"]) == {"300", "500"}
  run = out["runs"][0]
  s500 = run["lengths"]["500"]
  assert s500["nominal_k"] == [0, 250] and s500["trials"] == [2, 2]
  assert s500["k"] == [round(k) for k in s500["actual_k"]] and s500["k"][0] > 0  # real distances
  assert out["verdict"]["none"]["500"] == s500["verdict"]
  assert len(run["trials"]) == 8 and all("key_logprob" in t for t in run["trials"])
  with open(tmp_path / "pk.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change,message", [
    (["--data", "/nonexistent/books"], "no such directory"),
    (["--data", "EMPTY"], "has no .txt"),
    (["--data", "tfds:pg19:test", "--data-dir", "/nonexistent/tfds"], "pg19 is not prepared"),
    (["--windows", "32,abc"], "'abc' in '32,abc' is not an integer"),
    (["--stride", "100"], "--stride 100 must be between 1 and every window"),
    (["--rope-scaling", "linear:0.5"], "does not fit checkpoint"),
    (["--rope-scaling", "warp:2"], "unknown RoPE scaling kind"),
    (["--ckpt", "/nonexistent/ckpt"], "is not a pi_jax checkpoint"),
    (["--batch-size", "0"], "--batch-size 0 must be a positive multiple"),
])
def test_bad_input_fails_clearly(ckpt, tmp_path, capsys, change, message):
  args = _ppl_args(ckpt, tmp_path)
  if change[1] == "EMPTY":
    os.makedirs(tmp_path / "empty")
    change = [change[0], str(tmp_path / "empty")]
  args += change  # argparse keeps the last value of a repeated option
  assert eval_cli.main(args) == 2
  err = capsys.readouterr().err
  assert "eval.py perplexity: error:" in err and message in err
  assert not os.path.exists(tmp_path / "ppl.json")


def test_window_beyond_memory_fails_before_work(ckpt, tmp_path, capsys, monkeypatch):
  from pi_jax import memory
  monkeypatch.setattr(memory, "free_device_memory", lambda: (10_000, "a small device"))
  assert eval_cli.main(_ppl_args(ckpt, tmp_path)) == 2
  err = capsys.readouterr().err  # the rough check before the checkpoint is loaded
  assert "--windows 32: needs at least" in err and "a small device" in err, err
  monkeypatch.setattr(eval_cli, "_check_fits", lambda *a, **k: None)
  assert eval_cli.main(_ppl_args(ckpt, tmp_path)) == 2
  err = capsys.readouterr().err  # XLA's estimate of the compiled window, before any scoring
  assert "window 32 × batch 1 needs about" in err and "a small device" in err


def test_missing_required_argument_exits_nonzero(capsys):
  with pytest.raises(SystemExit) as e:
    eval_cli.main(["perplexity", "--data", "pg19_standin"])
  assert e.value.code == 2 and "--ckpt" in capsys.readouterr().err


def test_mesh_run_equals_single_device(ckpt, tmp_path):
  """8 fake CPU devices, data:2,fsdp:2,tensor:2: sharded params and batches, same numbers."""
  assert eval_cli.main(_ppl_args(ckpt, tmp_path, "--batch-size", "4")) == 0
  single = json.load(open(tmp_path / "ppl.json"))["runs"][0]["results"]
  args = _ppl_args(ckpt, tmp_path, "--mesh", "data:2,fsdp:2,tensor:2", "--batch-size", "4",
                   "--json", str(tmp_path / "mesh.json"))
  proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args],
                        env=subprocess_env(8), capture_output=True, text=True, timeout=600,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  mesh = json.load(open(tmp_path / "mesh.json"))
  assert mesh["device"]["count"] == 8 and mesh["settings"]["mesh"] == "data:2,fsdp:2,tensor:2"
  for a, b in zip(single, mesh["runs"][0]["results"]):
    assert a["tokens"] == b["tokens"]
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
