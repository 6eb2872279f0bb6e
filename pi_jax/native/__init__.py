"""Native CPU kernels (cpu_kernels.cc), built on first use and called from XLA through the FFI.

XLA:CPU's own dot runs the shapes of a small LLaMA's forward well below what OpenBLAS gets on the
same cores, and it does not fuse the online softmax with the products around it
(docs/performance.md). These kernels do both in C++ over OpenBLAS's sgemm (the scipy-openblas32
wheel): `causal_attention` (flash attention over the lower triangle), `matmul`, and
`logsumexp_pick` (the two terms of the next-token NLL from a chunk's logits).

The library is compiled once per source, jax version and CPU (g++ -O3 -march=native, ~3 s) into
$PI_JAX_NATIVE_CACHE (default ~/.cache/pi_jax/native), its size and sha256 recorded beside it,
and loaded with ctypes only when it matches that record (a damaged cache rebuilds itself).
PI_JAX_NATIVE=0/false/no/off turns the kernels off. `available()`
says whether that worked; where it did not (no g++, no scipy-openblas32), `unavailable_reason()`
says why and pi_jax falls back to its XLA implementations.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import time

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


# A build killed before its rename leaves its temporary; one this old is nobody's any more.
STALE_SECONDS = 600
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")


def cache_dir() -> str:
  return os.environ.get("PI_JAX_NATIVE_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "pi_jax", "native"))


def enabled() -> tuple[bool, str | None]:
  """PI_JAX_NATIVE, parsed once here: (on?, why off). Unset, 1/true/yes/on: on; 0/false/no/off:
  off; anything else is off too, with the reason naming the value."""
  value = os.environ.get("PI_JAX_NATIVE", "1").strip().lower()
  if value in _ON:
    return True, None
  if value in _OFF:
    return False, f"disabled by PI_JAX_NATIVE={os.environ['PI_JAX_NATIVE']}"
  return False, (f"PI_JAX_NATIVE={os.environ['PI_JAX_NATIVE']!r} is not a boolean (1/true/yes/on "
                 "or 0/false/no/off); the kernels stay off")


def threads() -> int:
  """Worker threads per kernel call: the cores this process may run on."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


def _cpu_signature() -> str:
  """The CPU's model and feature flags (the library is built with -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
  except OSError:
    lines = []
  return "".join(lines)


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return f"{os.fstat(f.fileno()).st_size} {hashlib.sha256(f.read()).hexdigest()}"


def verified(path: str) -> bool:
  """Whether `path` is the library its build recorded in `path.sha256` (size and sha256).

  Never dlopen an unverified file: a truncated library kills the process with SIGBUS when a
  page past its end is touched, an empty one fails to load, a foreign one lacks the symbols."""
  try:
    with open(path + ".sha256") as f:
      recorded = f.read().strip()
    return bool(recorded) and _digest(path) == recorded
  except OSError:
    return False


def _clean_stale(folder: str) -> None:
  """Removes temporaries of builds that died: `.NAME.tmp-PID-HEX` whose PID is gone, and any
  build temporary older than STALE_SECONDS (also the unnamed `tmp*.so` of earlier versions)."""
  from pi_jax import files
  now = time.time()
  for name in os.listdir(folder):
    full = os.path.join(folder, name)
    ours = name.startswith(".pi_jax_cpu_kernels_") and ".tmp-" in name
    if not ours and not (name.startswith("tmp") and name.endswith(".so")):
      continue
    with contextlib.suppress(OSError):
      if (ours and files.writer_is_dead(full)) or now - os.path.getmtime(full) > STALE_SECONDS:
        os.remove(full)


def _build() -> str:
  """Compiles cpu_kernels.cc (once per key) and returns the library's path, verified.

  The library is compiled to a temporary name, its size and sha256 written atomically to
  `NAME.sha256`, and then renamed into place: a library whose record is missing or differs
  (a killed build, a truncated or foreign file) is built again, never loaded."""
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
  folder = cache_dir()
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise RuntimeError(f"cannot create the kernel cache {folder}: {e.strerror}") from None
  path = os.path.join(folder, f"pi_jax_cpu_kernels_{key}.so")
  if verified(path):
    return path
  _clean_stale(folder)
  from pi_jax import files
  lib_dir = openblas.get_lib_dir()
  tmp = files.temporary_name(path)
  cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{openblas.get_include_dir()}",
         SOURCE, "-o", tmp, f"-L{lib_dir}", f"-l{openblas.get_library()}",
         f"-Wl,-rpath,{lib_dir}", "-lpthread"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    digest = _digest(tmp)
    files.write_text(path + ".sha256", digest + "\n")
    os.replace(tmp, path)  # atomic; a concurrent build of the same key may win: checked below
  except OSError as e:
    raise RuntimeError(f"cannot write the kernel library into {folder}: {e.strerror}") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  if not verified(path):  # two builds raced and their bytes differ: the next call builds again
    raise RuntimeError(f"{path} changed while it was being installed (a concurrent build); "
                       "the next run builds it again")
  return path


@functools.cache
def _load() -> tuple[bool, str]:
  """(True, path) once the kernels are registered with XLA, else (False, why not)."""
  on, why = enabled()
  if not on:
    return False, why
  try:
    path = _build()
    lib = ctypes.cdll.LoadLibrary(path)
    symbols = {target: getattr(lib, symbol) for target, symbol in TARGETS.items()}
  except (RuntimeError, OSError) as e:
    return False, str(e)
  except AttributeError as e:  # verified, yet not our library (its record was replaced too)
    for stale in (path, path + ".sha256"):
      with contextlib.suppress(OSError):
        os.remove(stale)
    return False, f"{path} is not pi_jax's kernel library ({e}); removed: the next run rebuilds it"
  for target, fn in symbols.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
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
