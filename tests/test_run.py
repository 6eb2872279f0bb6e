"""pi_jax.run: run options are the run's, set on the command line every time, never read back
from a checkpoint; old run configs and checkpoints that stored them still work."""

import json

import pytest

from pi_jax.run import RunOptions
from pi_jax.train import config as config_lib
from pi_jax.train.config import TrainConfig
from tests.train_utils import REPO

TINY_BASE = f"{REPO}/assets/tiny_base"  # its config.json (older pi_jax) pins a 512 tile


def test_set_run_fields_are_parsed_by_type():
  config = config_lib.apply_overrides(TrainConfig(), [
      "run.compute_dtype=bfloat16", "run.attention_block_size=128,run.remat=full",
      "run.param_dtype=null"])
  assert config.run == RunOptions(compute_dtype="bfloat16", attention_block_size=128,
                                  remat="full")


@pytest.mark.parametrize("item,message", [
    ("compute_dtype=bfloat16", r"run options are set as run.compute_dtype"),
    ("run.compute=bfloat16", r"unknown config key 'run.compute'.*run.compute_dtype"),
    ("run.attention_block_size=big", r"expected an integer"),
    ("run.remat=sometimes", r"run.remat must be one of"),
    ("model.compute_dtype=bfloat16", r"run options are set as run.compute_dtype"),
])
def test_bad_run_settings_are_named(item, message):
  with pytest.raises(ValueError, match=message):
    config_lib.apply_overrides(TrainConfig(model="tiny"), [item])


def test_a_run_config_json_from_before_run_options_still_reads():
  old = {"workdir": "w", "compute_dtype": "bfloat16", "remat": "full", "param_dtype": None,
         "attention_impl": None, "seq_len": 64}
  config = TrainConfig.from_dict(old)
  assert config.run == RunOptions(compute_dtype="bfloat16", remat="full")
  assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_command_line_wins_over_a_checkpoint_that_stored_a_tile(tmp_path):
  """assets/tiny_base's config.json says attention_block_size 512: a run takes its own tile
  (the implementation's default, or what --set run.attention_block_size gives)."""
  from pi_jax.train.trainer import Trainer
  base = config_lib.load_config_file(f"{REPO}/configs/tiny.py").replace(
      init_checkpoint=TINY_BASE, model=None, tokenizer=None, steps=1, eval_every=0,
      eval_sequences=0, max_docs=4, tensorboard=False)
  for sets, tile in (([], 256), (["run.attention_block_size=128"], 128)):
    config = config_lib.apply_overrides(base.replace(workdir=str(tmp_path / f"w{tile}")), sets)
    trainer = Trainer(config)
    try:
      assert trainer.kernels.block_size == tile
      recorded = json.loads((tmp_path / f"w{tile}" / "run_config.json").read_text())
      assert recorded["run"]["attention_block_size"] == (None if tile == 256 else tile)
    finally:
      trainer.close()
