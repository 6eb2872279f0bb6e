"""Export a pi_jax checkpoint as a llama.cpp GGUF file, with the RoPE scaling intact.

  python -m convert.to_gguf CKPT OUT.gguf [--dtype f32|f16|bf16|q8_0] [--force]

OUT is a LLaMA-architecture GGUF written by the `gguf` package (llama.cpp's own writer): the
context length is the extended window, the tensors have llama.cpp's names and its interleaved
q/k row order, the tokenizer comes from CKPT/tokenizer/, and the RoPE scaling is in llama.cpp's
keys: linear (PI) and YaRN as `rope.scaling.*`, llama3 as the `rope_freqs` tensor, fixed NTK
as the changed `rope.freq_base`. Dynamic NTK and LongRoPE have no llama.cpp form for this
architecture and are refused. Weights stream one tensor at a time: each layer's slice of a
stacked checkpoint array is read when its GGUF tensor is written, and encoded in row blocks, so
memory beyond the imports is about the largest tensor; OUT appears atomically.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import numpy as np

from convert import hf_layout
from convert.assemble import ConversionError, check_output
from convert.gguf_source import GLOBAL_NAMES, LAYER_NAMES, permute_for_gguf
from convert.to_pi_jax import HelpFormatter, exit_on_sigterm
from pi_jax import files
from pi_jax.config import ModelConfig

DTYPES = ("f32", "f16", "bf16", "q8_0")
QUANT_ROWS = 1024
BLOCK_BYTES = 4 * 2**20  # float32 rows encoded and written at a time
ARCH = "llama"
# HF name -> GGUF name, from the import's map (one table, two directions).
_HF_TO_GGUF = {hf: gg for gg, hf in GLOBAL_NAMES.items()}
_HF_LAYER_TO_GGUF = {hf: gg for gg, hf in LAYER_NAMES.items()}
# YaRN's default attention factor: llama.cpp multiplies rope.scaling.attn_factor by it.
_YARN_MSCALE = lambda factor: 1.0 if factor <= 1 else 1.0 + 0.1 * math.log(factor)
# llama.cpp's pre-tokenizer names for the tokenizers.json pre-tokenizers we recognise.
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
                 "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def gguf_name(hf_name: str) -> str:
  if hf_name in _HF_TO_GGUF:
    return _HF_TO_GGUF[hf_name]
  _, _, layer, *rest = hf_name.split(".")
  return f"blk.{layer}.{_HF_LAYER_TO_GGUF['.'.join(rest[:-1])]}.weight"


# --- RoPE scaling -------------------------------------------------------------------------------

def rope_metadata(config: ModelConfig) -> tuple[dict, np.ndarray | None, list[str]]:
  """({gguf key suffix: value}, rope_freqs or None, warnings) for config's RoPE scaling.

  Raises ConversionError for a scaling llama.cpp cannot run exactly.
  """
  from gguf import RopeScalingType
  s, keys, warnings = config.rope_scaling, {"rope.freq_base": float(config.rope_theta)}, []
  if s.kind == "none":
    return keys, None, warnings
  if s.kind == "linear":
    keys.update({"rope.scaling.type": RopeScalingType.LINEAR.value,
                 "rope.scaling.factor": float(s.factor),
                 "rope.scaling.original_context_length": config.original_window})
    return keys, None, warnings
  if s.kind == "ntk":
    # Fixed NTK-aware scaling is a plain base change (rope.py): θ' = θ·s^(d/(d-2)).
    d = config.head_dim
    keys["rope.freq_base"] = float(config.rope_theta * s.factor ** (d / (d - 2)))
    return keys, None, warnings
  if s.kind == "yarn":
    if not s.truncate:
      raise ConversionError("RoPE scaling yarn with truncate=false: llama.cpp always rounds the "
                            "YaRN correction range; export it with truncate=true or as HF "
                            "(python -m convert.to_hf)")
    from pi_jax.rope import inv_freq_and_factor
    _, attention = inv_freq_and_factor(config)
    keys.update({"rope.scaling.type": RopeScalingType.YARN.value,
                 "rope.scaling.factor": float(s.factor),
                 "rope.scaling.original_context_length": int(s.original_max_position_embeddings),
                 # llama.cpp applies 1 + 0.1·ln(factor) itself and multiplies by this key.
                 "rope.scaling.attn_factor": float(attention / _YARN_MSCALE(s.factor)),
                 "rope.scaling.yarn_beta_fast": float(s.beta_fast),
                 "rope.scaling.yarn_beta_slow": float(s.beta_slow)})
    if (s.beta_fast, s.beta_slow) != (32.0, 1.0):
      warnings.append(f"YaRN beta_fast={s.beta_fast:g}, beta_slow={s.beta_slow:g} are written, "
                      "but llama.cpp's LLaMA loader reads neither key: run it with "
                      f"--yarn-beta-fast {s.beta_fast:g} --yarn-beta-slow {s.beta_slow:g}")
    return keys, None, warnings
  if s.kind == "llama3":
    # llama.cpp divides each base frequency by rope_freqs[i] (ggml_rope_ext's freq_factors).
    from pi_jax.rope import inv_freq_and_factor
    scaled, _ = inv_freq_and_factor(config)
    base, _ = inv_freq_and_factor(config.replace(rope_scaling={"kind": "none"}))
    keys["rope.scaling.original_context_length"] = int(s.original_max_position_embeddings)
    return keys, (np.asarray(base, np.float32) / np.asarray(scaled, np.float32)), warnings
  what = {"dynamic": "dynamic NTK (its base grows with the sequence length at run time)",
          "longrope": "LongRoPE (llama.cpp's LLaMA architecture has no short/long factors)"}
  raise ConversionError(
      f"RoPE scaling {s.kind!r}: {what.get(s.kind, s.kind)} has no exact llama.cpp form; export "
      "to Hugging Face instead (python -m convert.to_hf), or fine-tune with linear, yarn or "
      "llama3 scaling")


# --- tokenizer ----------------------------------------------------------------------------------

def _bpe_pre_name(pre: dict | None, where: str) -> str:
  """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.json `pre_tokenizer`)."""
  def is_bytelevel(p, regex):
    return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex
  steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
  if len(steps) == 1 and steps[0] and is_bytelevel(steps[0], True):
    return "gpt-2"
  if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
      and is_bytelevel(steps[1], True)):
    return "smollm"  # digits one by one, then GPT-2's split (llama.cpp's starcoder family)
  if (len(steps) == 2 and steps[0].get("type") == "Split"
      and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_REGEX
      and is_bytelevel(steps[1], False)):
    return "llama-bpe"
  raise ConversionError(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name "
                        "known to this exporter (known: GPT-2, SmolLM/StarCoder digits, Llama 3); "
                        "export to Hugging Face instead (python -m convert.to_hf)")


def _bpe_vocab(tok: dict, vocab_size: int, where: str):
  """(tokens, token types) of a byte-level BPE tokenizer.json, padded to vocab_size."""
  from gguf import TokenType
  by_id = {i: t for t, i in tok["model"]["vocab"].items()}
  added = {a["id"]: a for a in tok.get("added_tokens", [])}
  for i, a in added.items():
    by_id[i] = a["content"]
  if by_id and max(by_id) >= vocab_size:
    raise ConversionError(f"{where}: token id {max(by_id)} does not fit the model's vocab_size "
                          f"{vocab_size}")
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in by_id:
      tokens.append(f"[PAD{i}]")
      types.append(TokenType.UNUSED)
    elif i in added:
      tokens.append(by_id[i])
      types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
    else:
      tokens.append(by_id[i])
      types.append(TokenType.NORMAL)
  return tokens, types


def _spm_vocab(model_file: str, vocab_size: int, where: str):
  """(tokens, scores, types) of a sentencepiece model, as llama.cpp's converter reads it."""
  import sentencepiece as spm
  from gguf import TokenType
  sp = spm.SentencePieceProcessor()
  sp.Load(model_file)
  if sp.GetPieceSize() > vocab_size:
    raise ConversionError(f"{where}: {sp.GetPieceSize()} pieces do not fit the model's "
                          f"vocab_size {vocab_size}")
  tokens, scores, types = [], [], []
  for i in range(vocab_size):
    if i >= sp.GetPieceSize():
      tokens.append(f"[PAD{i}]".encode())
      scores.append(-1000.0)
      types.append(TokenType.UNUSED)
      continue
    tokens.append(sp.IdToPiece(i).encode("utf-8"))
    scores.append(float(sp.GetScore(i)))
    types.append(TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                 else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                 else TokenType.NORMAL)
  return tokens, scores, types


