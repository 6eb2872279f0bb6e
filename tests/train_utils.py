"""Helpers for the training tests: run train.py in a subprocess with N fake CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

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


# What every N-device child script starts with (the environment from subprocess_env sets the
# device count before jax is imported): jax, numpy and a relative-error helper.
DEVICE_PRELUDE = """
import jax, jax.numpy as jnp, numpy as np

def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
"""


def run_on_devices(script: str, *args, marker: str, devices: int = 8,
                   timeout: float = 1200) -> str:
  """Runs DEVICE_PRELUDE + `script` in a fresh process with `devices` fake CPU devices; returns
  its stdout, failing with its stderr unless it exits 0 and prints `marker`."""
  proc = subprocess.run([sys.executable, "-c", DEVICE_PRELUDE + script, *map(str, args)],
                        env=subprocess_env(devices), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0 and marker in proc.stdout, proc.stderr[-4000:]
  return proc.stdout


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


def interrupt_after_steps(cmd, workdir, sig, logs, steps: int = 3, devices: int = 1,
                          timeout: float = 240) -> subprocess.CompletedProcess:
  """Starts train.py `cmd`, sends `sig` once WORKDIR/metrics.jsonl has `steps` records, and
  returns the finished process. Its output goes to files under `logs` (a pipe nobody reads
  could fill and stall the run); fails if the run ends or stalls before that step."""
  out_path, err_path = os.path.join(logs, "train.stdout"), os.path.join(logs, "train.stderr")
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(out_path, "w") as out, open(err_path, "w") as err:
    proc = subprocess.Popen(cmd, env=subprocess_env(devices), cwd=REPO, stdout=out, stderr=err,
                            text=True)
    deadline = time.time() + timeout
    try:
      while True:
        if os.path.exists(metrics):
          with open(metrics) as f:
            if sum(1 for _ in f) >= steps:
              break
        if proc.poll() is not None or time.time() > deadline:
          with open(err_path) as f:
            raise AssertionError(f"train.py {'ended' if proc.poll() is not None else 'stalled'} "
                                 f"before step {steps}:\n{f.read()[-3000:]}")
        time.sleep(0.2)
      proc.send_signal(sig)
      proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
  with open(out_path) as f_out, open(err_path) as f_err:
    return subprocess.CompletedProcess(cmd, proc.returncode, f_out.read(), f_err.read())


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


_SHARDED_ATTENTION = """
from pi_jax import attention as attn_lib, dispatch, linear, sharding

attend = {attend}
# Batch over data x fsdp, heads over tensor (kv heads 2 split too); then kv heads 1, which
# tensor=2 cannot split: heads stay whole on every shard.
for spec, n, kh in [("data:2,fsdp:2,tensor:2", 4, 2), ("data:2,fsdp:2,tensor:2", 4, 1)]:
  ks = jax.random.split(jax.random.key(kh), 4)
  q = jax.random.normal(ks[0], (4, {length}, n, {head_dim}))
  w = jax.random.normal(ks[3], (4, {length}, n, {head_dim}))
  k, v = (jax.random.normal(x, (4, {length}, kh, {head_dim})) for x in ks[1:3])
  def run(fn):
    def f(q, k, v):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(w)
    return f
  with jax.set_mesh(sharding.make_mesh(spec)):
    f = jax.jit(run(attend))
    out, grads = f(q, k, v)
    text = f.lower(q, k, v).as_text()
    {inside_mesh}
  assert "manual_computation" in text or "shard_map" in text, "the kernel is not in a shard_map"
  want, want_grads = run(attn_lib.reference_attention)(q, k, v)
  assert rel(out, want) < 1e-5, (spec, kh, rel(out, want))
  for g, gw in zip(grads, want_grads):
    assert rel(g, gw) < {grad_tol}, (spec, kh, rel(g, gw))
print("SHARDED_ATTENTION_OK")
"""


def check_sharded_attention(attend: str, length: int, head_dim: int, grad_tol: float = 1e-5,
                            inside_mesh: str = "pass"):
  """On 8 fake devices, under meshes that split batch and heads: the attention `attend` (a
  Python expression taking q, k, v) equals reference attention in outputs and q/k/v gradients
  and runs inside a shard_map. `inside_mesh`: one more statement to run under the mesh."""
  run_on_devices(_SHARDED_ATTENTION.format(attend=attend, length=length, head_dim=head_dim,
                                           grad_tol=grad_tol, inside_mesh=inside_mesh),
                 marker="SHARDED_ATTENTION_OK")
