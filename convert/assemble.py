"""Builds a pi_jax parameter tree from any source that serves tensors under HF names.

A source (HF directory, Meta .pth shards, GGUF file) only has to say its config and hand out
one HF-layout tensor at a time; this module checks each shape against the config, transforms
it, and writes it into its slot of a preallocated stacked array, so peak host memory is the
output size plus one tensor.
"""

from __future__ import annotations

import numpy as np
import ml_dtypes

from convert import hf_layout
from pi_jax.config import ModelConfig
from pi_jax import model as model_lib

NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ConversionError(ValueError):
  """A source that cannot be converted; the message names the file and what is wrong."""


def assemble_params(config: ModelConfig, get_tensor, source_name: str, dtype: str = "float32",
                    progress=None) -> dict:
  """get_tensor(hf_name) -> np.ndarray (HF layout) or None if absent."""
  np_dtype = NUMPY_DTYPES[dtype]
  shapes = model_lib.param_shapes(config)
  params: dict = {"layers": {}}
  names = list(hf_layout.hf_names(config))
  for hf_name, path, kind, layer in (progress(names) if progress else names):
    w = get_tensor(hf_name)
    if w is None:
      raise ConversionError(f"{source_name}: tensor {hf_name!r} is missing")
    want_hf = hf_layout.expected_hf_shape(config, kind)
    if want_hf is not None and tuple(w.shape) != want_hf:
      raise ConversionError(f"{source_name}: tensor {hf_name!r} has shape {tuple(w.shape)}, "
                            f"but the config implies {want_hf}")
    try:
      w = hf_layout.hf_to_pi(config, kind, np.asarray(w))
    except ValueError as e:
      raise ConversionError(f"{source_name}: tensor {hf_name!r} of shape {tuple(w.shape)} does "
                            f"not fit the config: {e}") from None
    if layer is None:
      want = shapes[path[0]]
      if tuple(w.shape) != tuple(want):
        raise ConversionError(f"{source_name}: tensor {hf_name!r} has shape {tuple(w.shape)} in "
                              f"pi_jax layout, the config implies {tuple(want)}")
      params[path[0]] = np.ascontiguousarray(w.astype(np_dtype))
    else:
      want = shapes["layers"][path[1]]
      if tuple(w.shape) != tuple(want[1:]):
        raise ConversionError(f"{source_name}: tensor {hf_name!r} has shape {tuple(w.shape)} in "
                              f"pi_jax layout, the config implies {tuple(want[1:])}")
      slot = params["layers"].get(path[1])
      if slot is None:
        slot = params["layers"][path[1]] = np.empty(want, np_dtype)
      slot[layer] = w.astype(np_dtype)
  return params
