"""One saved step of a training run as a pi_jax checkpoint, for eval.py --ckpt.

  python -m pi_jax.train.export runs/mini_pretrain 2500 runs/mini_pretrain/step2500

train.py writes WORKDIR/final only at the end; the numbered checkpoints under
WORKDIR/checkpoints/ hold the whole training state (parameters, optimizer moments, data
position). This writes the parameters of one of them with the run's final model config and
tokenizer, the same layout as WORKDIR/final. The whole state is restored on the host first
(parameters and both Adam moments: about 3× the model in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import orbax.checkpoint as ocp

from pi_jax import checkpoint as ckpt_lib
from pi_jax.train import state as state_lib
from pi_jax.train import setup
from pi_jax.train.config import TrainConfig


def run_config(workdir: str) -> TrainConfig:
  """The TrainConfig a run recorded in WORKDIR/run_config.json."""
  path = os.path.join(workdir, "run_config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} is not a train.py run folder: {path} does not exist")
  with open(path) as f:
    return TrainConfig.from_dict(json.load(f))


def export_step(workdir: str, step: int, out: str) -> str:
  """Writes step `step` of the run in `workdir` to `out` as a pi_jax checkpoint; returns `out`."""
  folder = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(folder) if d.isdigit() and os.path.isfile(
      os.path.join(folder, d, "commit_success.txt"))) if os.path.isdir(folder) else []
  if step not in steps:
    raise ValueError(f"{workdir} has no checkpoint of step {step}; saved steps: {steps or 'none'}")
  if os.path.exists(os.path.join(out, ckpt_lib.CONFIG_FILE)):
    raise FileExistsError(f"{out} already holds a checkpoint; choose another folder")
  config = run_config(workdir)
  model, _ = setup.abstract_model_config(config)
  _, tokenizer_files = setup.tokenizer_and_files(config, model)
  state_dir = os.path.abspath(os.path.join(folder, str(step), "state"))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(state_dir)["params"]
  return state_lib.save_final(out, model, params, tokenizer_files)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m pi_jax.train.export",
                              description=__doc__.splitlines()[0])
  p.add_argument("workdir", help="the train.py run folder (its --set workdir=)")
  p.add_argument("step", type=int, help="a saved step (WORKDIR/checkpoints/STEP)")
  p.add_argument("out", help="where to write the checkpoint (a new folder)")
  args = p.parse_args(argv)
  try:
    path = export_step(args.workdir, args.step, args.out)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    return 2
  print(f"step {args.step} of {args.workdir} -> {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
