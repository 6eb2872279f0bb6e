"""Peak host memory of `convert.to_pi_jax` and `convert.to_gguf` (streaming), per output size.

  python -m benchmarks.convert_memory [--skip-smollm2] [--layers 8]
  python -m benchmarks.convert_memory --gguf-only [--gguf-layers 16] [--code OTHER_CHECKOUT]

Each conversion runs in a fresh subprocess. Its baseline is the peak RSS after importing
everything the conversion imports (python, jax, orbax, torch, transformers), measured in the
same process just before converting; the table reports (peak RSS - baseline) / output size.
The GGUF rows export pi_jax checkpoints (output: the .gguf file's size): SmolLM2-135M as fetched
(`python -m convert.fetch smollm2`), and a random checkpoint written by pi_jax's own
save_checkpoint whose largest tensor is a small part of the file. The export reads one layer's
slice at a time, so its ratio's ceiling is the `tensor/out` column (the largest tensor as the
checkpoint stores it, per output size) plus a fixed overhead. --code measures another
checkout's exporter (e.g. a worktree of an older commit) on the same checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, os, resource, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, orbax.checkpoint, numpy  # the baseline: everything imported before converting
import convert.to_pi_jax, convert.hf_source, convert.gguf_source, convert.meta_source, torch, transformers
from pi_jax import checkpoint, model
def peak():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
base = peak()
src, out, dtype = sys.argv[1:4]
convert.to_pi_jax.convert(src, out, dtype=dtype)
config = checkpoint.load_config(out)
itemsize = numpy.dtype(convert.assemble.NUMPY_DTYPES[dtype]).itemsize
print(json.dumps({"baseline": base, "peak": peak(), "output": model.count_params(config) * itemsize}))
"""

_GGUF_CHILD = r"""
import json, os, resource, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, orbax.checkpoint, numpy, gguf, tqdm  # the baseline
import convert.to_gguf
from pi_jax import checkpoint, model
def peak():
  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
base = peak()
src, out, dtype = sys.argv[1:4]
convert.to_gguf.export(src, out, dtype=dtype, force=True)
print(json.dumps({"baseline": base, "peak": peak(), "output": os.path.getsize(out)}))
"""


def measure(src: str, out: str, dtype: str = "float32", child: str = _CHILD,
            root: str = ROOT) -> dict:
  """{'baseline', 'peak', 'output', 'ratio'} in bytes for converting SRC in a fresh process
  (importing the conversion code of the checkout `root`)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  r = subprocess.run([sys.executable, "-c", child, src, out, dtype], capture_output=True,
                     text=True, env=env, cwd=root)
  if r.returncode:
    raise RuntimeError(f"conversion of {src} failed:\n{r.stderr[-3000:]}")
  m = json.loads(r.stdout.strip().splitlines()[-1])
  m["ratio"] = (m["peak"] - m["baseline"]) / m["output"]
  return m


def measure_gguf(ckpt: str, out: str, dtype: str = "f32", root: str = ROOT) -> dict:
  """As `measure`, for `convert.to_gguf.export(ckpt, out, dtype=dtype)`, plus 'tensor': the
  largest tensor's bytes as CKPT stores it (one layer's slice of a stacked array)."""
  m = measure(ckpt, out, dtype, child=_GGUF_CHILD, root=root)
  m["tensor"] = largest_tensor_bytes(ckpt)
  return m


def largest_tensor_bytes(ckpt: str) -> int:
  """Bytes of CKPT's largest single tensor at its stored dtype (a stacked array's layer)."""
  import jax
  from pi_jax import checkpoint
  from pi_jax import model as model_lib
  shapes = model_lib.param_shapes(checkpoint.load_config(ckpt))
  stored = checkpoint.stored_dtypes(ckpt)
  flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
  return max(int(np.prod(shape[1:] if path[0].key == "layers" else shape))
             * np.dtype(stored[jax.tree_util.keystr(path)]).itemsize for path, shape in flat)


def write_random_checkpoint(path: str, layers: int = 16, hidden: int = 1024, mlp: int = 2816,
                            vocab: int = 8192, dtype: str = "float32") -> int:
  """A random pi_jax checkpoint (untied embeddings) written by save_checkpoint, with the byte
  tokenizer; returns its parameter count. The vocabulary is small so that one layer's
  projection, not the embedding, is the largest tensor: the stacked arrays dominate the file."""
  import jax
  import ml_dtypes
  from pi_jax import checkpoint
  from pi_jax import model as model_lib
  from pi_jax.config import ModelConfig
  config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 128,
                       max_position_embeddings=2048, tie_word_embeddings=False)
  rng = np.random.default_rng(0)
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  params = jax.tree.map(lambda shape: (rng.standard_normal(shape, np.float32) * 0.02)
                        .astype(np_dtype), model_lib.param_shapes(config),
                        is_leaf=lambda x: isinstance(x, tuple))
  checkpoint.save_checkpoint(path, config, params, force=True)
  write_byte_tokenizer(path)
  return sum(x.size for x in jax.tree.leaves(params))


def write_random_hf(path: str, layers: int = 8, hidden: int = 1024, mlp: int = 2816,
                    vocab: int = 32000, dtype: str = "float32", max_shard_bytes: int = 10**9) -> int:
  """A random LLaMA HF directory (config.json + safetensors), written tensor by tensor."""
  from convert.to_hf import write_safetensors
  from pi_jax.config import ModelConfig
  from convert import hf_layout
  config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 128,
                       max_position_embeddings=2048)
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  entries = []
  for name, _, kind, layer in hf_layout.hf_names(config):
    shapes = {"in_proj_q": (config.num_heads * 64, hidden), "in_proj_kv": (config.num_kv_heads * 64, hidden),
              "out_proj": (hidden, config.num_heads * 64), "vector": (hidden,)}
    if kind in shapes:
      shape = shapes[kind]
    elif name.startswith("model.embed"):
      shape = (vocab, hidden)
    elif name == "lm_head.weight":
      shape = (vocab, hidden)
    else:
      shape = {"gate_proj": (mlp, hidden), "up_proj": (mlp, hidden),
               "down_proj": (hidden, mlp)}[name.split(".")[-2]]
    entries.append((name, shape, dtype,
                    lambda shape=shape: rng.standard_normal(shape, np.float32) * 0.02))
  write_safetensors(os.path.join(path, "model.safetensors"), entries)
  from pi_jax import files
  files.write_json(os.path.join(path, "config.json"), config.to_hf(dtype=dtype))
  return sum(int(np.prod(e[1])) for e in entries)


def write_byte_tokenizer(ckpt: str) -> None:
  """A byte-level BPE with no merges (256 tokens) as CKPT/tokenizer/: GGUF needs one."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  os.makedirs(os.path.join(ckpt, "tokenizer"), exist_ok=True)
  tok.save(os.path.join(ckpt, "tokenizer", "tokenizer.json"))


