"""Bad input: each error names the file and what is wrong, and OUT never appears."""

import json
import os
import pickle
import shutil

import pytest

from conftest import make_hf_model
from convert.assemble import ConversionError
from convert.to_pi_jax import convert
from test_convert_meta import write_meta


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("src") / "hf"
  make_hf_model(path)
  return path


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _fails(src, out, match, **kw):
  with pytest.raises(ConversionError, match=match):
    convert(str(src), str(out), **kw)
  assert not os.path.exists(out)
  assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]  # no temp left


def test_missing_source_and_files(tmp_path, hf_dir):
  _fails(tmp_path / "nope", tmp_path / "out", r"nope: no such file")
  (tmp_path / "empty").mkdir()
  _fails(tmp_path / "empty", tmp_path / "out", r"empty: neither config.json")
  src = _copy(hf_dir, tmp_path / "noweights")
  os.remove(src / "model.safetensors")
  _fails(src, tmp_path / "out", r"noweights: no \*.safetensors or pytorch_model\*.bin")


def test_unknown_architecture(tmp_path, hf_dir):
  src = _copy(hf_dir, tmp_path / "gpt")
  cfg = json.load(open(src / "config.json"))
  json.dump({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
            open(src / "config.json", "w"))
  _fails(src, tmp_path / "out", r"gpt/config.json: model_type 'gpt2' is not a LLaMA-family")


def test_shape_mismatch_between_config_and_tensors(tmp_path, hf_dir):
  src = _copy(hf_dir, tmp_path / "wide")
  cfg = json.load(open(src / "config.json"))
  json.dump({**cfg, "intermediate_size": 128}, open(src / "config.json", "w"))
  _fails(src, tmp_path / "out", r"wide: tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
         r"\(96, 72\), but the config implies \(128, 72\)")


def test_missing_tensor(tmp_path, hf_dir):
  from safetensors.numpy import load_file, save_file
  src = _copy(hf_dir, tmp_path / "holes")
  tensors = load_file(str(src / "model.safetensors"))
  del tensors["model.layers.1.self_attn.v_proj.weight"]
  save_file(tensors, str(src / "model.safetensors"))
  _fails(src, tmp_path / "out", r"holes: tensor 'model.layers.1.self_attn.v_proj.weight' is missing")


def test_existing_out_needs_force(tmp_path, hf_dir):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(ConversionError, match=r"out already exists; pass --force"):
    convert(str(hf_dir), str(out))
  assert (out / "old.txt").exists()
  convert(str(hf_dir), str(out), force=True)
  assert not (out / "old.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupted_safetensors(tmp_path, hf_dir, damage):
  src = _copy(hf_dir, tmp_path / "bad")
  file = src / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
  _fails(src, tmp_path / "out", r"bad/model.safetensors: (not a readable safetensors|truncated)")


def test_truncated_meta_pth(tmp_path):
  model = make_hf_model(tmp_path / "hf")
  write_meta(model, str(tmp_path / "meta"), 2)
  shard = tmp_path / "meta" / "consolidated.01.pth"
  shard.write_bytes(shard.read_bytes()[:5000])
  _fails(tmp_path / "meta", tmp_path / "out", r"consolidated.01.pth: not a readable PyTorch checkpoint")
  os.remove(shard)
  write_meta(model, str(tmp_path / "meta3"), 2)
  os.rename(tmp_path / "meta3" / "consolidated.01.pth", tmp_path / "meta3" / "consolidated.02.pth")
  _fails(tmp_path / "meta3", tmp_path / "out", r"meta3: shards \[0, 2\].*a shard is missing")


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's warning about the refused global
def test_pickle_code_execution_is_refused(tmp_path, hf_dir):
  import torch
  src = tmp_path / "evil"
  src.mkdir()
  shutil.copy(hf_dir / "config.json", src)
  marker = tmp_path / "PWNED"
  state = {"model.embed_tokens.weight": torch.zeros(2), "x": _Exploit(marker)}
  # torch.save pickles the object; loading with weights_only=False would run `touch`.
  torch.save(state, src / "pytorch_model.bin", pickle_protocol=pickle.DEFAULT_PROTOCOL)
  assert not marker.exists()
  _fails(src, tmp_path / "out", r"evil/pytorch_model.bin: refused: the pickle holds objects")
  assert not marker.exists(), "the planted pickle ran code"


def test_export_errors(tmp_path, hf_dir):
  from convert.to_hf import export
  with pytest.raises(ConversionError, match=r"notckpt is not a pi_jax checkpoint"):
    export(str(tmp_path / "notckpt"), str(tmp_path / "hf_out"))
  assert not os.path.exists(tmp_path / "hf_out")
  convert(str(hf_dir), str(tmp_path / "ckpt"))
  (tmp_path / "hf_out").mkdir()
  with pytest.raises(ConversionError, match=r"hf_out already exists; pass --force"):
    export(str(tmp_path / "ckpt"), str(tmp_path / "hf_out"))
  export(str(tmp_path / "ckpt"), str(tmp_path / "hf_out"), force=True)
  assert os.path.isfile(tmp_path / "hf_out" / "model.safetensors")
