"""Train or fine-tune a model: `python train.py --config configs/NAME.py [--set key=value ...]`.

Rerunning the same command resumes from the run's newest good checkpoint; SIGTERM or Ctrl-C
saves and exits 0 (a second Ctrl-C stops without saving). One run per workdir at a time.
See pi_jax/train/config.py for every key --set accepts (--print-config shows their values).

`--compile-only --topology v5p-64 [--json out.json]` compiles the same train step for a TPU slice
on this host (no TPU, no weights needed), prints its memory per chip and exits 1 if it does not
fit, with the settings that would make it fit (docs/tpu.md). `--topology auto` (or `v5e,v5p`)
finds the smallest slice that fits; a slice whose floor is over its HBM is refused in seconds.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=type("HelpFormatter", (
                                       argparse.RawDescriptionHelpFormatter,
                                       argparse.ArgumentDefaultsHelpFormatter), {}))
  parser.add_argument("--config", required=True, help="run config: a .py file with get_config()")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable); model.FIELD=... for a literal "
                           "model; run.FIELD=... for how the run computes (run.compute_dtype, "
                           "run.remat, run.attention_impl, run.attention_block_size, "
                           "run.param_dtype, run.native)")
  parser.add_argument("--print-config", action="store_true", help="print the final config and exit")
  parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  parser.add_argument("--compile-only", action="store_true",
                      help="compile the train step for --topology and report its memory; no run")
  parser.add_argument("--topology", default=None,
                      help="TPU slice for --compile-only: v5p-64, v4-32, v5e-16, v6e-64, v5e:4x4; "
                           "or `auto` / generations (v5e,v5p) / several slices: the planner "
                           "compiles from the smallest total HBM up and reports the first fit")
  parser.add_argument("--json", dest="json_out", default=None,
                      help="with --compile-only: write the record here")
  args = parser.parse_args(argv)
  if args.compile_only != bool(args.topology):
    parser.error("--compile-only and --topology go together")
  if args.json_out and not args.compile_only:
    parser.error("--json is for --compile-only")

  from pi_jax.train import config as config_lib
  try:
    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), args.set)
  except (ValueError, TypeError, FileNotFoundError) as e:
    parser.error(str(e))
  if args.print_config:
    import json
    from pi_jax.train import setup as setup_lib
    try:
      setup_lib.validate_config(config, need_checkpoint=False)  # what the run would refuse
    except (ValueError, FileNotFoundError) as e:
      parser.error(str(e))
    print(json.dumps(config.to_dict(), indent=2, default=str))
    return 0

  if args.compile_only:
    return _compile_only(config, args)
  if config.stages:
    return _train_stages(config, args)

  from pi_jax.data.sources import DataError
  from pi_jax.data.store import StoreError
  from pi_jax.train import trainer as trainer_lib
  try:
    trainer = trainer_lib.Trainer(config)
  except (ValueError, FileNotFoundError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("train.py: interrupted while starting; nothing was trained or saved", file=sys.stderr)
    return 130
  if trainer.is_main:  # what the run computes with (stdout: stderr is for progress and errors)
    print(f"train.py: {config.run.describe()}; kernels: {trainer.kernels.describe()}",
          flush=True)
  if trainer.is_main and trainer.resume_message:
    print(f"train.py: {trainer.resume_message}", file=sys.stderr, flush=True)
  callbacks = []
  bar = None
  if trainer.is_main and not args.no_progress and trainer.step < config.steps:
    from tqdm import tqdm
    bar = tqdm(total=config.steps, initial=trainer.step, unit="step", dynamic_ncols=True)

    def progress(info):
      bar.update(1)
      if info.step % config.log_every == 0:
        r = info.record
        bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['learning_rate']:.2e}",
                        tok_s=f"{r['tokens_per_second']:.0f}")
    callbacks.append(progress)
  trainer.callbacks.extend(callbacks)
  try:
    summary = trainer.run()
  except (trainer_lib.NonFiniteError, trainer_lib.state_lib.CheckpointWriteError) as e:
    if bar is not None:
      bar.close()
    print(f"train.py: stopped: {e}", file=sys.stderr)
    return 1
  except (StoreError, DataError) as e:  # a token store or document damaged under the run
    if bar is not None:
      bar.close()
    print(f"train.py: stopped: {e}. Rerun the same command to resume from the last checkpoint in "
          f"{config.workdir}/checkpoints once the data is whole again", file=sys.stderr)
    return 1
  except OSError as e:  # metrics.jsonl, WORKDIR/final: a full disk, a folder gone read-only
    if bar is not None:
      bar.close()
    print(f"train.py: stopped: cannot write {e.filename or config.workdir}: {e.strerror or e}; "
          f"rerun the same command to resume from the last checkpoint in {config.workdir}",
          file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    if bar is not None:
      bar.close()
    print(f"train.py: stopped by a second Ctrl-C without saving; rerun the same command to "
          f"resume from the last complete checkpoint in {config.workdir}/checkpoints",
          file=sys.stderr)
    return 130
  if bar is not None:
    bar.close()
  if trainer.is_main:
    if summary["status"] == "preempted":
      print(f"{summary['signal']}: saved checkpoint at step {summary['step']} in "
            f"{config.workdir}; rerun the same command to resume")
    else:
      print(f"done: step {summary['step']}; final checkpoint {summary['final']}")
  return 0


def _train_stages(config, args) -> int:
  """A run config with stages: each in turn, in one workdir (pi_jax/train/stages.py)."""
  from pi_jax.train import stages
  from pi_jax.train import trainer as trainer_lib
  bar = None
  callbacks = []
  if not args.no_progress:
    from tqdm import tqdm
    bar = tqdm(total=stages.total_steps(config), unit="step", dynamic_ncols=True)

    def progress(info):
      bar.n = info.step + 1
      bar.set_postfix(loss=f"{info.record['loss']:.4f}", seq_len=info.trainer.config.seq_len)
      bar.refresh()
    callbacks.append(progress)
  log = lambda m: print(f"train.py: {m}", file=sys.stderr, flush=True)
  try:
    summary = stages.train_stages(config, callbacks, log=log)
  except (ValueError, FileNotFoundError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 2
  except trainer_lib.NonFiniteError as e:
    print(f"train.py: stopped: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"train.py: stopped by a second Ctrl-C without saving; rerun the same command to "
          f"resume from the last complete checkpoint in {config.workdir}/checkpoints",
          file=sys.stderr)
    return 130
  finally:
    if bar is not None:
      bar.close()
  if summary["status"] == "preempted":
    print(f"{summary['signal']}: saved checkpoint at step {summary['step']} in "
          f"{config.workdir}; rerun the same command to resume")
  else:
    print(f"done: step {summary['step']}; final checkpoint {summary['final']}")
  return 0


def _compile_only(config, args) -> int:
  """0 if the step fits (the slice given, or the smallest of several / `auto`), 1 if not (with
  the numbers and the levers that would make it fit), 2 on a bad config. A staged run config:
  every stage, after the stages are checked (nothing compiled before)."""
  import json
  try:
    if config.stages:
      from pi_jax.train import stages
      configs = [p.config for p in stages.check(config)]
    else:
      configs = [config]
    records = []
    for i, c in enumerate(configs):
      if len(configs) > 1:
        print(f"stage {i + 1}/{len(configs)}: seq_len {c.seq_len}")
      records.append(_plan_one(c, args.topology))
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"train.py: error: {e}", file=sys.stderr)
    return 2
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(records[0] if len(records) == 1 else records, f, indent=2)
  return 0 if all(r["fits"] for r in records) else 1


def _plan_one(config, topology: str) -> dict:
  """The record of one step on `topology` (a slice, or the planner's smallest fit among
  several), printed with the levers when it does not fit."""
  from pi_jax import tpu
  from pi_jax.train import aot, plan
  names = plan.candidates(topology)
  if len(names) == 1 and topology.strip() not in ("auto",) + tuple(tpu.HBM_GIB):
    slice_ = tpu.parse_slice(names[0])
    floor = plan.floor_bytes(config, slice_.chips)
    if floor > slice_.hbm_bytes_per_chip:  # hopeless: no compile needed to know
      record = {"fits": False, "topology": names[0], "per_chip_bytes": None,
                "floor_bytes": floor, "hbm_bytes_per_chip": slice_.hbm_bytes_per_chip}
      print(f"{slice_.describe()}: DOES NOT FIT, without compiling: the state, gradients and "
            f"saved layer inputs alone are {floor / tpu.GiB:.1f} GiB per chip")
    else:
      record = aot.compile_train_step(config, names[0])
      print(aot.format_record(record))
  else:
    print(f"planner: {len(names)} candidate slices, smallest total HBM first", flush=True)
    record = plan.smallest_slice(config, names, lambda m: print(f"  {m}", flush=True))
    if record["fits"]:
      print(aot.format_record(record))
  if not record["fits"]:
    slice_ = tpu.parse_slice(record.get("topology") or names[-1])
    if len(names) > 1:
      print(f"no candidate fits (largest tried: {tpu.parse_slice(names[-1]).describe()})")
    print("levers (on paper, pi_jax.memory):")
    for line in plan.levers(config, slice_.chips, slice_.hbm_bytes_per_chip,
                            record.get("per_chip_bytes")):
      print(f"  - {line}")
  return record


if __name__ == "__main__":
  sys.exit(main())
