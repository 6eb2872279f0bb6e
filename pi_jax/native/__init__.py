"""Native CPU kernels (cpu_kernels.cc), built on first use and called from XLA through the FFI.

XLA:CPU's own dot runs the shapes of a small LLaMA's forward well below what OpenBLAS gets on the
same cores, and it does not fuse the online softmax with the products around it
(docs/performance.md). These kernels do both in C++ over OpenBLAS's sgemm (the scipy-openblas32
wheel): `causal_attention` (flash attention over the lower triangle), `matmul`, and
`logsumexp_pick` (the two terms of the next-token NLL from a chunk's logits).

The library is compiled once per source, jax version and CPU (g++ -O3 -march=native, ~3 s) into
$PI_JAX_NATIVE_CACHE (default ~/.cache/pi_jax/native) and loaded with ctypes. `available()`
says whether that worked; where it did not (no g++, no scipy-openblas32), `unavailable_reason()`
says why and pi_jax falls back to its XLA implementations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
# 512-bit vectors where the CPU has them (GCC prefers 256 on x86 unless told; the softmax passes
# run ~6% faster at 512).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
         "-fopenmp-simd", "-w") + (
             ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())
TARGETS = {"pi_causal_attention": "PiCausalAttention", "pi_matmul": "PiMatmul",
           "pi_logsumexp_pick": "PiLogSumExpPick"}


def cache_dir() -> str:
  return os.environ.get("PI_JAX_NATIVE_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "pi_jax", "native"))


def threads() -> int:
  """Worker threads per kernel call: the cores this process may run on."""
  return max(1, len(os.sched_getaffinity(0)))


def _cpu_signature() -> str:
  """The CPU's model and feature flags (the library is built with -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
  except OSError:
    lines = []
  return "".join(lines)


def _build() -> str:
  """Compiles cpu_kernels.cc (once per key) and returns the library's path."""
  try:
    import scipy_openblas32 as openblas
  except ImportError as e:
    raise RuntimeError("the scipy-openblas32 package is not installed "
                       "(pip install -r requirements.txt)") from e
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++, or $CXX) on PATH")
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), jax.__version__.encode(),
                                   openblas.__version__.encode(), compiler.encode(),
                                   _cpu_signature().encode()])).hexdigest()[:16]
  os.makedirs(cache_dir(), exist_ok=True)
  path = os.path.join(cache_dir(), f"pi_jax_cpu_kernels_{key}.so")
  if os.path.isfile(path):
    return path
  lib_dir = openblas.get_lib_dir()
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
  os.close(fd)
  cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{openblas.get_include_dir()}",
         SOURCE, "-o", tmp, f"-L{lib_dir}", f"-l{openblas.get_library()}",
         f"-Wl,-rpath,{lib_dir}", "-lpthread"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


@functools.cache
def _load() -> tuple[bool, str]:
  """(True, path) once the kernels are registered with XLA, else (False, why not)."""
  if os.environ.get("PI_JAX_NATIVE", "1") == "0":
    return False, "disabled by PI_JAX_NATIVE=0"
  try:
    path = _build()
    lib = ctypes.cdll.LoadLibrary(path)
  except (RuntimeError, OSError) as e:
    return False, str(e)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return True, path


def available() -> bool:
  """Whether the native CPU kernels are built and registered (builds them on first call)."""
  return _load()[0]


def unavailable_reason() -> str | None:
  ok, why = _load()
  return None if ok else why


def _require():
  ok, why = _load()
  if not ok:
    raise RuntimeError(f"pi_jax's native CPU kernels are unavailable: {why}")


def causal_attention(q_BLNH, k_BLKH, v_BLKH, *, block_size: int, segment_ids_BL=None):
  """Causal attention, float32: (out [B, L, N, H], lse [B, N, L]), lse the log-sum-exp of each
  query's scaled scores; with segment ids int [B, L] a query sees only keys of its own id.
  Forward only (pi_jax.attention.cpu adds the gradient)."""
  _require()
  b, l, n, h = q_BLNH.shape
  # No ids: an empty buffer, and the kernel compares nothing.
  seg = (jnp.zeros((0,), jnp.int32) if segment_ids_BL is None
         else segment_ids_BL.astype(jnp.int32))
  call = jax.ffi.ffi_call(
      "pi_causal_attention",
      (jax.ShapeDtypeStruct(q_BLNH.shape, jnp.float32),
       jax.ShapeDtypeStruct((b, n, l), jnp.float32)),
      vmap_method="sequential")
  return call(q_BLNH.astype(jnp.float32), k_BLKH.astype(jnp.float32), v_BLKH.astype(jnp.float32),
              seg, block=np.int64(block_size), threads=np.int64(threads()),
              scale=np.float32(1.0 / np.sqrt(h)))


def matmul(x_MK, w, *, transpose_w: bool = False):
  """x [M, K] @ w [K, N] (or @ w.T for w [N, K] when transpose_w) in float32 through OpenBLAS,
  the rows split over the cores."""
  _require()
  n = w.shape[0] if transpose_w else w.shape[1]
  call = jax.ffi.ffi_call("pi_matmul", jax.ShapeDtypeStruct((x_MK.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x_MK.astype(jnp.float32), w.astype(jnp.float32), threads=np.int64(threads()),
              transpose_w=transpose_w)


def logsumexp_pick(logits_MV, targets_M):
  """(logsumexp [M], logits[m, targets[m]] [M]) of float32 logits [M, V], the rows split over
  the cores. Forward only (pi_jax.loss adds the gradient)."""
  _require()
  m = logits_MV.shape[0]
  out = jax.ShapeDtypeStruct((m,), jnp.float32)
  call = jax.ffi.ffi_call("pi_logsumexp_pick", (out, out), vmap_method="sequential")
  return call(logits_MV.astype(jnp.float32), targets_M.astype(jnp.int32),
              threads=np.int64(threads()))