def add_tokenizer(writer, config: ModelConfig, ckpt: str) -> None:
  """Writes CKPT/tokenizer/ into the GGUF: vocabulary, merges or scores, token types, special
  ids (the checkpoint's bos/eos/pad win over the tokenizer's) and the chat template."""
  import gguf
  from pi_jax.checkpoint import TOKENIZER_DIR
  tok_dir = os.path.join(ckpt, TOKENIZER_DIR)
  tok_json, spm_file = os.path.join(tok_dir, "tokenizer.json"), os.path.join(tok_dir,
                                                                             "tokenizer.model")
  if not (os.path.isfile(tok_json) or os.path.isfile(spm_file)):
    raise ConversionError(f"{ckpt}: the checkpoint has no tokenizer ({tok_dir}/tokenizer.json or "
                          "tokenizer.model is missing), and a GGUF must embed one: convert the "
                          "model again from a source that has it, or copy its tokenizer files "
                          f"into {tok_dir}/")
  tok = None
  if os.path.isfile(tok_json):
    try:
      with open(tok_json, encoding="utf-8") as f:
        tok = json.load(f)
    except (OSError, ValueError) as e:
      raise ConversionError(f"{tok_json}: unreadable tokenizer: {e}") from None
  model_type = (tok or {}).get("model", {}).get("type")
  byte_level = model_type == "BPE" and not tok["model"].get("byte_fallback")
  if byte_level:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_bpe_pre_name(tok.get("pre_tokenizer"), tok_json))
    tokens, types = _bpe_vocab(tok, config.vocab_size, tok_json)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    steps = tok.get("pre_tokenizer") or {}
    steps = steps.get("pretokenizers", [steps])
    writer.add_add_space_prefix(any(p.get("add_prefix_space") for p in steps
                                    if p.get("type") == "ByteLevel"))
  elif os.path.isfile(spm_file):
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    tokens, scores, types = _spm_vocab(spm_file, config.vocab_size, spm_file)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
  else:
    raise ConversionError(f"{tok_json}: a {model_type} tokenizer without tokenizer.model: this "
                          "exporter writes byte-level BPE (tokenizer.json) and sentencepiece "
                          "(tokenizer.model) vocabularies; export to Hugging Face instead")
  special = gguf.SpecialVocab(tok_dir, load_merges=byte_level, n_vocab=config.vocab_size)
  for kind, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id),
                      ("pad", config.pad_token_id)):
    if value is not None:
      special.special_token_ids[kind] = int(value)
  if byte_level and "bos" not in special.add_special_token:
    # transformers adds BOS when the post-processor's single-sequence template has a token.
    single = (tok.get("post_processor") or {}).get("single") or []
    special.add_special_token["bos"] = any("SpecialToken" in p for p in single)
  special.add_to_gguf(writer, quiet=True)


