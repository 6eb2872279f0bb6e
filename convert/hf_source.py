"""Source: a Hugging Face model directory (config.json + safetensors or pytorch_model*.bin)."""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
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


SAFETENSORS_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                     "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                     "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
  """A safetensors file read tensor by tensor with plain reads (no mmap, no framework).

  Each tensor is read into its own buffer, so memory holds one tensor at a time rather than
  every page of the file that was ever touched; BF16 comes back as ml_dtypes.bfloat16.
  """

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise ValueError(f"header length {n} exceeds the file size {size}")
        header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
      raise ConversionError(f"{path}: not a readable safetensors file (truncated or "
                            f"corrupted?): {e}") from None
    header.pop("__metadata__", None)
    self.data_start = 8 + n
    self.entries = header
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if self.data_start + end > size:
      raise ConversionError(f"{path}: truncated: tensors need {self.data_start + end} bytes, "
                            f"the file has {size}")

  def keys(self):
    return self.entries.keys()

  def get_tensor(self, name: str) -> np.ndarray:
    shape = self.entries[name]["shape"]
    return self.read_rows(name, 0, shape[0] if shape else 1)

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of tensor `name` (the whole tensor for scalars)."""
    e = self.entries[name]
    dtype = SAFETENSORS_NUMPY.get(e["dtype"])
    if dtype is None:
      raise ConversionError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
    begin, end = e["data_offsets"]
    shape = list(e["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if (end - begin) != count * np.dtype(dtype).itemsize:
      raise ConversionError(f"{self.path}: tensor {name!r}: {end - begin} bytes do not hold "
                            f"shape {shape} of {e['dtype']}")
    row_bytes = (end - begin) // shape[0] if shape and shape[0] else end - begin
    if shape:
      shape[0] = stop - start
    out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype)
    with open(self.path, "rb") as f:
      f.seek(self.data_start + begin + start * row_bytes)
      got = f.readinto(out.view(np.uint8))
    if got != out.nbytes:
      raise ConversionError(f"{self.path}: truncated while reading tensor {name!r}")
    return out.reshape(shape)


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
    return tuple(st.entries[name]["shape"]), lambda a, b: st.read_rows(name, a, b)

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
