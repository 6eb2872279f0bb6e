"""Checkpoints: exact round trip, refusal to overwrite, atomic failure, clear load errors."""

import json
import os

import jax
import numpy as np
import pytest

import pi_jax
from pi_jax.config import ModelConfig

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                     rope_theta=5e5).with_rope_scaling("linear:4")


def params_of(config, seed=0, dtype="float32"):
  return pi_jax.init_params(config, jax.random.key(seed), dtype)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def listing(directory):
  return sorted(os.listdir(directory))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
  config = CONFIG.replace(tie_word_embeddings=dtype == "bfloat16")
  params = params_of(config, dtype=dtype)
  tok = tmp_path / "tokenizer.json"
  tok.write_text('{"model": "test"}')
  out = pi_jax.save_checkpoint(str(tmp_path / "ckpt"), config, params,
                               extra_files={"tokenizer/tokenizer.json": str(tok)})
  assert out == str(tmp_path / "ckpt")
  assert listing(tmp_path) == ["ckpt", "tokenizer.json"]  # no temporary directory left behind
  loaded_config, loaded = pi_jax.load_checkpoint(out)
  assert loaded_config == config
  assert loaded_config.rope_scaling.kind == "linear" and loaded_config.original_window == 64
  assert_trees_equal(loaded, params)
  assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").read_text() == '{"model": "test"}'
  # The stored dtype is read back from the arrays; a run may cast on load (run.param_dtype).
  other = "float32" if dtype == "bfloat16" else "bfloat16"
  cfg2, cast = pi_jax.load_checkpoint(out, param_dtype=other)
  assert cfg2 == config and {x.dtype.name for x in jax.tree.leaves(cast)} == {other}
  # config.json holds what the model is, never how a run computes (STYLE.md rule 15).
  stored = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  assert not set(stored) & {"param_dtype", "compute_dtype", "remat", "attention_impl",
                            "attention_block_size", "native", "run"}


def test_an_older_checkpoint_with_run_options_loads_and_says_they_are_ignored(tmp_path, capsys):
  """config.json files written before pi_jax.run held dtypes and kernels; they still load, their
  run keys are dropped with one note, and the stored dtype comes from the arrays."""
  params = params_of(CONFIG, dtype="bfloat16")
  out = pi_jax.save_checkpoint(str(tmp_path / "old"), CONFIG, params)
  path = tmp_path / "old" / "config.json"
  d = json.loads(path.read_text())
  d.update(param_dtype="float32", compute_dtype="bfloat16", remat="full",
           attention_impl="reference", attention_block_size=512)
  path.write_text(json.dumps(d))
  config, loaded = pi_jax.load_checkpoint(out)
  assert config == CONFIG
  assert {x.dtype.name for x in jax.tree.leaves(loaded)} == {"bfloat16"}
  err = capsys.readouterr().err
  assert "stores run options from an older pi_jax" in err and "attention_block_size=512" in err
  assert err.count("\n") == 1


def test_refuses_existing_path_and_leaves_it_untouched(tmp_path):
  target = tmp_path / "ckpt"
  target.mkdir()
  (target / "precious.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match=str(target)):
    pi_jax.save_checkpoint(str(target), CONFIG, params_of(CONFIG))
  assert listing(target) == ["precious.txt"]
  assert (target / "precious.txt").read_text() == "keep me"
  assert listing(tmp_path) == ["ckpt"]
  pi_jax.save_checkpoint(str(target), CONFIG, params_of(CONFIG), force=True)
  assert listing(target) == ["checksums.json", "config.json", "params"]


def test_params_not_matching_the_config_leave_nothing(tmp_path):
  params = params_of(CONFIG)
  bad_shape = jax.tree.map(lambda x: x, params)
  bad_shape["layers"]["wq"] = bad_shape["layers"]["wq"][:, :, :2]
  with pytest.raises(ValueError, match=r"\['layers'\]\['wq'\] has shape .*config expects"):
    pi_jax.save_checkpoint(str(tmp_path / "a"), CONFIG, bad_shape)
  missing = {k: v for k, v in params.items() if k != "lm_head"}
  with pytest.raises(ValueError, match=r"missing \[\"\['lm_head'\]\"\]"):
    pi_jax.save_checkpoint(str(tmp_path / "b"), CONFIG, missing)
  assert listing(tmp_path) == []


def test_failure_mid_save_leaves_no_directory_and_keeps_the_old_one(tmp_path):
  """The arrays are written, then copying an extra file fails: nothing appears at the path,
  and with force=True an existing checkpoint there survives intact."""
  missing_file = str(tmp_path / "no_such_tokenizer.json")
  with pytest.raises(FileNotFoundError):
    pi_jax.save_checkpoint(str(tmp_path / "new"), CONFIG, params_of(CONFIG),
                           extra_files={"tokenizer/tokenizer.json": missing_file})
  assert listing(tmp_path) == []
  old = params_of(CONFIG, seed=1)
  pi_jax.save_checkpoint(str(tmp_path / "old"), CONFIG, old)
  with pytest.raises(FileNotFoundError):
    pi_jax.save_checkpoint(str(tmp_path / "old"), CONFIG, params_of(CONFIG, seed=2), force=True,
                           extra_files={"tokenizer/tokenizer.json": missing_file})
  assert listing(tmp_path) == ["old"]
  config, params = pi_jax.load_checkpoint(str(tmp_path / "old"))
  assert config == CONFIG
  assert_trees_equal(params, old)


def test_loading_a_non_checkpoint_names_the_path(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=f"{empty} is not a pi_jax checkpoint"):
    pi_jax.load_checkpoint(str(empty))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
    pi_jax.load_checkpoint(str(tmp_path / "absent"))

  garbage = tmp_path / "garbage"
  garbage.mkdir()
  (garbage / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=f"{garbage / 'config.json'}: not a valid pi_jax config"):
    pi_jax.load_checkpoint(str(garbage))
  (garbage / "config.json").write_text(json.dumps({"hidden_size": 33, "num_heads": 4}))
  with pytest.raises(ValueError, match=f"{garbage / 'config.json'}: .*not divisible"):
    pi_jax.load_checkpoint(str(garbage))

  no_params = tmp_path / "no_params"
  no_params.mkdir()
  (no_params / "config.json").write_text(CONFIG.to_json())
  with pytest.raises(FileNotFoundError, match=f"{no_params / 'params'} does not exist"):
    pi_jax.load_checkpoint(str(no_params))


def test_loading_params_of_another_architecture_names_the_path(tmp_path):
  pi_jax.save_checkpoint(str(tmp_path / "ckpt"), CONFIG, params_of(CONFIG))
  other = CONFIG.replace(intermediate_size=40)
  (tmp_path / "ckpt" / "config.json").write_text(other.to_json())
  with pytest.raises(ValueError, match=f"{tmp_path / 'ckpt' / 'params'}: could not restore"):
    pi_jax.load_checkpoint(str(tmp_path / "ckpt"))
