"""Export a pi_jax checkpoint as a Hugging Face transformers LLaMA directory.

  python -m convert.to_hf CKPT OUT [--force] [--max-shard-size 2GB] [--dtype float32|bfloat16|float16]

OUT gets config.json (with the RoPE scaling, e.g. `rope_type: linear, factor: 4`, and
max_position_embeddings = the extended window), model.safetensors (or model-0000i-of-0000N
shards plus model.safetensors.index.json above --max-shard-size), and the tokenizer files kept
in CKPT/tokenizer/. config.json carries the RoPE scaling in both forms: `rope_parameters`
(transformers >= 5) and `rope_scaling` + `rope_theta` (transformers 4.x, vLLM, TGI, llama.cpp's
converter). Files are written by the `safetensors` library one shard at a time (host memory:
the checkpoint plus one shard, at most --max-shard-size); OUT appears atomically.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from convert import hf_layout
from convert.assemble import NUMPY_DTYPES, ConversionError, check_output
from convert.to_pi_jax import HelpFormatter, exit_on_sigterm
from pi_jax import files
from pi_jax.config import ModelConfig

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Tokenizer files transformers reads; pi_jax's own bytes.json has no transformers equivalent.
TOKENIZER_SKIP = ("bytes.json",)


def parse_size(text: str) -> int:
  """'2GB', '500MB', '10KB' or a byte count -> bytes (decimal units, as transformers)."""
  t = str(text).strip().upper()
  for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9),
                     ("MB", 10**6), ("KB", 10**3), ("B", 1)):
    if t.endswith(unit):
      t, scale = t[:-len(unit)], mult
      break
  else:
    scale = 1
  try:
    value = int(float(t) * scale)
  except ValueError:
    raise ValueError(f"--max-shard-size: cannot parse {text!r} (e.g. 2GB, 500MB)") from None
  if value <= 0:
    raise ValueError(f"--max-shard-size must be positive, got {text!r}")
  return value


def write_safetensors(path: str, tensors) -> None:
  """Writes [(name, shape, dtype_name, array_fn)] as one safetensors file (the library's writer).

  The shard's arrays are built, written and dropped together: memory is one shard.
  """
  from safetensors.numpy import save_file
  arrays = {}
  for name, shape, dtype, array_fn in tensors:
    w = np.ascontiguousarray(array_fn(), dtype=NUMPY_DTYPES[dtype])
    if tuple(w.shape) != tuple(shape):
      raise ValueError(f"{name}: shape {w.shape}, expected {tuple(shape)}")
    arrays[name] = w
  save_file(arrays, path, metadata={"format": "pt"})
  files.normal_mode(path)  # the library creates it 0600


def hf_config_dict(config: ModelConfig, dtype: str) -> dict:
  """transformers config.json with the RoPE scaling in both the v5 and the 4.x form."""
  hf = config.to_hf(dtype=dtype)
  legacy = config.to_hf(legacy=True, dtype=dtype)
  hf["rope_scaling"] = legacy["rope_scaling"]
  hf["rope_theta"] = legacy["rope_theta"]
  hf["dtype"] = dtype  # transformers >= 5 reads `dtype`; torch_dtype kept for older ones
  return hf


def _plan(config: ModelConfig, params, dtype: str):
  """[(hf_name, hf_shape, dtype, array_fn)] for every tensor, in HF order."""
  entries = []
  for hf_name, path, kind, layer in hf_layout.hf_names(config):
    leaf = params[path[0]] if layer is None else params["layers"][path[1]]
    shape = leaf.shape if layer is None else leaf.shape[1:]
    hf_shape = hf_layout.pi_to_hf(config, kind, np.empty(shape, np.uint8)).shape

    def array_fn(leaf=leaf, layer=layer, kind=kind):
      w = np.asarray(leaf if layer is None else leaf[layer])
      return hf_layout.pi_to_hf(config, kind, w)

    entries.append((hf_name, hf_shape, dtype, array_fn))
  return entries


def _shards(entries, max_bytes: int):
  shards, current, size = [], [], 0
  for e in entries:
    nbytes = int(np.prod(e[1])) * np.dtype(NUMPY_DTYPES[e[2]]).itemsize
    if current and size + nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(e)
    size += nbytes
  if current:
    shards.append(current)
  return shards


def _tokenizer_config(config: ModelConfig, folder: str) -> dict | None:
  """A tokenizer_config.json for a checkpoint that carries only a sentencepiece model."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor()
  sp.Load(os.path.join(folder, "tokenizer.model"))
  piece = lambda i: sp.IdToPiece(i) if i is not None and 0 <= i < sp.GetPieceSize() else None
  return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
          "bos_token": piece(config.bos_token_id), "eos_token": piece(config.eos_token_id),
          "unk_token": piece(sp.unk_id()), "legacy": True}


