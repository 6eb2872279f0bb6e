"""transformers LlamaForCausalLM <-> pi_jax parameter layout: one name map, two directions.

Each entry names the HF tensor (with `{i}` for the layer), the pi_jax leaf, and the per-tensor
transform. Both layouts use the half-split RoPE layout, so transforms are transpose/reshape only.
Shapes are never listed here: the pi_jax shape comes from the model's modules
(pi_jax.model.param_shapes) and the HF shape is pi_to_hf applied to it (convert/assemble.py).
Arrays here are numpy; nothing imports torch.
"""

from __future__ import annotations

import numpy as np

from pi_jax.config import ModelConfig

# (HF name, pi_jax path, kind). kind says how an HF [out, in] matrix maps to pi_jax.
LAYER_MAP = (
    ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm"), "vector"),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "wq"), "in_proj_q"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "wk"), "in_proj_kv"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "wv"), "in_proj_kv"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "wo"), "out_proj"),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm"), "vector"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "w_gate"), "transpose"),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "w_up"), "transpose"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "w_down"), "transpose"),
)
GLOBAL_MAP = (
    ("model.embed_tokens.weight", ("embed",), "identity"),
    ("model.norm.weight", ("final_norm",), "vector"),
    ("lm_head.weight", ("lm_head",), "transpose"),
)


def hf_to_pi(config: ModelConfig, kind: str, w: np.ndarray) -> np.ndarray:
  """One HF tensor -> its pi_jax layout (one layer's slice for layer tensors)."""
  c = config
  if kind in ("vector", "identity"):
    return w
  if kind == "transpose":
    return w.T
  if kind == "in_proj_q":  # [N·H, D] -> [D, N, H]
    return w.T.reshape(c.hidden_size, c.num_heads, c.head_dim)
  if kind == "in_proj_kv":  # [K·H, D] -> [D, K, H]
    return w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim)
  if kind == "out_proj":  # [D, N·H] -> [N, H, D]
    return w.T.reshape(c.num_heads, c.head_dim, c.hidden_size)
  raise ValueError(kind)


def pi_to_hf(config: ModelConfig, kind: str, w: np.ndarray) -> np.ndarray:
  """Inverse of hf_to_pi."""
  c = config
  if kind in ("vector", "identity"):
    return w
  if kind == "transpose":
    return w.T
  if kind in ("in_proj_q", "in_proj_kv"):  # [D, N, H] -> [N·H, D]
    return w.reshape(c.hidden_size, -1).T
  if kind == "out_proj":  # [N, H, D] -> [D, N·H]
    return w.reshape(-1, c.hidden_size).T
  raise ValueError(kind)


def hf_names(config: ModelConfig):
  """Yields (hf_name, pi_path, kind, layer or None) for every tensor the model has."""
  for hf_name, path, kind in GLOBAL_MAP:
    if path == ("lm_head",) and config.tie_word_embeddings:
      continue
    yield hf_name, path, kind, None
  for i in range(config.num_layers):
    for hf_name, path, kind in LAYER_MAP:
      yield hf_name.format(i=i), path, kind, i