def gguf_rows(tmp: str, smollm2: bool, layers: int, root: str) -> list:
  """(name, dtype, measurement) of GGUF exports: SmolLM2 as fetched, a random checkpoint."""
  rows = []
  if smollm2:
    from convert.fetch import smollm2_checkpoint
    ckpt = smollm2_checkpoint()
    for dtype in ("f32", "q8_0"):
      rows.append(("GGUF export of SmolLM2-135M ckpt", dtype,
                   measure_gguf(ckpt, f"{tmp}/smol-{dtype}.gguf", dtype, root)))
      os.remove(f"{tmp}/smol-{dtype}.gguf")
  n = write_random_checkpoint(f"{tmp}/random", layers=layers)
  for dtype in ("f32", "q8_0"):
    rows.append((f"GGUF export of random {n / 1e6:.0f}M ckpt", dtype,
                 measure_gguf(f"{tmp}/random", f"{tmp}/random-{dtype}.gguf", dtype, root)))
    os.remove(f"{tmp}/random-{dtype}.gguf")
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--skip-smollm2", action="store_true",
                 help="skip the SmolLM2-135M rows (GGUF import, GGUF export of its checkpoint)")
  p.add_argument("--layers", type=int, default=8, help="layers of the random 1024-wide model")
  p.add_argument("--gguf-only", action="store_true", help="only the GGUF export rows")
  p.add_argument("--gguf-layers", type=int, default=16,
                 help="layers of the random checkpoint the GGUF rows export (1024 wide, vocab 8192)")
  p.add_argument("--code", default=ROOT,
                 help="checkout whose exporter the GGUF rows measure (default: this one)")
  args = p.parse_args()
  code = os.path.abspath(args.code)
  if not os.path.isfile(os.path.join(code, "convert", "to_gguf.py")):
    p.error(f"--code {args.code}: no convert/to_gguf.py there (expected a pi_jax checkout)")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if not args.gguf_only:
      if not args.skip_smollm2:
        from convert.fetch import smollm2_gguf
        rows.append(("SmolLM2-135M GGUF Q4_1", "float32", measure(smollm2_gguf(), f"{tmp}/smol")))
      for src_dtype, out_dtype in (("float32", "float32"), ("bfloat16", "bfloat16"),
                                   ("bfloat16", "float32")):
        src = f"{tmp}/hf-{src_dtype}"
        if not os.path.exists(src):
          n = write_random_hf(src, layers=args.layers, dtype=src_dtype)
        rows.append((f"random HF {n / 1e6:.0f}M safetensors {src_dtype}", out_dtype,
                     measure(src, f"{tmp}/ck-{src_dtype}-{out_dtype}", out_dtype)))
    rows += gguf_rows(tmp, not args.skip_smollm2, args.gguf_layers, code)
  mb = lambda b: f"{b / 2**20:8.0f}"
  print(f"{'source':40s} {'output':8s} {'out MiB':>8s} {'base MiB':>8s} {'peak MiB':>8s} "
        f"{'(peak-base)/out':>16s} {'tensor/out':>10s}")
  for name, dtype, m in rows:
    tensor = f"{m['tensor'] / m['output']:10.3f}" if "tensor" in m else f"{'':10s}"
    print(f"{name:40s} {dtype:8s} {mb(m['output'])} {mb(m['baseline'])} {mb(m['peak'])} "
          f"{m['ratio']:16.3f} {tensor}")


if __name__ == "__main__":
  main()
