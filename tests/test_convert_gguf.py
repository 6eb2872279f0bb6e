"""GGUF import on tiny files written with the `gguf` package, checked against transformers."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from conftest import hf_logits, make_hf_model, rel_err
from convert.assemble import ConversionError
from convert.gguf_source import permute_for_gguf
from convert.to_pi_jax import convert

# Q8_0 packs rows in blocks of 32, so every matrix's input dim must be a multiple of 32.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32)
LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def write_gguf(model, path, qtype="F32", arch="llama", linear_factor=None):
  """A transformers LLaMA as llama.cpp's converter writes it (q/k rows permuted)."""
  import gguf
  cfg = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if linear_factor:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(linear_factor)
  sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
  if not cfg.tie_word_embeddings:
    names["lm_head.weight"] = "output.weight"
  for i in range(cfg.num_hidden_layers):
    for hf, gg in LAYER.items():
      names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
  for hf, gg in names.items():
    t = sd[hf]
    if gg.endswith("attn_q.weight"):
      t = permute_for_gguf(t, cfg.num_attention_heads)
    if gg.endswith("attn_k.weight"):
      t = permute_for_gguf(t, cfg.num_key_value_heads)
    if t.ndim == 1 or qtype == "F32":
      w.add_tensor(gg, np.ascontiguousarray(t, np.float32))
    elif qtype == "F16":
      w.add_tensor(gg, np.ascontiguousarray(t, np.float16))
    else:
      q = getattr(gguf.GGMLQuantizationType, qtype)
      w.add_tensor(gg, gguf.quants.quantize(np.ascontiguousarray(t, np.float32), q), raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _pi_logits(ckpt, tokens):
  config, params = pi_jax.load_checkpoint(str(ckpt))
  return config, np.asarray(pi_jax.forward(config, params, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_f32_gguf_equals_hf_model(tmp_path, tie):
  model = make_hf_model(tmp_path / "hf", tie_word_embeddings=tie, **TINY)
  write_gguf(model, tmp_path / "m.gguf")
  convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))
  tokens = np.random.RandomState(0).randint(0, 128, (2, 24))
  config, got = _pi_logits(tmp_path / "ckpt", tokens)
  assert config.tie_word_embeddings == tie and config.num_kv_heads == 2
  assert rel_err(got, hf_logits(model, tokens)) < 1e-5


# Q4_K / Q6_K: the gguf package can dequantize them but not write them, so no test file here.
@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_equals_transformers_gguf_loading(tmp_path, qtype):
  import torch
  import transformers
  model = make_hf_model(tmp_path / "hf", **TINY)
  write_gguf(model, tmp_path / "m.gguf", qtype)
  convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
  tokens = np.random.RandomState(1).randint(0, 128, (1, 24))
  _, got = _pi_logits(tmp_path / "ckpt", tokens)
  want = hf_logits(ref, tokens)
  assert rel_err(got, want) < 1e-5
  if not qtype.startswith("Q4"):  # 4-bit error on a random tiny model is large
    assert rel_err(got, hf_logits(model, tokens)) < 0.05


def test_gguf_linear_scaling_is_kept(tmp_path):
  model = make_hf_model(tmp_path / "hf", **{**TINY, "max_position_embeddings": 128},
                        rope_parameters={"rope_type": "linear", "factor": 4.0})
  write_gguf(model, tmp_path / "m.gguf", linear_factor=4.0)
  convert(str(tmp_path / "m.gguf"), str(tmp_path / "ckpt"))
  tokens = np.random.RandomState(2).randint(0, 128, (1, 100))
  config, got = _pi_logits(tmp_path / "ckpt", tokens)
  assert (config.rope_scaling.kind, config.rope_scaling.factor) == ("linear", 4.0)
  assert config.max_position_embeddings == 128 and config.original_window == 32
  assert rel_err(got, hf_logits(model, tokens)) < 1e-4


def test_bad_gguf(tmp_path):
  model = make_hf_model(tmp_path / "hf", **TINY)
  write_gguf(model, tmp_path / "gpt.gguf", arch="gpt2")
  with pytest.raises(ConversionError, match=r"gpt.gguf: architecture 'gpt2' is not LLaMA-like"):
    convert(str(tmp_path / "gpt.gguf"), str(tmp_path / "out"))
  good = write_gguf(model, tmp_path / "m.gguf").read_bytes()
  for name, data in (("trunc.gguf", good[: len(good) // 2]), ("head.gguf", good[:100]),
                     ("junk.gguf", b"GGUF" + b"\xff" * 200)):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConversionError, match=rf"{name}: (not a readable GGUF|could not read)"):
      convert(str(tmp_path / name), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
