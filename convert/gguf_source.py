"""Source: a llama.cpp GGUF file (LLaMA architecture), dequantized tensor by tensor.

llama.cpp stores wq/wk with each head's rows reordered from HF's half-split RoPE layout to the
interleaved-pair layout its kernels use; `_unpermute` undoes that, so tensors come out in HF
layout. The file is memory-mapped by GGUFReader; only one dequantized tensor lives at a time.
The embedded tokenizer is rebuilt as a Hugging Face tokenizer.json by transformers at
conversion time, so loading it later needs only the `tokenizers` package.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref

import numpy as np

from convert.assemble import ConversionError
from pi_jax.config import ModelConfig

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
LLAMA_ARCHS = ("llama", "mistral")
DEQUANT_ROWS = 1024


def gguf_to_hf_name(name: str) -> str | None:
  """llama.cpp tensor name -> HF name (None for tensors pi_jax has no slot for)."""
  if name in GLOBAL_NAMES:
    return GLOBAL_NAMES[name]
  parts = name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in LAYER_NAMES:
    return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.weight"
  return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permute: per head, rows (H/2, 2) interleaved -> (2, H/2)."""
  out, d = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permute (HF half-split -> interleaved pairs); used by tests to write GGUFs."""
  out, d = w.shape
  return w.reshape(n_heads, 2, out // n_heads // 2, d).swapaxes(1, 2).reshape(out, d)


class GGUFSource:
  """Serves HF-named float32 tensors from a GGUF file."""

  def __init__(self, path: str):
    self.path = path
    try:
      from gguf import GGUFReader
    except ImportError:
      raise ConversionError(f"{path}: reading GGUF files needs the `gguf` package") from None
    try:
      self.reader = GGUFReader(path, "r")
    except Exception as e:  # truncated headers raise ValueError/IndexError/struct errors
      raise ConversionError(f"{path}: not a readable GGUF file (truncated or corrupted?): "
                            f"{type(e).__name__}: {e}") from None
    self.arch = self._field("general.architecture", required=True)
    if self.arch not in LLAMA_ARCHS:
      raise ConversionError(f"{path}: architecture {self.arch!r} is not LLaMA-like "
                            f"(supported: {LLAMA_ARCHS})")
    self.tensors = {t.name: t for t in self.reader.tensors}
    if "rope_freqs.weight" in self.tensors:
      raise ConversionError(f"{path}: holds 'rope_freqs.weight' (Llama 3.1 frequency factors); "
                            "import that model from its Hugging Face or Meta files instead")
    self._config: ModelConfig | None = None
    self._tmp: str | None = None

  def _field(self, key: str, default=None, required: bool = False):
    field = self.reader.fields.get(key)
    if field is None:
      if required:
        raise ConversionError(f"{self.path}: GGUF metadata {key!r} is missing")
      return default
    try:
      return field.contents()
    except Exception as e:
      raise ConversionError(f"{self.path}: GGUF metadata {key!r} is unreadable: {e}") from None

  def _arch_field(self, key: str, default=None, required: bool = False):
    return self._field(f"{self.arch}.{key}", default, required)

  def config(self) -> ModelConfig:
    if self._config is not None:
      return self._config
    a = self._arch_field
    n_heads = int(a("attention.head_count", required=True))
    hidden = int(a("embedding_length", required=True))
    vocab = a("vocab_size")
    if vocab is None:
      tokens = self.reader.fields.get("tokenizer.ggml.tokens")
      if tokens is None and "token_embd.weight" in self.tensors:
        vocab = int(self.tensors["token_embd.weight"].shape[-1])
      elif tokens is not None:
        vocab = len(tokens.data)
    # An HF-style dict, so ModelConfig.from_hf applies the same window/scaling rules as HF.
    hf = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": a("feed_forward_length", required=True),
        "num_hidden_layers": a("block_count", required=True),
        "num_attention_heads": n_heads,
        "num_key_value_heads": a("attention.head_count_kv") or n_heads,
        "head_dim": a("rope.dimension_count") or a("attention.key_length") or hidden // n_heads,
        "max_position_embeddings": a("context_length", 2048),
        "rope_theta": float(a("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": "output.weight" not in self.tensors,
        "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
        "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
    }
    kind = a("rope.scaling.type")
    factor = a("rope.scaling.factor")
    if kind is None and a("rope.scale_linear") is not None:  # older llama.cpp files
      kind, factor = "linear", a("rope.scale_linear")
    if kind not in (None, "none") and factor is not None and float(factor) != 1.0:
      if kind not in ("linear", "yarn"):
        raise ConversionError(f"{self.path}: unsupported rope.scaling.type {kind!r}")
      rope = {"rope_type": kind, "factor": float(factor)}
      original = a("rope.scaling.original_context_length")
      if original:
        rope["original_max_position_embeddings"] = int(original)
      if kind == "yarn":
        # llama.cpp multiplies attn_factor by YaRN's own 1 + 0.1·ln(factor) (convert/to_gguf.py).
        attn = a("rope.scaling.attn_factor")
        if attn is not None and float(attn) != 1.0:
          rope["attention_factor"] = float(attn) * (1.0 + 0.1 * math.log(float(factor)))
        for key in ("beta_fast", "beta_slow"):
          if a(f"rope.scaling.yarn_{key}") is not None:
            rope[key] = float(a(f"rope.scaling.yarn_{key}"))
      hf["rope_scaling"] = rope
    try:
      self._config = ModelConfig.from_hf(hf)
    except (TypeError, ValueError) as e:
      raise ConversionError(f"{self.path}: metadata does not describe a valid model: {e}") from None
    return self._config

  def tensor_names(self) -> list[str]:
    """Every tensor in the file: its HF name, or its GGUF name where pi_jax has no slot."""
    return [gguf_to_hf_name(n) or n for n in self.tensors]

  def tensor(self, hf_name: str) -> np.ndarray | None:
    if not hasattr(self, "_by_hf"):
      self._by_hf = {gguf_to_hf_name(n): n for n in self.tensors}
    name = self._by_hf.get(hf_name)
    if name is None:
      return None
    t = self.tensors[name]
    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
      raise ConversionError(f"{self.path}: tensor {name!r} has unsupported type {qtype} "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
    from gguf import quants
    try:
      # ggml lists dims fastest-first: [in, out] is HF's [out, in] matrix.
      shape = tuple(int(x) for x in reversed(t.shape))
      data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
      w = np.empty((data.shape[0], int(t.shape[0]) if len(shape) > 1 else int(np.prod(shape))),
                   np.float32)
      # In row blocks: gguf's dequantizers make several full-size temporaries.
      for r in range(0, data.shape[0], DEQUANT_ROWS):
        block = quants.dequantize(data[r:r + DEQUANT_ROWS], t.tensor_type)
        w[r:r + DEQUANT_ROWS] = block.reshape(-1, w.shape[1])
      w = w.reshape(shape)
    except Exception as e:
      raise ConversionError(f"{self.path}: could not read tensor {name!r} (truncated or "
                            f"corrupted?): {type(e).__name__}: {e}") from None
    c = self.config()
    if name.endswith("attn_q.weight"):
      w = self._checked_unpermute(name, w, c.num_heads)
    elif name.endswith("attn_k.weight"):
      w = self._checked_unpermute(name, w, c.num_kv_heads)
    return w

  def _checked_unpermute(self, name, w, n_heads):
    if w.ndim != 2 or w.shape[0] % (2 * n_heads):
      raise ConversionError(f"{self.path}: tensor {name!r} of shape {w.shape} cannot hold "
                            f"{n_heads} heads")
    return _unpermute(w, n_heads)

  def tokenizer_files(self) -> dict[str, str]:
    """HF tokenizer files rebuilt from the embedded vocabulary (needs transformers)."""
    if self._tmp is not None:
      return self._tokenizer_files
    if "tokenizer.ggml.tokens" not in self.reader.fields:
      return {}
    try:
      from transformers import AutoTokenizer
    except ImportError:
      raise ConversionError(f"{self.path}: converting the embedded GGUF tokenizer needs "
                            "transformers (pip install 'pi_jax[convert]')") from None
    self.config()  # reads what it needs from the metadata before it is dropped below
    self._tmp = tempfile.mkdtemp(prefix="pi_jax_gguf_tok_")
    weakref.finalize(self, shutil.rmtree, self._tmp, True)
    try:
      tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(self.path)),
                                          gguf_file=os.path.basename(self.path))
      tok.save_pretrained(self._tmp)
    except Exception as e:
      raise ConversionError(f"{self.path}: could not convert the embedded tokenizer: "
                            f"{type(e).__name__}: {e}") from None
    del tok
    # The parsed metadata fields (vocabulary, merges) held ~90 MB for SmolLM2's 49k vocabulary;
    # only the tensors are needed from here on.
    self.reader.fields = {}
    self._tokenizer_files = {f"tokenizer/{n}": os.path.join(self._tmp, n)
                             for n in sorted(os.listdir(self._tmp))
                             if os.path.isfile(os.path.join(self._tmp, n))}
    return self._tokenizer_files