# --- tensors ------------------------------------------------------------------------------------

def _ggml_type(dtype: str, name: str, shape: tuple[int, ...]):
  """The GGML type of one tensor: vectors stay F32 (as llama.cpp's converter keeps them)."""
  from gguf import GGMLQuantizationType as Q
  from gguf.constants import GGML_QUANT_SIZES
  if len(shape) == 1 or dtype == "f32":
    return Q.F32
  if dtype == "q8_0" and shape[-1] % GGML_QUANT_SIZES[Q.Q8_0][0]:
    return Q.F16  # rows that are no whole number of blocks: llama.cpp's converter falls back
  return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def _encode(w: np.ndarray, qtype) -> np.ndarray:
  """float32 [rows, cols] -> the bytes/values the writer stores for qtype."""
  from gguf import GGMLQuantizationType as Q
  from gguf import quants
  if qtype == Q.F32:
    return np.ascontiguousarray(w, np.float32)
  if qtype == Q.F16:
    return np.ascontiguousarray(w, np.float16)
  # In row blocks: gguf's quantizers make several full-size temporaries (rows are independent).
  out = np.empty(quants.quant_shape_to_byte_shape(w.shape, qtype), np.uint8)
  for r in range(0, w.shape[0], QUANT_ROWS):
    out[r:r + QUANT_ROWS] = quants.quantize(np.ascontiguousarray(w[r:r + QUANT_ROWS], np.float32),
                                            qtype)
  return out


