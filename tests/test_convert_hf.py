"""HF import (sharded safetensors, .bin, BF16) and export back to transformers, with the RoPE scaling."""

import glob
import io
import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from conftest import hf_logits, make_hf_model, rel_err
from convert.to_hf import export, parse_size
from convert.to_pi_jax import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_all_safetensors(folder):
  from safetensors.numpy import load_file
  out = {}
  for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
    out.update(load_file(f))
  return out


def _pi_logits(ckpt, tokens):
  config, params = pi_jax.load_checkpoint(str(ckpt))
  return config, np.asarray(pi_jax.forward(config, params, jnp.asarray(tokens, jnp.int32)))


class _Capture:
  """Collects every record transformers logs at WARNING or above."""

  def __enter__(self):
    self.stream = io.StringIO()
    self.handler = logging.StreamHandler(self.stream)
    self.handler.setLevel(logging.WARNING)
    self.logger = logging.getLogger("transformers")
    self.logger.addHandler(self.handler)
    return self

  def __exit__(self, *exc):
    self.logger.removeHandler(self.handler)

  @property
  def text(self):
    return self.stream.getvalue()


def _load_hf(folder):
  import torch
  import transformers
  with _Capture() as cap:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
  return model.eval(), cap.text


def test_sharded_safetensors_import_matches_transformers(tmp_path):
  model = make_hf_model(tmp_path / "one")
  model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="50KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len(glob.glob(str(tmp_path / "sharded" / "*.safetensors"))) > 2
  convert(str(tmp_path / "sharded"), str(tmp_path / "ckpt"))
  tokens = np.random.RandomState(1).randint(0, 128, (1, 24))
  _, got = _pi_logits(tmp_path / "ckpt", tokens)
  assert rel_err(got, hf_logits(model, tokens)) < 1e-5


def test_pytorch_bin_import_matches_transformers(tmp_path):
  import shutil
  import torch
  model = make_hf_model(tmp_path / "st")
  # transformers 5 always writes safetensors; the legacy format is a torch.save'd state dict.
  os.makedirs(tmp_path / "bin")
  shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
  state = model.state_dict()
  half = len(state) // 2
  names = list(state)
  torch.save({n: state[n] for n in names[:half]}, tmp_path / "bin" / "pytorch_model-00001-of-00002.bin")
  torch.save({n: state[n] for n in names[half:]}, tmp_path / "bin" / "pytorch_model-00002-of-00002.bin")
  assert glob.glob(str(tmp_path / "bin" / "pytorch_model*.bin"))
  assert not glob.glob(str(tmp_path / "bin" / "*.safetensors"))
  convert(str(tmp_path / "bin"), str(tmp_path / "ckpt"))
  tokens = np.random.RandomState(2).randint(0, 128, (1, 24))
  _, got = _pi_logits(tmp_path / "ckpt", tokens)
  assert rel_err(got, hf_logits(model, tokens)) < 1e-5


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_bf16_safetensors_import_is_exact(tmp_path, out_dtype):
  import torch
  model = make_hf_model(tmp_path / "f32").to(torch.bfloat16)
  model.save_pretrained(str(tmp_path / "bf16"))
  from convert.hf_source import SafetensorsFile
  st = SafetensorsFile(glob.glob(str(tmp_path / "bf16" / "*.safetensors"))[0])
  assert {e["dtype"] for e in st.entries.values()} == {"BF16"}
  convert(str(tmp_path / "bf16"), str(tmp_path / "ckpt"), dtype=out_dtype)
  _, params = pi_jax.load_checkpoint(str(tmp_path / "ckpt"))
  want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [N·H, D]
  got = np.asarray(params["layers"]["wq"][1], np.float32).reshape(72, -1).T
  np.testing.assert_array_equal(got, want)  # bf16 -> f32 (or bf16) is exact
  np.testing.assert_array_equal(np.asarray(params["embed"], np.float32),
                                model.model.embed_tokens.weight.detach().float().numpy())


def test_round_trip_hf_pi_hf_is_bitwise(tmp_path):
  make_hf_model(tmp_path / "hf", {"rope_type": "linear", "factor": 2.0})
  convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  export(str(tmp_path / "ckpt"), str(tmp_path / "back"))
  a, b = _read_all_safetensors(tmp_path / "hf"), _read_all_safetensors(tmp_path / "back")
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype == np.float32
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  cfg_a = json.load(open(tmp_path / "hf" / "config.json"))
  cfg_b = json.load(open(tmp_path / "back" / "config.json"))
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
              "rms_norm_eps", "tie_word_embeddings"):
    assert cfg_a[key] == cfg_b[key], key
  assert cfg_b["rope_parameters"]["rope_type"] == "linear"
  assert cfg_b["rope_parameters"]["factor"] == 2.0


