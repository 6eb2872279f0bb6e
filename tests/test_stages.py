"""Staged lengths (issue 25): stages in one workdir; a run stopped at a stage boundary (or inside
a stage) and rerun gives exactly the uninterrupted losses; bad stages refused before compiling."""

import os
import re
import tempfile

import jax
import pytest

from pi_jax.train import optim, stages
from pi_jax.train.config import Stage, load_config_file
from tests.train_utils import TINY, losses

STAGES = (Stage(steps=3, seq_len=32, learning_rate=3e-3),
          Stage(steps=2, seq_len=64, global_batch=2, learning_rate=2e-3, warmup_steps=1),
          Stage(steps=2, seq_len=128, rope_scaling="linear:2", learning_rate=1e-3))


def _config(workdir, **kw):
  return load_config_file(TINY).replace(
      workdir=str(workdir), max_docs=5, eval_every=0, eval_sequences=0, tensorboard=False,
      global_batch=4, checkpoint_every=100, async_checkpoints=False, stages=STAGES, **kw)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
  """Each stage's Trainer jits its step anew: the reruns find the programs on disk."""
  old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                             "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(tempfile.gettempdir(), "pi_jax_test_jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


class Stop(Exception):
  pass


def _stop_after(step):
  def callback(info):
    if info.step == step:
      raise Stop
  return callback


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("whole")
  logs = []
  whole = stages.train_stages(_config(workdir), log=logs.append)
  assert whole["status"] == "finished" and whole["step"] == 7
  assert [line.split(":")[0] for line in logs] == ["stage 1/3", "stage 2/3", "stage 3/3"]
  assert os.path.isfile(workdir / "final" / "config.json")
  want = losses(workdir)
  assert sorted(want) == list(range(7))
  return want


# Stopped after step 2 (3 done: stage 1's end, a boundary), or after step 5 (inside stage 3,
# with a checkpoint every step).
@pytest.mark.parametrize("stop_at", [2, 5])
def test_stopped_and_rerun_gives_the_uninterrupted_losses(tmp_path, uninterrupted, stop_at):
  config = _config(tmp_path).replace(checkpoint_every=1 if stop_at == 5 else 100)
  with pytest.raises(Stop):
    stages.train_stages(config, [_stop_after(stop_at)], log=lambda m: None)
  assert not os.path.exists(tmp_path / "final")
  assert sorted(losses(tmp_path)) == list(range(stop_at + 1))
  stages.train_stages(config, log=lambda m: None)
  assert losses(tmp_path) == uninterrupted


def test_stage_configs_and_schedule():
  config = _config("unused")
  plan = stages.check(config)
  assert [(p.start, p.end, p.config.seq_len, p.config.global_batch) for p in plan] == [
      (0, 3, 32, 4), (3, 5, 64, 2), (5, 7, 128, 4)]
  lr = optim.learning_rate_schedule(config)
  # Stage 1 warms up over the run config's 5 steps from 0.1 x its peak; stage 2 over 1 step.
  assert abs(float(lr(0)) - 3e-4) < 1e-9 and abs(float(lr(3)) - 2e-4) < 1e-9
  assert abs(float(lr(4)) - 2e-3) < 1e-9 and abs(float(lr(5)) - 1e-4) < 1e-9


@pytest.mark.parametrize("bad,message", [
    ((Stage(steps=1, seq_len=64), Stage(steps=1, seq_len=32)),
     "stage 2 \\(seq_len 32\\): the window shrinks from 64"),
    ((Stage(steps=1, seq_len=64), Stage(steps=1, seq_len=128, rope_scaling="linear:4")),
     "stage 2 \\(seq_len 128\\): rope_scaling linear:4 makes a window of 256 .* use linear:2"),
    ((Stage(steps=1, seq_len=128),),
     "stage 1 \\(seq_len 128\\): seq_len 128 exceeds the model's window 64"),
])
def test_bad_stages_are_refused_before_compiling(tmp_path, bad, message):
  with pytest.raises(ValueError, match=message):
    stages.train_stages(_config(tmp_path).replace(stages=bad))
  assert not os.path.exists(tmp_path / "checkpoints")


_STAGED_CONFIG = """
from pi_jax.run import RunOptions
from pi_jax.train.config import Stage, load_config_file

def get_config():
  return load_config_file({tiny!r}).replace(
      workdir="runs/staged", mesh="fsdp:-1", packing="documents",
      run=RunOptions(compute_dtype="bfloat16", remat="full"), stages={stages})
"""


@pytest.mark.parametrize("bad", [False, True])
def test_compile_only_checks_every_stage(tmp_path, bad):
  """--compile-only compiles each stage (documents packed: segment ids through splash) for a
  v5e 2x2; a bad stage list exits 2 with the reason, before any compile."""
  import subprocess
  import sys

  from pi_jax import tpu
  from tests.test_aot import _env
  if not tpu.libtpu_available():
    pytest.fail("libtpu is not installed: pip install -r requirements-dev.txt")
  staged = ("(Stage(steps=2, seq_len=64), Stage(steps=2, seq_len=256, rope_scaling='linear:4'))"
            if not bad else "(Stage(steps=2, seq_len=64), Stage(steps=2, seq_len=32))")
  path = tmp_path / "staged.py"
  path.write_text(_STAGED_CONFIG.format(tiny=TINY, stages=staged))
  proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(TINY), "..", "train.py"),
                         "--config", str(path), "--compile-only", "--topology", "v5e:2x2"],
                        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
  if bad:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "stage 2 (seq_len 32): the window shrinks from 64" in proc.stderr
    assert "Traceback" not in proc.stderr
    return
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "stage 1/2: seq_len 64" in proc.stdout and "stage 2/2: seq_len 256" in proc.stdout
  assert proc.stdout.count("fits") >= 2
  assert not (tmp_path / "runs").exists()


def test_train_py_killed_after_a_boundary_and_rerun(tmp_path, uninterrupted):
  """train.py with the staged config, SIGKILLed once step 3 (stage 2's first) is logged: the
  newest checkpoint is a stage's last step; the rerun starts the next stage from it and the
  losses are the uninterrupted run's."""
  import signal
  import subprocess

  from tests.train_utils import interrupt_after_steps, subprocess_env, train_cmd
  workdir = tmp_path / "run"
  config = tmp_path / "staged.py"
  config.write_text("from tests.test_stages import _config\n\n"
                    f"def get_config():\n  return _config({str(workdir)!r})\n")
  cmd = train_cmd(workdir, config=str(config))
  interrupt_after_steps(cmd, workdir, signal.SIGKILL, str(tmp_path), steps=4, timeout=600)
  proc = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The kill lands after step 3 is logged: before stage 2 saves its last step 5 (the rerun
  # starts stage 2 from stage 1's checkpoint 3) or after (stage 3 from checkpoint 5). Either
  # is a resume at a stage boundary.
  assert re.search(r"stage 2/3: .*resuming from step 3 |stage 3/3: .*resuming from step 5 ",
                   proc.stderr), proc.stderr[-3000:]
  assert "stage 1/3" not in proc.stderr
  assert losses(workdir) == uninterrupted
