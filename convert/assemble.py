"""Builds a pi_jax parameter tree from any source that serves tensors under HF names.

A source (HF directory, Meta .pth shards, GGUF file) only has to say its config and hand out
one HF-layout tensor at a time; this module checks each shape against the config, transforms
it, and writes it into its slot of a preallocated stacked array, so peak host memory is the
output size plus one tensor.
"""

from __future__ import annotations

import os

import numpy as np
import ml_dtypes

from convert import hf_layout
from pi_jax.config import ModelConfig
from pi_jax import model as model_lib

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConversionError(ValueError):
  """A source that cannot be converted; the message names the file and what is wrong."""


def check_output(out: str, source: str, force: bool, what: str = "OUT") -> None:
  """Before a conversion reads anything: OUT is not the source nor inside it, can be written,
  and exists only with --force (ConversionError naming it otherwise)."""
  from pi_jax import files
  try:
    files.check_separate(out, [source], "OUT")
    files.check_writable(out, what)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  if os.path.exists(out) and not force:
    raise ConversionError(f"{out} already exists; pass --force to replace it")


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """np.empty, but 64-byte aligned: jax.device_put on CPU then aliases it instead of copying."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buf = np.empty(nbytes + align, np.uint8)
  start = (-buf.ctypes.data) % align
  return buf[start:start + nbytes].view(dtype).reshape(shape)


# Buffers some checkpoints carry that are derived from the config, not weights.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq", "rope.freqs")


def check_all_used(config: ModelConfig, source_names, source_name: str, get_tensor=None) -> None:
  """Every tensor of the source must have a slot in the model the config describes.

  A config that undercounts (block_count 29 with 30 blocks present) would otherwise drop layers
  silently. A tied model may carry lm_head.weight equal to the embedding.
  """
  needed = {name for name, *_ in hf_layout.hf_names(config)}
  left = sorted(n for n in source_names if n not in needed and not n.endswith(DERIVED_SUFFIXES))
  if left == ["lm_head.weight"] and config.tie_word_embeddings and get_tensor is not None:
    head, embed = get_tensor("lm_head.weight"), get_tensor("model.embed_tokens.weight")
    if head is not None and embed is not None and np.array_equal(head, embed):
      return
  if left:
    shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
    raise ConversionError(
        f"{source_name}: {len(left)} tensor(s) have no slot in the model its config describes "
        f"({config.num_layers} layers, tie_word_embeddings={config.tie_word_embeddings}): "
        f"{shown}; the config undercounts the model (e.g. its layer count) or the model has "
        "parts pi_jax does not implement")


def assemble_params(config: ModelConfig, get_tensor, source_name: str, dtype: str = "float32",
                    progress=None, get_rows=None, source_names=None) -> dict:
  """get_tensor(hf_name) -> np.ndarray (HF layout) or None if absent.

  get_rows(hf_name) -> (shape, read(start, stop)) or None, optional: lets the big embedding /
  LM head be copied in row blocks instead of through one full-size temporary.
  source_names: every tensor the source holds (HF names); each must be used (check_all_used).
  """
  if source_names is not None:
    check_all_used(config, source_names, source_name, get_tensor)
  np_dtype = NUMPY_DTYPES[dtype]
  shapes = model_lib.param_shapes(config)
  params: dict = {"layers": {}}
  names = list(hf_layout.hf_names(config))
  for hf_name, path, kind, layer in (progress(names) if progress else names):
    rows = get_rows(hf_name) if get_rows and layer is None and kind in ("identity", "transpose") else None
    if rows is not None:
      params[path[0]] = _copy_by_rows(config, hf_name, kind, rows, shapes[path[0]], np_dtype,
                                      source_name)
      continue
    w = get_tensor(hf_name)
    if w is None:
      raise ConversionError(f"{source_name}: tensor {hf_name!r} is missing")
    want = shapes[path[0]] if layer is None else shapes["layers"][path[1]][1:]
    # The HF shape the config implies, from the pi_jax shape (zero-stride view: no memory).
    want_hf = hf_layout.pi_to_hf(config, kind, np.broadcast_to(np.uint8(0), want)).shape
    if tuple(w.shape) != tuple(want_hf):
      raise ConversionError(f"{source_name}: tensor {hf_name!r} has shape {tuple(w.shape)}, "
                            f"but the config implies {tuple(want_hf)}")
    w = hf_layout.hf_to_pi(config, kind, np.asarray(w))
    if layer is None:
      out = params[path[0]] = aligned_empty(w.shape, np_dtype)
      out[...] = w  # one copy, cast included
    else:
      slot = params["layers"].get(path[1])
      if slot is None:
        slot = params["layers"][path[1]] = aligned_empty(shapes["layers"][path[1]], np_dtype)
      slot[layer] = w  # casts while copying: no temporary
  return params


def _copy_by_rows(config, hf_name, kind, rows, want, np_dtype, source_name,
                  block_bytes: int = 16 * 2**20) -> np.ndarray:
  shape, read = rows
  want_hf = tuple(want) if kind == "identity" else tuple(want[::-1])
  if tuple(shape) != want_hf:
    raise ConversionError(f"{source_name}: tensor {hf_name!r} has shape {tuple(shape)}, "
                          f"but the config implies {want_hf}")
  out = aligned_empty(want, np_dtype)
  step = max(1, block_bytes // (4 * int(np.prod(shape[1:], dtype=np.int64))))
  for start in range(0, shape[0], step):
    stop = min(start + step, shape[0])
    block = read(start, stop)
    if kind == "identity":
      out[start:stop] = block
    else:  # HF [V, D] rows -> pi_jax [D, V] columns
      out[:, start:stop] = block.T
  return out
