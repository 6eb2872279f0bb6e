"""Source: Meta's original LLaMA release (params.json + consolidated.NN.pth model-parallel shards).

Each tensor is rebuilt from its slices in the NN shards (mmapped, so a shard is not read in
full): column-parallel matrices (wq, wk, wv, w1, w3, output) are split on the output dim 0,
row-parallel ones (wo, w2) on the input dim 1, the embedding on dim 1 (LLaMA 1/2) or dim 0
(LLaMA 3), norms are replicated. Meta's wq/wk rows are in interleaved-pair RoPE order; they are
permuted to HF's half-split order here, so tensors come out in HF layout.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from convert.assemble import ConversionError
from convert.gguf_source import _unpermute
from convert.hf_source import load_torch_file, torch_to_numpy
from pi_jax.config import ModelConfig

# HF name template -> (Meta name template, concat dim or None for replicated)
LAYER_NAMES = {
    "input_layernorm": ("attention_norm", None),
    "self_attn.q_proj": ("attention.wq", 0),
    "self_attn.k_proj": ("attention.wk", 0),
    "self_attn.v_proj": ("attention.wv", 0),
    "self_attn.o_proj": ("attention.wo", 1),
    "post_attention_layernorm": ("ffn_norm", None),
    "mlp.gate_proj": ("feed_forward.w1", 0),
    "mlp.up_proj": ("feed_forward.w3", 0),
    "mlp.down_proj": ("feed_forward.w2", 1),
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", "embed"),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}
# LLaMA 3.1 (use_scaled_rope): the frequency rescaling Meta's reference code applies.
LLAMA31_SCALING = {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """The MLP width Meta's FeedForward derives: 2/3·4·dim, times the multiplier, rounded up."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def default_window(params: dict) -> int:
  """Meta's params.json has no window; these are the released models' trained windows."""
  for key in ("max_seq_len", "max_position_embeddings"):
    if params.get(key):
      return int(params[key])
  if float(params.get("rope_theta", 10000.0)) >= 500000.0:
    return 8192  # LLaMA 3
  return 2048 if float(params.get("norm_eps", 1e-6)) < 1e-5 else 4096  # LLaMA 1 vs 2


def find_tokenizer_model(path: str) -> str | None:
  for folder in (path, os.path.dirname(os.path.abspath(path))):
    file = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(file):
      return file
  return None


