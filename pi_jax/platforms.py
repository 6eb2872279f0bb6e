"""Which jax backends a run may start: on a host without TPUs, never the TPU one.

The dev install brings libtpu (for the compile-only TPU checks). jax then tries its TPU backend
first on every host, and on a CPU host libtpu prints a block of errors ("Failed to find host
bounds", "unexpected worker hostname") before jax falls back to the CPU: it reads as a failure.
So when JAX_PLATFORMS is unset, libtpu is installed and the host has no TPU device files, the
backends are set to the ones the host has (`cuda,cpu` with an NVIDIA GPU and jax's CUDA plugin,
`rocm,cpu` likewise, else `cpu`). A TPU host, or a JAX_PLATFORMS the user set, is left alone.
Compile-only TPU work needs no TPU backend: it asks libtpu for a topology directly (pi_jax.tpu).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys


def tpu_present() -> bool:
  """TPU VMs expose their chips as /dev/accel* (v2-v5p) or /dev/vfio/N (v5e, v6e)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def host_platforms() -> str:
  """The GPU backends whose device and jax plugin are both here, then the CPU."""
  import pkgutil
  gpus = [("cuda", "/dev/nvidia[0-9]*"), ("rocm", "/dev/kfd")]
  present = [(name, pattern) for name, pattern in gpus if glob.glob(pattern)]
  plugins = {m.name for m in pkgutil.iter_modules() if m.name.startswith(("jax_cuda", "jax_rocm"))}
  return ",".join([name for name, _ in present
                   if any(p.startswith(f"jax_{name}") for p in plugins)] + ["cpu"])


def quiet_cpu_host() -> str | None:
  """Sets JAX_PLATFORMS (and jax's config, if jax is imported) on a host where the TPU backend
  can only fail; returns what it set, or None when it left things alone."""
  if os.environ.get("JAX_PLATFORMS") or tpu_present():
    return None
  if importlib.util.find_spec("libtpu") is None:
    return None  # without libtpu jax does not try the TPU and prints nothing
  platforms = host_platforms()
  os.environ["JAX_PLATFORMS"] = platforms
  if "jax" in sys.modules:  # jax read the environment at import: tell its config too
    sys.modules["jax"].config.update("jax_platforms", platforms)
  return platforms
