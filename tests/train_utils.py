"""Helpers for the training tests: run train.py in a subprocess with N fake CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from pi_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")
# Small and quick: 5 documents, 8 × 64-token sequences per step, no evaluation.
QUICK = ["max_docs=5", "eval_every=0", "eval_sequences=0", "tensorboard=false"]


def subprocess_env(devices: int = 1) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  # The subprocesses compile the same few programs again and again: share them on disk.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                           "pi_jax_test_jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  return env


def train_cmd(workdir, sets=(), config: str = TINY) -> list[str]:
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config", config, "--no-progress",
         "--set", f"workdir={workdir}"]
  for s in [*QUICK, *sets]:
    cmd += ["--set", s]
  return cmd


def run_train(workdir, sets=(), devices: int = 1, timeout: float = 300, check: bool = True):
  """Runs train.py to completion; returns the CompletedProcess."""
  proc = subprocess.run(train_cmd(workdir, sets), env=subprocess_env(devices), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}
