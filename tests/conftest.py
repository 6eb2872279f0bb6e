"""Shared test helpers. Tests run on CPU; a few use 8 fake devices in subprocesses."""

import os

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (installed for the TPU compile-only tests) holds /tmp/libtpu_lockfile per process;
# xdist workers and subprocesses each load it to compile for TPU topologies.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TINY_HF = dict(vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=6, num_key_value_heads=2, head_dim=12,
               max_position_embeddings=32)


def make_hf_model(path, rope_parameters=None, seed=0, **overrides):
  """A tiny random transformers LlamaForCausalLM saved at `path`; returns the torch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  rope = {"rope_type": "default", "rope_theta": 10000.0, **(rope_parameters or {})}
  kwargs = {**TINY_HF, **overrides}
  cfg = transformers.LlamaConfig(rope_parameters=rope, **kwargs)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(str(path))
  return model


def hf_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture
def tiny_hf(tmp_path):
  return lambda **kw: (make_hf_model(tmp_path / "hf", **kw), tmp_path / "hf")
