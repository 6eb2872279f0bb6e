"""Import a model into a pi_jax checkpoint.

  python -m convert.to_pi_jax SRC OUT [--rope-scaling linear:4] [--dtype float32|bfloat16] [--force]

SRC is a Hugging Face model directory (config.json + *.safetensors or pytorch_model*.bin), a
Meta LLaMA directory (params.json + consolidated.NN.pth), or a .gguf file. The source's RoPE
scaling is kept unless --rope-scaling sets or replaces it (KIND:FACTOR or a JSON object).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from convert.assemble import ConversionError, assemble_params, check_output
from pi_jax import checkpoint, files


def open_source(src: str):
  """The right reader for SRC, by what is on disk."""
  if not os.path.exists(src):
    raise ConversionError(f"{src}: no such file or directory")
  if os.path.isfile(src) and src.endswith(".gguf"):
    from convert.gguf_source import GGUFSource
    return GGUFSource(src)
  if os.path.isdir(src):
    if os.path.isfile(os.path.join(src, "config.json")):
      from convert.hf_source import HFSource
      return HFSource(src)
    if os.path.isfile(os.path.join(src, "params.json")):
      from convert.meta_source import MetaSource
      return MetaSource(src)
    raise ConversionError(f"{src}: neither config.json (Hugging Face) nor params.json (Meta) found")
  raise ConversionError(f"{src}: expected a model directory or a .gguf file")


def convert(src: str, out: str, rope_scaling: str | None = None, dtype: str = "float32",
            force: bool = False, progress: bool = False) -> str:
  """Converts SRC to a pi_jax checkpoint at OUT (written atomically); returns OUT."""
  check_output(out, src, force)
  source = open_source(src)
  config = source.config()
  if rope_scaling is not None:
    try:
      config = config.with_rope_scaling(rope_scaling)
    except ValueError as e:
      raise ConversionError(f"--rope-scaling {rope_scaling!r}: {e}") from None
  bar = None
  if progress:
    from tqdm import tqdm
    bar = lambda items: tqdm(items, desc=f"converting {os.path.basename(src.rstrip('/'))}",
                             unit="tensor", file=sys.stderr)
  # Tokenizer first: a GGUF's is rebuilt by transformers, whose peak memory should not add
  # to the assembled parameters'; it also fails fast.
  tokenizer_files = source.tokenizer_files()
  params = assemble_params(config, source.tensor, src, dtype=dtype, progress=bar,
                           get_rows=getattr(source, "tensor_rows", None),
                           source_names=source.tensor_names())
  _to_device_in_place(params)
  return checkpoint.save_checkpoint(out, config, params, force=force, extra_files=tokenizer_files)


def _to_device_in_place(tree: dict) -> None:
  """numpy leaves -> jax arrays, one at a time.

  On CPU, device_put of a 64-byte aligned buffer (assemble allocates them so) aliases it: no
  copy. Orbax saves jax arrays without the extra host copy it makes of numpy leaves
  (benchmarks/convert_memory.py measures both).
  """
  import jax
  for key, value in tree.items():
    if isinstance(value, dict):
      _to_device_in_place(value)
    else:
      tree[key] = jax.device_put(value, may_alias=True).block_until_ready()


def exit_on_sigterm() -> None:
  """SIGTERM raises SystemExit, so the atomic writers' clean-up runs (Ctrl-C already does)."""
  import signal
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as written, and every option's default in --help."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convert.to_pi_jax", description=__doc__,
                              formatter_class=HelpFormatter)
  p.add_argument("src", help="HF directory, Meta directory, or .gguf file")
  p.add_argument("out", help="pi_jax checkpoint directory to write")
  p.add_argument("--rope-scaling", default=None,
                 help="set/replace RoPE scaling: KIND:FACTOR (e.g. linear:4) or a JSON object")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="parameter dtype of the output")
  p.add_argument("--force", action="store_true", help="replace OUT if it exists")
  return p


def main(argv=None) -> int:
  exit_on_sigterm()
  args = build_parser().parse_args(argv)
  start = time.time()
  try:
    out = convert(args.src, args.out, args.rope_scaling, args.dtype, args.force, progress=True)
  except Exception as e:  # a full disk, whichever library was writing
    reason = files.disk_error(e)
    if reason is None and not isinstance(e, (ConversionError, FileExistsError, ValueError)):
      raise
    fix = "free space or choose another OUT" if "space" in str(reason) else "choose another OUT"
    print(f"error: cannot write {args.out}: {reason}; nothing was written there ({fix}, then "
          "run again)" if reason else f"error: {e}", file=sys.stderr)
    return 1
  config = checkpoint.load_config(out)
  print(f"wrote {out} in {time.time() - start:.1f}s: {config.num_layers} layers, "
        f"window {config.max_position_embeddings}, rope scaling {config.rope_scaling.describe()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
