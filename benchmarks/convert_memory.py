"""Peak host memory of `convert.to_pi_jax` and `convert.to_gguf` (streaming), per output size.

  python -m benchmarks.convert_memory [--skip-smollm2] [--layers 8]

Each conversion runs in a fresh subprocess. Its baseline is the peak RSS after importing
everything the conversion imports (python, jax, orbax, torch, transformers), measured in the
same process just before converting; the table reports (peak RSS - baseline) / output size.
The GGUF rows export the pi_jax checkpoints written above (output: the .gguf file's size); the
export reads one checkpoint array at a time, so its peak is about the largest stacked array
(one projection over all layers) plus one layer's encoded tensor.
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
convert.to_gguf.export(src, out, dtype=dtype)
print(json.dumps({"baseline": base, "peak": peak(), "output": os.path.getsize(out)}))
"""


def measure(src: str, out: str, dtype: str = "float32", child: str = _CHILD) -> dict:
  """{'baseline', 'peak', 'output', 'ratio'} in bytes for converting SRC in a fresh process."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, "-c", child, src, out, dtype], capture_output=True,
                     text=True, env=env, cwd=ROOT)
  if r.returncode:
    raise RuntimeError(f"conversion of {src} failed:\n{r.stderr[-3000:]}")
  m = json.loads(r.stdout.strip().splitlines()[-1])
  m["ratio"] = (m["peak"] - m["baseline"]) / m["output"]
  return m


def measure_gguf(ckpt: str, out: str, dtype: str = "f32") -> dict:
  """As `measure`, for `convert.to_gguf.export(ckpt, out, dtype=dtype)`."""
  return measure(ckpt, out, dtype, child=_GGUF_CHILD)


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


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--skip-smollm2", action="store_true",
                 help="skip the SmolLM2-135M rows (GGUF import, GGUF export of its checkpoint)")
  p.add_argument("--layers", type=int, default=8, help="layers of the random 1024-wide model")
  args = p.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if not args.skip_smollm2:
      from convert.fetch import smollm2_gguf
      rows.append(("SmolLM2-135M GGUF Q4_1", "float32", measure(smollm2_gguf(), f"{tmp}/smol")))
      rows.append(("GGUF export of SmolLM2-135M ckpt", "f32",
                   measure_gguf(f"{tmp}/smol", f"{tmp}/smol-f32.gguf", "f32")))
    for src_dtype, out_dtype in (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")):
      src = f"{tmp}/hf-{src_dtype}"
      if not os.path.exists(src):
        n = write_random_hf(src, layers=args.layers, dtype=src_dtype)
      rows.append((f"random HF {n / 1e6:.0f}M safetensors {src_dtype}", out_dtype,
                   measure(src, f"{tmp}/ck-{src_dtype}-{out_dtype}", out_dtype)))
    for ck, gguf_dtype in (("float32-float32", "f32"), ("float32-float32", "q8_0"),
                           ("bfloat16-bfloat16", "bf16")):
      write_byte_tokenizer(f"{tmp}/ck-{ck}")
      rows.append((f"GGUF export of pi_jax {ck.split('-')[1]} ckpt", gguf_dtype,
                   measure_gguf(f"{tmp}/ck-{ck}", f"{tmp}/{ck}-{gguf_dtype}.gguf", gguf_dtype)))
  mb = lambda b: f"{b / 2**20:8.0f}"
  print(f"{'source':40s} {'output':8s} {'out MiB':>8s} {'base MiB':>8s} {'peak MiB':>8s} {'(peak-base)/out':>16s}")
  for name, dtype, m in rows:
    print(f"{name:40s} {dtype:8s} {mb(m['output'])} {mb(m['baseline'])} {mb(m['peak'])} {m['ratio']:16.2f}")


if __name__ == "__main__":
  main()