def test_export_loads_in_transformers_without_warnings_and_shards(tmp_path):
  make_hf_model(tmp_path / "hf", tie_word_embeddings=True)
  convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
  out = export(str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_size="30KB")
  shards = sorted(glob.glob(os.path.join(out, "model-*.safetensors")))
  assert len(shards) > 2
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert set(index["weight_map"].values()) == {os.path.basename(s) for s in shards}
  assert all(os.path.getsize(s) < 30_000 + 30_000 for s in shards)
  _, log = _load_hf(out)
  assert "missing" not in log.lower() and "unexpected" not in log.lower() and "not used" not in log.lower(), log
  # The capture is live: a directory with a tensor removed does get a warning naming it.
  from safetensors.numpy import load_file, save_file
  broken = tmp_path / "broken"
  export(str(tmp_path / "ckpt"), str(broken))
  tensors = load_file(str(broken / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
  _, log = _load_hf(broken)
  assert "model.layers.1.mlp.up_proj.weight" in log


def test_pi_scaled_export_matches_pi_jax_at_4x_window(tmp_path):
  """--rope-scaling linear:4 at import; transformers on the export = pi_jax at 4x the window."""
  make_hf_model(tmp_path / "hf")  # trained window 32
  convert(str(tmp_path / "hf"), str(tmp_path / "ckpt"), rope_scaling="linear:4")
  export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
  cfg = json.load(open(tmp_path / "out" / "config.json"))
  assert cfg["rope_parameters"]["rope_type"] == "linear", "export dropped the RoPE scaling"
  assert cfg["rope_parameters"]["factor"] == 4.0
  assert cfg["max_position_embeddings"] == 128
  model, log = _load_hf(tmp_path / "out")
  assert model.config.rope_parameters["rope_type"] == "linear"
  tokens = np.random.RandomState(3).randint(0, 128, (1, 128))
  config, got = _pi_logits(tmp_path / "ckpt", tokens)
  assert config.max_position_embeddings == 128 and config.rope_scaling.factor == 4.0
  want = hf_logits(model, tokens)
  assert rel_err(got, want) < 1e-4
  # The check can see a dropped scaling: unscaled RoPE is > 10x the tolerance away.
  assert rel_err(hf_logits(make_hf_model(tmp_path / "plain"), tokens), want) > 1e-3


def test_import_keeps_source_scaling_and_override_replaces_it(tmp_path):
  make_hf_model(tmp_path / "hf", {"rope_type": "linear", "factor": 2.0})
  convert(str(tmp_path / "hf"), str(tmp_path / "kept"))
  config = pi_jax.checkpoint.load_config(str(tmp_path / "kept"))
  assert (config.rope_scaling.kind, config.rope_scaling.factor) == ("linear", 2.0)
  assert config.rope_scaling.original_max_position_embeddings == 16  # HF window 32 = 2 x 16
  convert(str(tmp_path / "hf"), str(tmp_path / "kf"), rope_scaling="linear:8")
  config = pi_jax.checkpoint.load_config(str(tmp_path / "kf"))
  assert (config.rope_scaling.kind, config.rope_scaling.factor) == ("linear", 8.0)
  assert config.max_position_embeddings == 128
  convert(str(tmp_path / "hf"), str(tmp_path / "js"),
          rope_scaling='{"kind": "yarn", "factor": 4, "beta_fast": 16}')
  config = pi_jax.checkpoint.load_config(str(tmp_path / "js"))
  assert (config.rope_scaling.kind, config.rope_scaling.factor) == ("yarn", 4.0)
  assert config.rope_scaling.beta_fast == 16 and config.max_position_embeddings == 64
  from convert.assemble import ConversionError
  with pytest.raises(ConversionError, match="--rope-scaling 'linear:x'"):
    convert(str(tmp_path / "hf"), str(tmp_path / "bad"), rope_scaling="linear:x")
  assert not os.path.exists(tmp_path / "bad")


def test_cli_round_trip(tmp_path):
  make_hf_model(tmp_path / "hf")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "convert.to_pi_jax", str(tmp_path / "hf"),
                      str(tmp_path / "ckpt"), "--rope-scaling", "linear:2"],
                     capture_output=True, text=True, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr
  assert "rope scaling linear:2" in r.stdout
  r = subprocess.run([sys.executable, "-m", "convert.to_hf", str(tmp_path / "ckpt"),
                      str(tmp_path / "out"), "--dtype", "bfloat16"],
                     capture_output=True, text=True, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr
  cfg = json.load(open(tmp_path / "out" / "config.json"))
  assert cfg["dtype"] == "bfloat16" and cfg["rope_parameters"]["factor"] == 2.0


def test_parse_size():
  assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8
  assert parse_size("1KiB") == 1024 and parse_size("123") == 123
  with pytest.raises(ValueError, match="cannot parse"):
    parse_size("lots")