def _tensor_plan(config: ModelConfig, dtype: str, rope_freqs):
  """[(gguf name, HF shape, ggml type, leaf path, layer, kind)], leaf by leaf: each stacked
  checkpoint array's layers in order (the order of the tensors in the file)."""
  from pi_jax import model as model_lib
  shapes = model_lib.param_shapes(config)
  by_leaf: dict[tuple, list] = {}
  for hf_name, path, kind, layer in hf_layout.hf_names(config):
    leaf_shape = shapes[path[0]] if layer is None else shapes["layers"][path[1]][1:]
    hf_shape = hf_layout.pi_to_hf(config, kind, np.empty(leaf_shape, np.uint8)).shape
    name = gguf_name(hf_name)
    by_leaf.setdefault(path, []).append((name, tuple(hf_shape),
                                         _ggml_type(dtype, name, tuple(hf_shape)), path, layer,
                                         kind))
  plan = [e for entries in by_leaf.values() for e in entries]
  if rope_freqs is not None:
    from gguf import GGMLQuantizationType as Q
    plan.insert(0, ("rope_freqs.weight", rope_freqs.shape, Q.F32, None, None, "rope_freqs"))
  return plan


class Sum32x2:
  """pi_jax.checkpoint's sum32x2 checksum of an array, fed in pieces: update(block, start) adds
  the elements at flat positions start.. (the sums wrap mod 2^32, so any order gives the same
  result). Blocks of `rows` elements (each block's uint64 temporaries are a few MiB): the two
  uint32 sums without jax's device copy."""

  def __init__(self):
    self.plain = self.weighted = self.count = 0

  def update(self, x: np.ndarray, start: int = 0, rows: int = 1 << 18) -> "Sum32x2":
    flat = x.reshape(-1)
    if x.dtype == np.bool_:
      bits_of = lambda block: block.astype(np.uint64)
    else:
      unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
      bits_of = lambda block: block.view(unsigned).astype(np.uint64)
    for i in range(0, flat.size, rows):
      bits = bits_of(flat[i:i + rows])
      index = np.arange(start + i, start + i + bits.size, dtype=np.uint64) % 2**32
      self.plain = (self.plain + int(bits.sum(dtype=np.uint64))) % 2**32  # uint64 sums wrap
      self.weighted = (self.weighted
                       + int((bits * ((2 * index + 1) % 2**32)).sum(dtype=np.uint64))) % 2**32
    self.count += flat.size
    return self

  def hexdigest(self) -> str:
    return f"{self.plain:08x}{self.weighted:08x}"


