"""Training pieces in-process (one CPU device): schedule, configs, packing, sampler, the loop."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pi_jax import load_checkpoint
from pi_jax.config import ModelConfig
from pi_jax.tokenizer import ByteTokenizer
from pi_jax.train import NonFiniteError, Trainer, TrainConfig, apply_overrides, load_config_file
from pi_jax.train import metrics as metrics_lib
from pi_jax.train import optim, pipeline
from tests import train_utils as tu

CONFIGS = os.path.join(tu.REPO, "configs")


# --- the paper's schedule and recipe ------------------------------------------------------------

@pytest.mark.parametrize("name, peak", [("llama_7b_8k", 2e-5), ("llama_65b_8k", 1e-5)])
def test_schedule_is_the_papers(name, peak):
  """PI §3.1: linear warm-up over 20 steps from 10% of the peak, then constant."""
  config = load_config_file(os.path.join(CONFIGS, name + ".py"))
  schedule = optim.learning_rate_schedule(config)
  want = {0: 0.1 * peak, 1: peak * (0.1 + 0.9 / 20), 19: peak * (0.1 + 0.9 * 19 / 20),
          20: peak, 999: peak}
  for step, lr in want.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step

  # The optimizer really applies it: Adam's first-moment/second-moment ratio is 1 for a
  # constant gradient of 1, so each update is -lr(step) exactly (up to eps).
  opt = optim.make_optimizer(config)
  params = {"w": jnp.zeros(())}
  state = opt.init(params)
  update = jax.jit(lambda s: opt.update({"w": jnp.ones(())}, s, params))
  seen = {}
  for step in range(1000):
    u, state = update(state)
    if step in want:
      seen[step] = -float(u["w"])
  for step, lr in want.items():
    assert seen[step] == pytest.approx(lr, rel=1e-5), step


def test_paper_configs():
  cfgs = {os.path.basename(p)[:-3]: load_config_file(p)
          for p in glob.glob(os.path.join(CONFIGS, "*.py"))}
  for name in ("llama_7b_8k", "llama_7b_16k", "llama_7b_32k", "llama_13b_8k", "llama_33b_8k",
               "llama_65b_8k", "llama2_7b_32k", "smollm2_135m_32k"):
    c = cfgs[name]
    assert (c.b1, c.b2, c.weight_decay, c.warmup_steps, c.warmup_start_fraction) == (
        0.9, 0.95, 0.0, 20, 0.1), name
    assert c.steps == 1000 and c.rope_scaling.startswith("linear:"), name
    # The capacity table's settings (docs/tpu_capacity.md): one sequence per chip, remat full.
    assert (c.micro_batch, c.run.remat, c.run.compute_dtype) == (-1, "full", "bfloat16"), name
  assert cfgs["llama_7b_8k"].global_batch == 64 and cfgs["llama_7b_8k"].rope_scaling == "linear:4"
  assert cfgs["llama_7b_16k"].global_batch == 128 and cfgs["llama_7b_32k"].rope_scaling == "linear:16"
  assert cfgs["llama_33b_8k"].learning_rate == 1e-5 and cfgs["llama_33b_8k"].global_batch == 64
  assert cfgs["llama_65b_8k"].global_batch == 128
  assert cfgs["llama2_7b_32k"].rope_scaling == "linear:8"
  ft = cfgs["llama_7b_8k_ft"]
  assert (ft.steps, ft.rope_scaling, ft.max_position_embeddings) == (10000, "none", 8192)


# --- --set ----------------------------------------------------------------------------------

def test_overrides_parse_by_field_type():
  base = load_config_file(os.path.join(CONFIGS, "tiny.py"))
  c = apply_overrides(base, ["steps=7", "learning_rate=1e-4", "async_checkpoints=false",
                             "mesh=data:2,fsdp:2,tensor:2", "init_checkpoint=/x",
                             "grad_clip=1", "max_docs=null", "model.num_layers=3",
                             "rope_scaling=linear:4"])
  assert (c.steps, c.learning_rate, c.async_checkpoints, c.mesh) == (
      7, 1e-4, False, "data:2,fsdp:2,tensor:2")
  assert (c.init_checkpoint, c.grad_clip, c.max_docs) == ("/x", 1.0, None)
  assert c.model.num_layers == 3 and c.rope_scaling == "linear:4"
  c = apply_overrides(base, ["coordinator=10.0.0.1:1234,num_processes=4,process_id=2",
                             "mesh=data:2,fsdp:4"])
  assert (c.coordinator, c.num_processes, c.process_id, c.mesh) == ("10.0.0.1:1234", 4, 2,
                                                                    "data:2,fsdp:4")
  with pytest.raises(ValueError, match="unknown config key 'learning_rat'.*learning_rate"):
    apply_overrides(base, ["learning_rat=1"])
  with pytest.raises(ValueError, match="steps=ten: expected an integer"):
    apply_overrides(base, ["steps=ten"])
  with pytest.raises(ValueError, match="grad_accum 3 must divide global_batch 8"):
    apply_overrides(base, ["grad_accum=3"])
  with pytest.raises(ValueError, match="unknown config key 'num_layer'.*num_layers"):
    apply_overrides(base, ["model.num_layer=2"])
  # micro_batch=-1: one sequence per batch shard, resolved against the mesh.
  per_shard = apply_overrides(base, ["micro_batch=-1", "global_batch=8"])
  with pytest.raises(ValueError, match="depends on the mesh"):
    per_shard.accum_steps
  assert per_shard.for_batch_shards(4).micro_batch == 4
  assert per_shard.for_batch_shards(4).accum_steps == 2
  assert per_shard.for_batch_shards(1).accum_steps == 8
  with pytest.raises(ValueError, match="global_batch 8 is not a multiple of the mesh's 16 batch"):
    per_shard.for_batch_shards(16)
  assert base.for_batch_shards(16) is base
  # --set grad_accum replaces a config's micro_batch; both at once is an error.
  assert apply_overrides(per_shard, ["grad_accum=2"]).accum_steps == 2
  with pytest.raises(ValueError, match="micro_batch 4 and grad_accum 2 are both set"):
    apply_overrides(base, ["micro_batch=4", "grad_accum=2"])
  # A preset's architecture is edited too (e.g. a 2-layer 7B for a quick compile-only run).
  seven = load_config_file(os.path.join(CONFIGS, "llama_7b_8k.py"))
  c = apply_overrides(seven, ["model.num_layers=2"])
  assert (c.model.num_layers, c.model.hidden_size) == (2, 4096)


# --- data ---------------------------------------------------------------------------------------

def test_packing_puts_eos_between_documents(tmp_path):
  docs = ["abc", "de", "fghij"]
  with open(tmp_path / "d.jsonl", "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  tok = ByteTokenizer()
  tokens = pipeline.tokenize_and_join(str(tmp_path / "d.jsonl"), tok)
  want = []
  for d in docs:
    want += tok.encode(d) + [tok.eos_id]
  assert tokens.tolist() == want
  packed = pipeline.PackedSequences(tokens, seq_len=4, eval_sequences=1)
  assert packed.num_train == (len(want) - 1) // 4 - 1
  rows = packed.rows(np.arange(packed.num_train + 1))
  # Rows overlap by one token, so every token after the first is a target exactly once.
  for i in range(len(rows)):
    assert rows[i].tolist() == want[4 * i: 4 * i + 5]


def test_sampler_is_a_function_of_step():
  data = pipeline.PackedSequences(np.arange(1001) % 250, seq_len=10, eval_sequences=0)
  a = pipeline.StepSampler(data, global_batch=8, seed=3)
  b = pipeline.StepSampler(data, global_batch=8, seed=3)
  # Same batches in any order of asking (a resumed run asks from step k on).
  assert np.array_equal(a.batch(37), b.batch(37))
  for s in range(40):
    assert np.array_equal(a.batch(s), b.batch(s))
  # One epoch (100 rows) of consecutive steps visits every row once.
  seen = np.concatenate([a.row_indices(s) for s in range(25)])[:100]
  assert sorted(seen.tolist()) == list(range(100))
  # Rows of a slice are the slice of the rows (what each process reads).
  assert np.array_equal(a.batch(5, slice(2, 6)), a.batch(5)[2:6])
  assert not np.array_equal(pipeline.StepSampler(data, 8, seed=4).row_indices(0), a.row_indices(0))


# --- metrics --------------------------------------------------------------------------------------

def test_flops_and_peak_table():
  cfg = ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=2,
                    num_heads=2, max_position_embeddings=64)
  matmul = 2 * (4 * 16 * 16 + 3 * 16 * 32) + 16 * 100  # per layer attn + mlp, then lm_head
  assert metrics_lib.flops_per_token(cfg, 64) == 6 * (matmul + 2 * 2 * 16 + 16) + 6 * 2 * 64 * 16

  class Dev:
    def __init__(self, kind):
      self.device_kind = kind
  assert metrics_lib.peak_flops_per_device(Dev("NVIDIA H100 80GB HBM3")) == 989e12
  assert metrics_lib.peak_flops_per_device(Dev("TPU v5 lite")) == 197e12
  assert metrics_lib.peak_flops_per_device(Dev("cpu")) is None
  assert metrics_lib.peak_flops_per_device(Dev("cpu"), 2.0) == 2e12


# --- the loop, in-process -------------------------------------------------------------------------

MICRO = ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, max_position_embeddings=32, bos_token_id=256, eos_token_id=257)


def _micro(tmp_path, **kw) -> TrainConfig:
  base = dict(workdir=str(tmp_path), model=MICRO, data="pg19_standin", max_docs=2, seq_len=32,
              global_batch=4, steps=4, learning_rate=1e-2, warmup_steps=2,
              checkpoint_every=2, keep_checkpoints=3, loss_chunk=32, tensorboard=False)
  base.update(kw)
  return TrainConfig(**base)


def test_grad_accumulation_matches_one_batch(tmp_path):
  one = Trainer(_micro(tmp_path / "one", peak_tflops=1.0, tensorboard=True)).run()
  two = Trainer(_micro(tmp_path / "two", grad_accum=2)).run()
  assert one["status"] == two["status"] == "finished"
  a = metrics_lib.read_metrics(str(tmp_path / "one"))
  b = metrics_lib.read_metrics(str(tmp_path / "two"))
  np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
  np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-4)
  assert set(a[0]) >= {"step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"}
  assert a[0]["mfu"] > 0 and b[0]["mfu"] is None  # a peak is known only when given on CPU
  assert glob.glob(str(tmp_path / "one" / "tensorboard" / "events.out.tfevents.*"))
  # The final checkpoint is a pi_jax checkpoint with the byte tokenizer beside it.
  config, params = load_checkpoint(str(tmp_path / "one" / "final"))
  assert config == MICRO
  assert os.path.isfile(tmp_path / "one" / "final" / "tokenizer" / "bytes.json")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # A huge learning rate blows the weights up within a few steps.
  config = _micro(tmp_path, learning_rate=1e8, warmup_steps=0, steps=50, checkpoint_every=1,
                  keep_checkpoints=50)
  trainer = Trainer(config)
  with pytest.raises(NonFiniteError, match=r"non-finite (loss|gradient) at step (\d+)") as e:
    trainer.run()
  bad = int(str(e.value).split(" at step ")[1].split()[0])
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == list(range(bad))
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert steps[-1] == bad  # checkpoint k holds the state after k good steps; none after
  # The last checkpoint restores, finite, and rerunning resumes from it (and fails again there).
  again = Trainer(config)
  assert again.step == bad
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(again.state["params"]))
  assert not os.path.exists(tmp_path / "final")


def test_export_writes_a_saved_step_as_a_checkpoint(tmp_path):
  """python -m pi_jax.train.export: the last saved step equals WORKDIR/final; a step that was
  not saved, or an occupied output folder, is a clear error."""
  from pi_jax.train import export
  work = tmp_path / "run"
  Trainer(_micro(work, steps=4, checkpoint_every=2, keep_checkpoints=5)).run()
  final_config, final_params = load_checkpoint(str(work / "final"))
  assert export.main([str(work), "4", str(tmp_path / "step4")]) == 0
  config, params = load_checkpoint(str(tmp_path / "step4"))
  assert config == final_config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final_params)):
    np.testing.assert_array_equal(a, b)
  assert os.path.isfile(tmp_path / "step4" / "tokenizer" / "bytes.json")
  with pytest.raises(ValueError, match=r"no checkpoint of step 3; saved steps: \[2, 4\]"):
    export.export_step(str(work), 3, str(tmp_path / "step3"))
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    export.export_step(str(work), 2, str(tmp_path / "step4"))
  # Pointing eval.py at the training checkpoint itself names the way out.
  with pytest.raises(FileNotFoundError, match=r"step 2 of the training run .*pi_jax.train.export"):
    load_checkpoint(str(work / "checkpoints" / "2"))