class MetaSource:
  """Serves HF-named tensors merged from Meta's consolidated.NN.pth shards."""

  def __init__(self, path: str):
    self.path = path
    params_file = os.path.join(path, "params.json")
    try:
      with open(params_file) as f:
        self.params = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ConversionError(f"{params_file}: cannot read: {e}") from None
    if not isinstance(self.params, dict) or "dim" not in self.params:
      raise ConversionError(f"{params_file}: not a Meta LLaMA params.json (no 'dim')")
    files = glob.glob(os.path.join(path, "consolidated.*.pth"))
    by_index = {}
    for f in files:
      m = re.fullmatch(r"consolidated\.(\d+)\.pth", os.path.basename(f))
      if m:
        by_index[int(m.group(1))] = f
    if not by_index:
      raise ConversionError(f"{path}: no consolidated.NN.pth weight shards found")
    if sorted(by_index) != list(range(len(by_index))):
      raise ConversionError(f"{path}: shards {sorted(by_index)} are not consolidated.00 .. "
                            f"{len(by_index) - 1:02d} (a shard is missing)")
    self.files = [by_index[i] for i in range(len(by_index))]
    self.tokenizer_model = find_tokenizer_model(path)
    self._shards: list[dict] | None = None
    self._config: ModelConfig | None = None

  def _vocab_size(self) -> int:
    vocab = int(self.params.get("vocab_size", -1))
    if vocab > 0:
      return vocab
    if self.tokenizer_model is None:
      raise ConversionError(f"{os.path.join(self.path, 'params.json')}: vocab_size is -1 and no "
                            f"tokenizer.model was found in {self.path} or its parent")
    return self._sentencepiece().GetPieceSize()

  def _sentencepiece(self):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    try:
      sp.Load(self.tokenizer_model)
    except Exception as e:
      raise ConversionError(f"{self.tokenizer_model}: not a sentencepiece model: {e}") from None
    return sp

  def config(self) -> ModelConfig:
    if self._config is not None:
      return self._config
    p = self.params
    params_file = os.path.join(self.path, "params.json")
    try:
      dim, n_heads = int(p["dim"]), int(p["n_heads"])
      bos, eos = 1, 2
      if self.tokenizer_model is not None and int(p.get("vocab_size", -1)) <= 0:
        sp = self._sentencepiece()
        bos, eos = sp.bos_id(), sp.eos_id()
      elif float(p.get("rope_theta", 10000.0)) >= 500000.0:
        bos, eos = 128000, 128001  # LLaMA 3's <|begin_of_text|>, <|end_of_text|>
      config = ModelConfig(
          vocab_size=self._vocab_size(),
          hidden_size=dim,
          intermediate_size=meta_intermediate_size(dim, int(p.get("multiple_of", 256)),
                                                   p.get("ffn_dim_multiplier")),
          num_layers=int(p["n_layers"]),
          num_heads=n_heads,
          num_kv_heads=int(p.get("n_kv_heads") or n_heads),
          max_position_embeddings=default_window(p),
          rope_theta=float(p.get("rope_theta", 10000.0)),
          rms_norm_eps=float(p.get("norm_eps", 1e-6)),
          tie_word_embeddings=False,
          bos_token_id=bos if bos >= 0 else None,
          eos_token_id=eos if eos >= 0 else None,
      )
    except KeyError as e:
      raise ConversionError(f"{params_file}: missing key {e}") from None
    except (TypeError, ValueError) as e:
      raise ConversionError(f"{params_file}: {e}") from None
    if p.get("use_scaled_rope"):
      config = config.with_rope_scaling(LLAMA31_SCALING)
    self._config = config
    return config

  def _load_shards(self) -> list[dict]:
    if self._shards is None:
      self._shards = [load_torch_file(f) for f in self.files]  # mmapped, read on access
    return self._shards

  def tensor_names(self) -> list[str]:
    """Every tensor in the shards: its HF name, or its Meta name where pi_jax has no slot."""
    to_hf = {meta: hf for hf, (meta, _) in GLOBAL_NAMES.items()}
    layer_to_hf = {meta: hf for hf, (meta, _) in LAYER_NAMES.items()}
    out = set()
    for shard in self._load_shards():
      for name in shard:
        m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
        if name in to_hf:
          out.add(to_hf[name])
        elif m and m.group(2) in layer_to_hf:
          out.add(f"model.layers.{m.group(1)}.{layer_to_hf[m.group(2)]}.weight")
        else:
          out.add(name)
    return sorted(out)

  def _meta_name(self, hf_name: str):
    if hf_name in GLOBAL_NAMES:
      return GLOBAL_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if m and m.group(2) in LAYER_NAMES:
      name, dim = LAYER_NAMES[m.group(2)]
      return f"layers.{m.group(1)}.{name}.weight", dim
    return None, None

  def tensor(self, hf_name: str) -> np.ndarray | None:
    meta_name, dim = self._meta_name(hf_name)
    if meta_name is None:
      return None
    shards = self._load_shards()
    parts = []
    for file, shard in zip(self.files, shards):
      if meta_name not in shard:
        if not parts:
          return None  # absent everywhere: assemble reports it
        raise ConversionError(f"{file}: tensor {meta_name!r} is missing from this shard")
      parts.append(shard[meta_name])
    c = self.config()
    if dim == "embed":  # split on the embedding dim (LLaMA 1/2) or on the vocab (LLaMA 3)
      dim = 1 if len(parts) == 1 or sum(int(t.shape[1]) for t in parts) == c.hidden_size else 0
    try:
      if dim is None or len(parts) == 1:
        w = torch_to_numpy(parts[0])
      else:
        w = np.concatenate([torch_to_numpy(t) for t in parts], axis=dim)
    except Exception as e:
      raise ConversionError(f"{self.files[0]}..: could not read or merge {meta_name!r} "
                            f"(truncated, corrupted or inconsistent shards?): {e}") from None
    if meta_name.endswith("attention.wq.weight"):
      w = self._unpermute(meta_name, w, c.num_heads)
    elif meta_name.endswith("attention.wk.weight"):
      w = self._unpermute(meta_name, w, c.num_kv_heads)
    return w

  def _unpermute(self, name, w, n_heads):
    c = self.config()
    if w.shape != (n_heads * c.head_dim, c.hidden_size):
      raise ConversionError(f"{self.path}: merged {name!r} has shape {w.shape}, the config "
                            f"implies {(n_heads * c.head_dim, c.hidden_size)}")
    return _unpermute(w, n_heads)

  def tokenizer_files(self) -> dict[str, str]:
    if self.tokenizer_model is None:
      return {}
    try:
      self._sentencepiece()
    except ConversionError:
      import warnings
      warnings.warn(f"{self.tokenizer_model} is not a sentencepiece model (LLaMA 3 uses "
                    "tiktoken); the checkpoint gets no tokenizer")
      return {}
    return {"tokenizer/tokenizer.model": self.tokenizer_model}