def numpy_checksum(x: np.ndarray, rows: int = 1 << 18) -> str:
  """The sum32x2 checksum of a whole host array (Sum32x2 in one piece)."""
  return Sum32x2().update(x, rows=rows).hexdigest()


class SliceReader:
  """read(path, layer) -> one layer's slice of a stacked checkpoint array (or a whole unstacked
  array for layer None), as stored on disk, read with tensorstore one storage chunk at a time.

  Memory is the slice plus one chunk (orbax's chunks are at most 32 MiB here): never the stacked
  array. Checkpoints written since the per-layer chunking (pi_jax.checkpoint.save_checkpoint)
  decode each chunk once; older ones store chunks that span every layer, which are decoded
  again for each layer (slower, same memory). Each array's checksum is summed slice by slice
  and compared with CKPT/checksums.json once its last slice is read.
  """

  def __init__(self, ckpt: str, config: ModelConfig):
    from pi_jax import checkpoint
    from pi_jax import model as model_lib
    self.ckpt, self.params_dir = ckpt, os.path.join(os.path.abspath(ckpt), checkpoint.PARAMS_DIR)
    self.shapes = model_lib.param_shapes(config)
    try:
      self.expected = checkpoint.read_checksums(ckpt) or {}
    except ValueError as e:
      raise ConversionError(str(e)) from None
    self.layout = self._layout()
    self.arrays: dict[tuple, object] = {}
    self.sums: dict[tuple, Sum32x2] = {}

  def _layout(self) -> dict:
    """The storage flags orbax recorded in params/_METADATA (OCDBT and zarr version)."""
    file = os.path.join(self.params_dir, "_METADATA")
    try:
      with open(file) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise ConversionError(f"{file}: unreadable orbax metadata (damaged?): {e}") from None
    return {"ocdbt": meta.get("use_ocdbt", True), "zarr3": meta.get("use_zarr3", False)}

  def _open(self, path: tuple):
    import tensorstore as ts
    name = ".".join(path)  # orbax's name for the array
    if self.layout["ocdbt"]:
      kvstore = {"driver": "ocdbt", "base": f"file://{self.params_dir}", "path": name}
    else:
      kvstore = {"driver": "file", "path": os.path.join(self.params_dir, name)}
    try:
      store = ts.open({"driver": "zarr3" if self.layout["zarr3"] else "zarr",
                       "kvstore": kvstore}, open=True, read=True).result()
    except Exception as e:  # tensorstore raises ValueError/KeyError subtypes; name the cause
      raise ConversionError(f"{self.params_dir}: could not open parameter {'/'.join(path)}: "
                            f"{type(e).__name__}: {str(e)[:300]}") from None
    want = self.shapes[path[0]] if len(path) == 1 else self.shapes[path[0]][path[1]]
    if tuple(store.shape) != tuple(want):
      raise ConversionError(f"{self.params_dir}: parameter {'/'.join(path)} has shape "
                            f"{tuple(store.shape)}, the checkpoint's config expects {tuple(want)}")
    return store

  def read(self, path: tuple, layer: int | None) -> np.ndarray:
    if path not in self.arrays:
      self.arrays[path], self.sums[path] = self._open(path), Sum32x2()
    store = self.arrays[path]
    view = store if layer is None else store[layer]
    chunk = tuple(store.chunk_layout.read_chunk.shape)[0 if layer is None else 1:]
    boxes = [tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunk, view.shape))
             for starts in itertools.product(*(range(0, n, c) for n, c in zip(view.shape, chunk)))]
    try:
      if len(boxes) == 1:  # one chunk: tensorstore's array is the slice
        out = view.read().result()
      else:
        out = np.empty(view.shape, view.dtype.numpy_dtype)
        for box in boxes:
          out[box] = view[box].read().result()
    except Exception as e:  # a missing or damaged chunk
      raise ConversionError(f"{self.params_dir}: could not read parameter {'/'.join(path)}: "
                            f"{type(e).__name__}: {str(e)[:300]}") from None
    total = self.sums[path].update(out, start=0 if layer is None else layer * out.size)
    if total.count == math.prod(store.shape):
      self._verify(path, total.hexdigest())
      del self.arrays[path]
    return out

  def _verify(self, path: tuple, got: str) -> None:
    from pi_jax import checkpoint
    name = "".join(f"[{k!r}]" for k in path)  # jax.tree_util.keystr of the path
    if name in self.expected and got != self.expected[name]:
      raise ConversionError(f"{self.params_dir}: array {name} does not match the checksum "
                            f"recorded in {os.path.join(self.ckpt, checkpoint.CHECKSUMS_FILE)}: "
                            "the file is damaged")


