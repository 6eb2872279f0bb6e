"""Meta LLaMA layout (params.json + consolidated.NN.pth): merging shards, RoPE permutation."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from conftest import hf_logits, make_hf_model, rel_err
from convert.gguf_source import permute_for_gguf
from convert.meta_source import meta_intermediate_size
from convert.to_pi_jax import convert

# (meta name, HF name, split dim across model-parallel shards or None when replicated)
META_LAYER = (
    ("attention_norm", "input_layernorm", None), ("attention.wq", "self_attn.q_proj", 0),
    ("attention.wk", "self_attn.k_proj", 0), ("attention.wv", "self_attn.v_proj", 0),
    ("attention.wo", "self_attn.o_proj", 1), ("ffn_norm", "post_attention_layernorm", None),
    ("feed_forward.w1", "mlp.gate_proj", 0), ("feed_forward.w3", "mlp.up_proj", 0),
    ("feed_forward.w2", "mlp.down_proj", 1),
)


def write_meta(model, path, n_shards, vocab_size=None, embed_dim=1, tokenizer=None):
  """Writes a transformers LLaMA in Meta's release layout, as Meta's own code shards it."""
  import torch
  cfg = model.config
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  meta = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], embed_dim),
          "norm.weight": (sd["model.norm.weight"], None),
          "output.weight": (sd["lm_head.weight"], 0)}
  for i in range(cfg.num_hidden_layers):
    for meta_name, hf_name, dim in META_LAYER:
      w = sd[f"model.layers.{i}.{hf_name}.weight"]
      if meta_name == "attention.wq":  # back to Meta's interleaved-pair RoPE rows
        w = torch.from_numpy(permute_for_gguf(w.numpy(), cfg.num_attention_heads))
      if meta_name == "attention.wk":
        w = torch.from_numpy(permute_for_gguf(w.numpy(), cfg.num_key_value_heads))
      meta[f"layers.{i}.{meta_name}.weight"] = (w, dim)
  os.makedirs(path, exist_ok=True)
  for s in range(n_shards):
    shard = {}
    for name, (w, dim) in meta.items():
      shard[name] = w.clone() if dim is None else torch.chunk(w, n_shards, dim=dim)[s].clone()
    torch.save(shard, os.path.join(path, f"consolidated.{s:02d}.pth"))
  intermediate = cfg.intermediate_size
  params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
            "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
            "vocab_size": vocab_size if vocab_size is not None else cfg.vocab_size,
            "multiple_of": 32, "ffn_dim_multiplier": intermediate / (2 * 4 * cfg.hidden_size // 3),
            "norm_eps": cfg.rms_norm_eps, "rope_theta": 10000.0}
  assert meta_intermediate_size(cfg.hidden_size, 32, params["ffn_dim_multiplier"]) == intermediate
  with open(os.path.join(path, "params.json"), "w") as f:
    json.dump(params, f)
  if tokenizer:
    import shutil
    shutil.copy(tokenizer, os.path.join(os.path.dirname(path), "tokenizer.model"))


@pytest.mark.parametrize("n_shards,embed_dim", [(1, 1), (2, 1), (2, 0)],
                         ids=["1shard", "2shards-llama2", "2shards-vocab-split"])
def test_meta_layout_equals_hf_logits(tmp_path, n_shards, embed_dim):
  model = make_hf_model(tmp_path / "hf")
  write_meta(model, str(tmp_path / "meta" / "7B"), n_shards, embed_dim=embed_dim)
  convert(str(tmp_path / "meta" / "7B"), str(tmp_path / "ckpt"))
  config, params = pi_jax.load_checkpoint(str(tmp_path / "ckpt"))
  assert (config.num_kv_heads, config.intermediate_size) == (2, 96)
  tokens = np.random.RandomState(0).randint(0, 128, (2, 24))
  got = pi_jax.forward(config, params, jnp.asarray(tokens, jnp.int32))
  assert rel_err(got, hf_logits(model, tokens)) < 1e-5
  # The permutation is needed: without it (HF rows stored as-is), logits differ.
  if n_shards == 2:
    convert(str(tmp_path / "hf"), str(tmp_path / "ref"))
    _, ref = pi_jax.load_checkpoint(str(tmp_path / "ref"))
    np.testing.assert_array_equal(np.asarray(params["layers"]["wq"]), np.asarray(ref["layers"]["wq"]))
    np.testing.assert_array_equal(np.asarray(params["layers"]["wk"]), np.asarray(ref["layers"]["wk"]))


def test_meta_vocab_from_tokenizer_and_scaled_rope(tmp_path):
  from test_tokenizer import train_sentencepiece
  sp_file = train_sentencepiece(tmp_path / "sp", vocab_size=400)
  model = make_hf_model(tmp_path / "hf", vocab_size=400)
  write_meta(model, str(tmp_path / "meta" / "7B"), 2, vocab_size=-1, tokenizer=sp_file)
  params_file = tmp_path / "meta" / "7B" / "params.json"
  p = json.load(open(params_file))
  p["use_scaled_rope"] = True
  p["rope_theta"] = 500000.0
  json.dump(p, open(params_file, "w"))
  convert(str(tmp_path / "meta" / "7B"), str(tmp_path / "ckpt"))
  config = pi_jax.checkpoint.load_config(str(tmp_path / "ckpt"))
  assert config.vocab_size == 400  # from tokenizer.model in the parent directory
  assert config.rope_scaling.kind == "llama3" and config.rope_scaling.factor == 8.0
  assert config.rope_scaling.original_max_position_embeddings == 8192
  assert config.max_position_embeddings == 65536 and config.rope_theta == 500000.0
  assert os.path.isfile(tmp_path / "ckpt" / "tokenizer" / "tokenizer.model")
  tok = pi_jax.load_tokenizer(str(tmp_path / "ckpt"))
  assert tok.kind == "tokenizer.model" and tok.vocab_size == 400
