"""Source: a Hugging Face model directory (config.json + safetensors or pytorch_model*.bin)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from convert.assemble import ConversionError
from pi_jax.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json")


def load_torch_file(path: str) -> dict:
  """A .pth/.bin state dict as numpy, refusing pickled code (weights_only=True)."""
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{path}: reading .bin/.pth files needs torch "
                          "(pip install 'pi_jax[convert]' or torch==2.13.0)") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # UnpicklingError for code, RuntimeError for truncation
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "weights_only" in str(e) or "Unsupported global" in str(e):
      raise ConversionError(f"{path}: refused: the pickle holds objects other than tensors "
                            f"(possible code execution); {msg}") from None
    raise ConversionError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupted?): "
                          f"{msg}") from None
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
  return state


class SafetensorsFile:
  """A safetensors file read tensor by tensor through the `safetensors` library.

  The library checks the header (offsets in bounds, contiguous, not overlapping, sizes matching
  shapes) when the file is opened. Each read opens the file, copies one tensor (or a block of
  rows) out and closes it again, so memory holds one tensor at a time rather than every mapped
  page of the file ever touched. BF16 comes back as ml_dtypes.bfloat16.
  """

  def __init__(self, path: str):
    self.path = path
    with self._open() as f:
      self.entries = {}
      for name in f.keys():
        info = f.get_slice(name)
        self.entries[name] = {"shape": tuple(info.get_shape()), "dtype": info.get_dtype()}

  def _open(self):
    from safetensors import SafetensorError, safe_open
    try:
      return safe_open(self.path, framework="numpy")
    except (SafetensorError, OSError) as e:
      raise ConversionError(f"{self.path}: not a readable safetensors file (truncated or "
                            f"corrupted?): {e}") from None

  def keys(self):
    return self.entries.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name]["shape"]

  def get_tensor(self, name: str) -> np.ndarray:
    with self._open() as f:
      return self._read(lambda: f.get_tensor(name), name)

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of tensor `name` (the whole tensor for scalars)."""
    with self._open() as f:
      if not self.shape(name):
        return self._read(lambda: f.get_tensor(name), name)
      return self._read(lambda: f.get_slice(name)[start:stop], name)

  def _read(self, fn, name):
    from safetensors import SafetensorError
    try:
      return np.asarray(fn())
    except (SafetensorError, TypeError, ValueError) as e:
      raise ConversionError(f"{self.path}: could not read tensor {name!r} (unsupported dtype "
                            f"{self.entries[name]['dtype']}, or corrupted?): {e}") from None


def torch_to_numpy(t) -> np.ndarray:
  import torch
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
    t = t.float()
  return t.detach().cpu().numpy()


class HFSource:
  """Serves tensors by HF name, opening each weights file lazily (safetensors read tensor by tensor)."""

  def __init__(self, path: str):
    self.path = path
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
      raise ConversionError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
      with open(cfg_file) as f:
        self.hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{cfg_file}: invalid JSON: {e}") from None
    self.files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    self.kind = "safetensors"
    if not self.files:
      self.files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
      self.kind = "bin"
    if not self.files:
      raise ConversionError(f"{path}: no *.safetensors or pytorch_model*.bin weights found")
    self._index: dict[str, str] = {}
    self._open: dict[str, object] = {}
    self._bin_cache: tuple[str, dict] | None = None
    for file in self.files:
      for name in self._names(file):
        if name in self._index:  # a silent "last file wins" would pick weights by file order
          raise ConversionError(f"{path}: tensor {name!r} is in both "
                                f"{os.path.basename(self._index[name])} and "
                                f"{os.path.basename(file)}; remove the duplicate file")
        self._index[name] = file

  def config(self) -> ModelConfig:
    try:
      return ModelConfig.from_hf(self.hf_config)
    except (KeyError, ValueError) as e:
      raise ConversionError(f"{os.path.join(self.path, 'config.json')}: {e}") from None

  def _names(self, file: str) -> list[str]:
    if self.kind == "safetensors":
      return list(self._safetensors(file).keys())
    return list(self._bin(file).keys())

  def _safetensors(self, file: str):
    if file not in self._open:
      self._open[file] = SafetensorsFile(file)
    return self._open[file]

  def _bin(self, file: str) -> dict:
    if self._bin_cache is None or self._bin_cache[0] != file:
      self._bin_cache = (file, load_torch_file(file))  # one shard in memory at a time (mmapped)
    return self._bin_cache[1]

  def tensor_rows(self, name: str):
    """(shape, read(start, stop)) to stream a safetensors matrix by rows; None otherwise."""
    file = self._index.get(name)
    if file is None or self.kind != "safetensors":
      return None
    st = self._safetensors(file)
    return st.shape(name), lambda a, b: st.read_rows(name, a, b)

  def tensor_names(self) -> list[str]:
    """Every tensor in the source (HF names), for the check that each one is used."""
    return list(self._index)

  def tensor(self, name: str) -> np.ndarray | None:
    file = self._index.get(name)
    if file is None:
      return None
    try:
      if self.kind == "safetensors":
        return self._safetensors(file).get_tensor(name)
      return torch_to_numpy(self._bin(file)[name])
    except ConversionError:
      raise
    except Exception as e:
      raise ConversionError(f"{file}: could not read tensor {name!r} (truncated or corrupted?): "
                            f"{e}") from None

  def tokenizer_files(self) -> dict[str, str]:
    return {f"tokenizer/{n}": os.path.join(self.path, n) for n in TOKENIZER_FILES
            if os.path.isfile(os.path.join(self.path, n))}
