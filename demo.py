"""The paper in miniature, on a CPU: `python demo.py` (or `make demo`) -> runs/demo/report.md.

The miniature (miniature/): a small token-level LLaMA pre-trained by this project at a 256-token
window (assets/mini_base, `python demo.py pretrain`) is extended by Position Interpolation and by
direct fine-tuning, and both are measured as the paper measures them: sliding-window perplexity
by window (Table 1), perplexity and passkey k_max by fine-tuning step (Tables 3 and 4), quality
inside the original window, and the paper's three findings checked one by one.

  python demo.py            PI and direct fine-tuning at 4x, 200 steps (about 15 minutes)
  python demo.py --full     every arm (PI, direct, NTK, YaRN, zero shot, a keep-training
                            control), 4x and 8x, checkpoints 50-400 (hours; resumable) into
                            runs/miniature, published to results/miniature
  python demo.py --real     the paper on a real model: SmolLM2-135M 8192 -> 32768 by PI and
                            direct fine-tuning (one GPU; --reduced: 16384 on a CPU in hours,
                            --smoke: toy sizes), runs/real_SIZE (miniature/real.py)
  python demo.py pretrain   the base model itself (about an hour)
  python demo.py table6     Table 6 in miniature: a summarization fine-tune with PI, then
                            generation + ROUGE (miniature/table6.py), runs/table6

Every number comes from `train.py` / `eval.py` commands this script runs (each is logged with
its wall and CPU time under OUT/logs/ and listed in the report); nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from miniature import demo_report, experiment
from miniature.runner import REPO


def _ints(text: str, low: int = 2) -> tuple[int, ...]:
  try:
    values = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"{text!r}: expected comma-separated integers, e.g. 4096,8192") from None
  if not values or min(values) < low:
    raise ValueError(f"{text!r}: expected comma-separated integers >= {low}")
  return values



def pretrain(argv: list[str]) -> int:
  """`python demo.py pretrain`: the BPE tokenizer, then the base model (configs/mini_pretrain.py).

  Rerunning resumes the pre-training from its last checkpoint (the tokenizer is kept).
  """
  p = argparse.ArgumentParser(prog="demo.py pretrain", description=pretrain.__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/mini_pretrain", help="run folder (default %(default)s)")
  p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (default %(default)s)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra train.py overrides")
  p.add_argument("--publish", default="assets/mini_base",
                 help="copy the final model here with its loss curve ('' to skip)")
  args = p.parse_args(argv)
  from miniature import pretrain as pretrain_lib
  return pretrain_lib.pretrain(args.workdir, args.vocab, args.set, args.publish)


def table6(argv: list[str]) -> int:
  """`python demo.py table6`: the paper's Table 6 pipeline in miniature (miniature/table6.py).

  Rerunning resumes: outputs that exist are kept.
  """
  p = argparse.ArgumentParser(prog="demo.py table6", description=table6.__doc__.splitlines()[0])
  p.add_argument("--out", default="runs/table6", help="output folder (default %(default)s)")
  p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per arm "
                 "(default %(default)s)")
  p.add_argument("--batch", type=int, default=4, help="rows per step (default %(default)s)")
  args = p.parse_args(argv)
  if args.steps < 1 or args.batch < 1:
    p.error("--steps and --batch must be positive")
  from miniature import table6 as table6_lib
  return table6_lib.run(args.out, args.steps, args.batch, argv)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ["pretrain"]:
    return pretrain(argv[1:])
  if argv[:1] == ["table6"]:
    return table6(argv[1:])
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", default=None,
                 help="output folder (default runs/demo; runs/miniature with --full; "
                      "runs/real_SIZE with --real)")
  p.add_argument("--full", action="store_true",
                 help="every arm, factor and checkpoint (hours; resumable); publishes to "
                      "results/miniature")
  p.add_argument("--quick", action="store_true", help="absurdly small settings (smoke test)")
  p.add_argument("--steps", default=None, metavar="S,S,...",
                 help="fine-tuning checkpoints to evaluate (default 100,200; --full 50,...,400)")
  p.add_argument("--base", default=None, help="the short-window base model (assets/mini_base)")
  p.add_argument("--ft-episodes", type=float, default=None, metavar="FRACTION",
                 help="ablation, not the paper's recipe: this share of fine-tuning rows are "
                      "passkey episodes at the new window (default 0: plain text)")
  real = p.add_argument_group(
      "the real model (miniature/real.py): SmolLM2-135M extended by PI and direct fine-tuning")
  real.add_argument("--real", action="store_true",
                    help="run the real-model experiment instead of the miniature: 8192 -> 32768 "
                         "(one H100-class GPU, ~8 minutes); with --reduced or --smoke a smaller "
                         "size; output runs/real_SIZE (rerun to continue)")
  real.add_argument("--reduced", action="store_true",
                    help="with --real: 8192 -> 16384 on a CPU, 10/20 steps (hours; resumable)")
  real.add_argument("--smoke", action="store_true",
                    help="with --real: the same pipeline at toy sizes on the miniature's base "
                         "(the test suite; about 2 minutes)")
  real.add_argument("--lr", type=float, default=None,
                    help="with --real: fine-tuning learning rate (default: the plan's, 5e-5)")
  real.add_argument("--estimate", action="store_true",
                    help="with --real: print the FLOP count and expected time, run nothing")
  args = p.parse_args(argv)
  if (args.reduced or args.smoke or args.lr is not None or args.estimate) and not args.real:
    p.error("--reduced, --smoke, --lr and --estimate go with --real")
  if args.real:
    if args.reduced and args.smoke:
      p.error("--reduced and --smoke are two sizes: pick one")
    if args.quick or args.steps or args.base or args.ft_episodes is not None:
      p.error("--quick, --steps, --base and --ft-episodes are the miniature's: not with --real")
    from miniature import real as real_lib
    size = "smoke" if args.smoke else "reduced" if args.reduced else "full"
    return real_lib.main(argv, size, args.out, args.lr, args.estimate)
  plan = experiment.FULL if args.full else experiment.QUICK if args.quick else experiment.DEMO
  try:
    if args.steps:
      plan = dataclasses.replace(plan, steps=_ints(args.steps, low=1))
    if args.base:
      plan = dataclasses.replace(plan, base=args.base)
    if args.ft_episodes is not None:
      plan = dataclasses.replace(plan, ft_passkey_fraction=args.ft_episodes)
  except ValueError as e:
    p.error(str(e))
  os.chdir(REPO)  # every path below is relative to the repository (no machine paths in results)
  out = args.out or ("runs/miniature" if args.full else "runs/demo")
  return demo_report.run_demo(plan, out, argv, full=args.full, quick=args.quick)

if __name__ == "__main__":
  sys.exit(main())