class EncodedRows:
  """One GGUF tensor, encoded and written BLOCK_BYTES of float32 rows at a time.

  gguf's GGUFWriter.write_tensor_data writes `tensor.tofile(fout)` between the alignment
  paddings; this object is that tensor, so no full-size float32, permuted or encoded copy of
  the matrix exists. `rows` (llama.cpp's q/k order) picks the source row of each output row.
  """

  def __init__(self, hf: np.ndarray, qtype, nbytes: int, rows: np.ndarray | None = None):
    self.hf, self.qtype, self.nbytes, self.rows, self.swap = hf, qtype, nbytes, rows, False

  def byteswap(self, inplace: bool = False) -> "EncodedRows":
    self.swap = not self.swap  # a big-endian file: each encoded block is swapped
    return self

  def tofile(self, f) -> None:
    w = self.hf
    if w.ndim == 1:
      blocks = [w]
    else:
      step = max(1, BLOCK_BYTES // (4 * w.shape[1]))
      blocks = (w[r:r + step] if self.rows is None else w[self.rows[r:r + step]]
                for r in range(0, w.shape[0], step))
    for block in blocks:
      data = _encode(np.asarray(block, np.float32), self.qtype)
      (data.byteswap() if self.swap else data).tofile(f)


# --- export -------------------------------------------------------------------------------------

def export(ckpt: str, out: str, *, dtype: str = "f32", force: bool = False,
           progress: bool = False) -> str:
  """Writes the GGUF file OUT from pi_jax checkpoint CKPT (atomically); returns OUT."""
  import gguf
  from pi_jax import checkpoint
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
  out = os.path.abspath(out)
  check_output(out, ckpt, force, "OUT file")
  try:
    config = checkpoint.load_config(ckpt)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(str(e)) from None
  if not os.path.isdir(os.path.join(ckpt, checkpoint.PARAMS_DIR)):
    raise ConversionError(f"{ckpt} is not a pi_jax checkpoint: "
                          f"{os.path.join(ckpt, checkpoint.PARAMS_DIR)} does not exist")
  rope_keys, rope_freqs, warnings = rope_metadata(config)
  for w in warnings:
    print(f"warning: {w}", file=sys.stderr)

  writer = gguf.GGUFWriter(None, ARCH)
  writer.add_name(os.path.basename(os.path.normpath(ckpt)))
  writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
  if dtype == "q8_0":
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  c = config
  writer.add_context_length(c.max_position_embeddings)  # the extended window
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_block_count(c.num_layers)
  writer.add_head_count(c.num_heads)
  writer.add_head_count_kv(c.num_kv_heads)
  writer.add_rope_dimension_count(c.head_dim)
  if c.head_dim * c.num_heads != c.hidden_size:
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_vocab_size(c.vocab_size)
  for key, value in rope_keys.items():
    full = f"{ARCH}.{key}"
    if isinstance(value, str):
      writer.add_string(full, value)
    elif isinstance(value, int):
      writer.add_uint32(full, value)
    else:
      writer.add_float32(full, value)
  add_tokenizer(writer, config, ckpt)

  plan = _tensor_plan(config, dtype, rope_freqs)
  for name, shape, qtype, *_ in plan:
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
      np_dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
      writer.add_tensor_info(name, shape, np.dtype(np_dtype), _nbytes(shape, qtype))
    else:
      writer.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, qtype),
                             np.dtype(np.uint8), _nbytes(shape, qtype), raw_dtype=qtype)

  _unmap_large_buffers()
  read = SliceReader(ckpt, config).read
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(plan), desc=f"exporting {os.path.basename(out)}", unit="tensor",
               file=sys.stderr)
  # The writer opens the atomic temporary by name; atomic_file renames it only on success.
  with files.atomic_file(out, "wb") as f:
    try:
      _write_tensors(writer, f.name, plan, read, config, rope_freqs, bar)
    finally:
      writer.close()
  if bar:
    bar.close()
  return out


