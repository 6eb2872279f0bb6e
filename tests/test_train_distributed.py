"""Sharded, multi-process and interrupted training runs give the losses of a plain run.

Each run is train.py in a subprocess with fake CPU devices (XLA_FLAGS set before jax starts).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import train_utils as tu

STEPS = 10
# One setting for every run here (20 steps, checkpoints at 10 and 20): the runs share programs,
# so the on-disk compilation cache makes all but the first cheap.
SETS = ["steps=20", "checkpoint_every=10"]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
  """20 uninterrupted steps of the tiny model on one CPU device."""
  workdir = tmp_path_factory.mktemp("ref1")
  tu.run_train(workdir, SETS, devices=1)
  return tu.losses(workdir)


def _first(losses: dict, n: int = STEPS) -> dict:
  return {k: v for k, v in losses.items() if k < n}


def _assert_same(got: dict, want: dict, rtol: float = 1e-5):
  assert sorted(got) == sorted(want) == list(range(len(want)))
  g = np.array([got[k] for k in sorted(got)])
  w = np.array([want[k] for k in sorted(want)])
  np.testing.assert_allclose(g, w, rtol=rtol, atol=0)
  assert w[-1] < w[0] - 0.1  # it trained: losses move, so equality is not vacuous


def test_eight_devices_match_one(tmp_path, reference_losses):
  tu.run_train(tmp_path, [f"steps={STEPS}", "checkpoint_every=100",
                          "mesh=data:2,fsdp:2,tensor:2"], devices=8)
  _assert_same(tu.losses(tmp_path), _first(reference_losses))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path, reference_losses):
  """2 processes × 4 CPU devices (gloo collectives) == 1 process × 1 device == 1 × 8 devices."""
  port = _free_port()
  procs = []
  for pid in range(2):
    cmd = tu.train_cmd(tmp_path, [f"steps={STEPS}", "checkpoint_every=5",
                                  "mesh=data:2,fsdp:2,tensor:2",
                                  f"coordinator=127.0.0.1:{port}", "num_processes=2",
                                  f"process_id={pid}"])
    procs.append(subprocess.Popen(cmd, env=tu.subprocess_env(4), cwd=tu.REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  _assert_same(tu.losses(tmp_path), _first(reference_losses))
  assert os.path.isfile(tmp_path / "final" / "config.json")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]


def _wrapper(kill_after_checkpoint: int) -> str:
  """python -c program: train.py, but SIGKILL itself once checkpoint N is on disk."""
  return (
      "import os, signal, sys, runpy\n"
      "from pi_jax.train import trainer\n"
      "orig = trainer.Trainer.save\n"
      "def save(self):\n"
      "  orig(self)\n"
      f"  if self.step >= {kill_after_checkpoint}:\n"
      "    self.checkpoints.wait()\n"
      "    os.kill(os.getpid(), signal.SIGKILL)\n"
      "trainer.Trainer.save = save\n"
      "sys.argv = sys.argv[1:]\n"
      "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_sigkill_then_resume_gives_uninterrupted_losses(tmp_path, reference_losses):
  cmd = tu.train_cmd(tmp_path, SETS)
  killed = subprocess.run([sys.executable, "-c", _wrapper(10), *cmd[1:]],
                          env=tu.subprocess_env(1), cwd=tu.REPO, capture_output=True, text=True,
                          timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
  assert not os.path.exists(tmp_path / "final")
  resumed = tu.run_train(tmp_path, SETS)
  assert "final checkpoint" in resumed.stdout
  got = tu.losses(tmp_path)
  assert sorted(got) == sorted(reference_losses) == list(range(20))
  # Exactly equal: same batches, same state, same program.
  assert [got[k] for k in range(20)] == [reference_losses[k] for k in range(20)]


def test_sigterm_saves_and_exits_zero(tmp_path):
  cmd = tu.train_cmd(tmp_path, ["steps=100000", "checkpoint_every=100000"])
  proc = tu.interrupt_after_steps(cmd, tmp_path, signal.SIGTERM, tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "SIGTERM: saved checkpoint" in proc.stdout
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints")]
  assert len(steps) == 1 and 3 <= steps[0] < 100000
  assert steps[0] == len(tu.losses(tmp_path))  # the checkpoint holds every step that ran
  assert not os.path.exists(tmp_path / "final")


FSDP_BYTES = r"""
import json, jax, math
from pi_jax.config import ModelConfig
from pi_jax.sharding import make_mesh
from pi_jax.train import TrainConfig, make_optimizer
from pi_jax.train import state as S
model = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                    num_heads=4, max_position_embeddings=64)
opt = make_optimizer(TrainConfig())
abstract = S.abstract_state(model, opt)
leaves = jax.tree.leaves(abstract)
planned = {}
for fsdp in (1, 2, 4, 8):
  mesh = make_mesh(f"data:{8 // fsdp},fsdp:{fsdp}")
  shardings = jax.tree.leaves(S.state_shardings(mesh, model, opt, abstract))
  planned[fsdp] = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                      for a, s in zip(leaves, shardings))
# What the jitted init really puts on device 0 (fsdp=8), to check the plan is what is built.
state = S.init_state(model, opt, S.state_shardings(make_mesh("fsdp:8"), model, opt, abstract), 0)
dev = jax.devices()[0]
real = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
           if s.device == dev)
total = sum(a.size * a.dtype.itemsize for a in leaves)
# Full-size LLaMA 7B, shapes only: the per-device share of params + AdamW state over fsdp:8.
from pi_jax.presets import preset
big = preset("llama-7b")
big_abstract = S.abstract_state(big, opt)
big_leaves = jax.tree.leaves(big_abstract)
big_total = sum(a.size * a.dtype.itemsize for a in big_leaves)
big_shard = jax.tree.leaves(S.state_shardings(make_mesh("fsdp:8"), big, opt, big_abstract))
big_per = sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
              for a, s in zip(big_leaves, big_shard))
print(json.dumps({"planned": planned, "real8": real, "total": total, "big_total": big_total,
                  "big_per": big_per}))
"""


def test_fsdp_shrinks_per_device_state_bytes():
  proc = subprocess.run([sys.executable, "-c", FSDP_BYTES], env=tu.subprocess_env(8),
                        cwd=tu.REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  import json
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  per, total = {int(k): v for k, v in result["planned"].items()}, result["total"]
  # Everything but the norms and the step/count scalars has an `embed` axis split over fsdp.
  small = 3 * 4 * (2 * 128 * 2 + 128) + 3 * 4  # params+mu+nu of the norms; step and 2 counts
  assert per[1] == total
  for fsdp in (2, 4, 8):
    assert per[fsdp] == (total - small) // fsdp + small, (fsdp, per)
  assert result["real8"] == per[8]
  # LLaMA 7B: 6.74e9 parameters × 12 bytes (float32 params, mu, nu), an eighth per device
  # up to the replicated norms.
  assert result["big_total"] == 12 * 6_738_415_616 + 3 * 4  # + step and two optimizer counts
  assert result["big_total"] / 8 <= result["big_per"] < result["big_total"] / 8 * 1.001