def export(ckpt: str, out: str, *, force: bool = False, max_shard_size: str | int = "2GB",
           dtype: str | None = None, progress: bool = False) -> str:
  """Writes the HF directory OUT from pi_jax checkpoint CKPT (atomically); returns OUT."""
  from pi_jax import checkpoint
  out = os.path.abspath(out)
  check_output(out, ckpt, force)
  max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
  try:
    config = checkpoint.load_config(ckpt)
    dtype = dtype or checkpoint.stored_param_dtype(ckpt)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(str(e)) from None
  if dtype not in SAFETENSORS_DTYPES:
    raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(SAFETENSORS_DTYPES)}")
  try:
    config, params = checkpoint.load_checkpoint(ckpt)
    hf_config = hf_config_dict(config, dtype)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(str(e)) from None
  entries = _plan(config, params, dtype)
  shards = _shards(entries, max_bytes)

  with files.atomic_directory(out) as tmp:
    weight_map, total = {}, 0
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=len(entries), desc=f"exporting {os.path.basename(out)}", unit="tensor",
                 file=sys.stderr)
    try:
      for i, shard in enumerate(shards):
        name = ("model.safetensors" if len(shards) == 1 else
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        write_safetensors(os.path.join(tmp, name), shard)
        for e in shard:
          weight_map[e[0]] = name
          total += int(np.prod(e[1])) * np.dtype(NUMPY_DTYPES[e[2]]).itemsize
        if bar:
          bar.update(len(shard))
    finally:  # before any error message: the bar's line ends first
      if bar:
        bar.close()
    if len(shards) > 1:
      files.write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
    files.write_json(os.path.join(tmp, "config.json"), hf_config)
    tok_dir = os.path.join(ckpt, checkpoint.TOKENIZER_DIR)
    if os.path.isdir(tok_dir):
      names = [n for n in sorted(os.listdir(tok_dir)) if n not in TOKENIZER_SKIP]
      for n in names:
        shutil.copyfile(os.path.join(tok_dir, n), os.path.join(tmp, n))
      if "tokenizer.model" in names and not ({"tokenizer.json", "tokenizer_config.json"} & set(names)):
        files.write_json(os.path.join(tmp, "tokenizer_config.json"),
                         _tokenizer_config(config, tok_dir))
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert.to_hf", description=__doc__,
                              formatter_class=HelpFormatter)
  p.add_argument("ckpt", help="pi_jax checkpoint directory")
  p.add_argument("out", help="Hugging Face model directory to write")
  p.add_argument("--force", action="store_true", help="replace OUT if it exists")
  p.add_argument("--max-shard-size", default="2GB", help="split weights above this")
  p.add_argument("--dtype", default=None, choices=sorted(SAFETENSORS_DTYPES),
                 help="weights dtype (default: the checkpoint's)")
  return p


def main(argv=None) -> int:
  exit_on_sigterm()
  args = build_parser().parse_args(argv)
  start = time.time()
  try:
    out = export(args.ckpt, args.out, force=args.force, max_shard_size=args.max_shard_size,
                 dtype=args.dtype, progress=True)
  except Exception as e:  # a full disk, whichever library was writing
    reason = files.disk_error(e)
    if reason is None and not isinstance(e, (ConversionError, ValueError)):
      raise
    fix = "free space or choose another OUT" if "space" in str(reason) else "choose another OUT"
    print(f"error: cannot write {args.out}: {reason}; nothing was written there ({fix}, then "
          "run again)" if reason else f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out} in {time.time() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