def _write_tensors(writer, file_path, plan, read, config, rope_freqs, bar) -> None:
  """Header, metadata, tensor infos, then each tensor: its one layer's slice is read when it
  is written and encoded in row blocks (memory: one tensor as stored, plus a block)."""
  writer.write_header_to_file(path=file_path)
  writer.write_kv_data_to_file()
  writer.write_ti_data_to_file()
  for name, shape, qtype, path, layer, kind in plan:
    if path is None:
      hf = rope_freqs
    else:
      # A view of the slice in HF's [out, in] layout (reshape and transpose, no copy).
      hf = hf_layout.pi_to_hf(config, kind, read(path, layer))
    if tuple(hf.shape) != tuple(shape):
      raise ConversionError(f"tensor {name} has shape {hf.shape}, expected {shape}")
    rows = None
    if name.endswith(("attn_q.weight", "attn_k.weight")):
      heads = config.num_heads if name.endswith("attn_q.weight") else config.num_kv_heads
      rows = permute_for_gguf(np.arange(hf.shape[0])[:, None], heads)[:, 0]
    writer.write_tensor_data(EncodedRows(hf, qtype, _nbytes(shape, qtype), rows))
    if bar:
      bar.update(1)


def _unmap_large_buffers() -> None:
  """Makes glibc map every buffer of 1 MiB or more on its own and unmap it when it is freed.

  By default glibc raises its mmap threshold after such a free (up to 32 MiB) and then keeps
  freed buffers in its per-thread arenas: each chunk tensorstore decodes on its threads (up to
  32 MiB) would stay resident after the read (measured: +50-70 MiB of peak for SmolLM2). The
  setting is process-wide and only trades some page faults for memory; a no-op off glibc.
  """
  if not sys.platform.startswith("linux"):
    return
  import ctypes
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return
  mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _nbytes(shape: tuple[int, ...], qtype) -> int:
  """Bytes of one tensor of HF shape `shape` stored as qtype."""
  from gguf import GGMLQuantizationType as Q
  from gguf import quant_shape_to_byte_shape
  if qtype in (Q.F32, Q.F16):
    return math.prod(shape) * (4 if qtype == Q.F32 else 2)
  return math.prod(quant_shape_to_byte_shape(shape, qtype))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert.to_gguf", description=__doc__,
                              formatter_class=HelpFormatter)
  p.add_argument("ckpt", help="pi_jax checkpoint directory (with its tokenizer/)")
  p.add_argument("out", help="GGUF file to write")
  p.add_argument("--dtype", default="f32", choices=DTYPES,
                 help="matrix type (vectors stay f32); q8_0 is llama.cpp's 8-bit blocks")
  p.add_argument("--force", action="store_true", help="replace OUT if it exists")
  return p


def main(argv=None) -> int:
  exit_on_sigterm()
  args = build_parser().parse_args(argv)
  start = time.time()
  try:
    out = export(args.ckpt, args.out, dtype=args.dtype, force=args.force, progress=True)
  except (ConversionError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB) in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
