"""lm-eval `loglikelihood` throughput on the CPU: pi_jax's PiJaxLM vs lm-eval's own `hf` backend.

The same requests (contexts cut from pg19_standin at random lengths, continuations of 1-4 words,
as a multiple-choice task asks) go to both models, the SmolLM2 pi_jax checkpoint and its HF
export (convert.to_hf), float32, the same batch size. Each side runs once untimed (compilation,
warm caches), then the timed runs alternate pi_jax, hf, pi_jax, hf, ... so that a change in the
machine's load hits both. Requests per second per run; the log-likelihoods of the two sides are
compared as a check. Run on a quiet machine: each timed run records what else used the CPU.

  python benchmarks/harness_throughput.py --requests 256 --batch-size 8 --json out.json
  python benchmarks/harness_throughput.py --requests 8 --repeats 1 --context-words 20,40  # toy
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quiet  # noqa: E402  (benchmarks/quiet.py)


def make_requests(n: int, context_words: tuple[int, int], seed: int):
  from lm_eval.api.instance import Instance

  from pi_jax import data as data_lib
  words = " ".join(text for _, text in data_lib.iter_documents("pg19_standin", max_docs=4)).split()
  rng = random.Random(seed)
  reqs = []
  for i in range(n):
    length = rng.randint(*context_words)
    start = rng.randrange(0, len(words) - length - 5)
    ctx = " ".join(words[start:start + length])
    cont = " " + " ".join(words[start + length:start + length + rng.randint(1, 4)])
    reqs.append(Instance("loglikelihood", {}, (ctx, cont), i))
  return reqs


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--ckpt", default=None, help="pi_jax checkpoint (default: SmolLM2, fetched)")
  p.add_argument("--hf", default=None,
                 help="its HF export (default: exported by convert.to_hf into a temp folder)")
  p.add_argument("--requests", type=int, default=256, help="loglikelihood requests per run")
  p.add_argument("--batch-size", type=int, default=8, help="requests per step, both sides")
  p.add_argument("--context-words", default="50,400", help="min,max context length in words")
  p.add_argument("--max-length", type=int, default=2048, help="max_length of both models")
  p.add_argument("--repeats", type=int, default=3, help="timed runs per side (interleaved)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the results here")
  args = p.parse_args(argv)
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import torch
  from lm_eval.models.huggingface import HFLM

  from convert import fetch, to_hf
  from pi_jax import files
  from pi_jax.evals import harness, report
  start_state = quiet.machine_state()
  ckpt = args.ckpt or fetch.smollm2_checkpoint()
  tmp = None
  hf_path = args.hf
  if hf_path is None:
    tmp = tempfile.TemporaryDirectory()
    print("exporting the checkpoint to HF format ...", file=sys.stderr, flush=True)
    hf_path = to_hf.export(ckpt, os.path.join(tmp.name, "hf"))
  lo, hi = (int(x) for x in args.context_words.split(","))
  reqs = make_requests(args.requests, (lo, hi), args.seed)
  sides = {
      "pi_jax": harness.PiJaxLM(ckpt, max_length=args.max_length, batch_size=args.batch_size,
                                progress=False),
      "hf": HFLM(pretrained=hf_path, device="cpu", dtype="float32", batch_size=args.batch_size,
                 max_length=args.max_length),
  }
  outputs, rows = {}, []
  for name, lm in sides.items():  # untimed: compilation and warm caches
    t0 = time.perf_counter()
    outputs[name] = lm.loglikelihood(reqs)
    print(f"{name}: warm-up {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  for r in range(args.repeats):
    for name, lm in sides.items():
      with quiet.Watch() as watch:
        lm.loglikelihood(reqs)
      rows.append({"side": name, "repeat": r, "seconds": round(watch.seconds, 3),
                   "requests_per_second": round(len(reqs) / watch.seconds, 3), **watch.record()})
      print(f"{name} run {r}: {rows[-1]['requests_per_second']} requests/s"
            f"{' (NOISY)' if watch.noisy else ''}", file=sys.stderr, flush=True)
  ours = np.array([x[0] for x in outputs["pi_jax"]])
  theirs = np.array([x[0] for x in outputs["hf"]])
  rel = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
  best = {s: max(r["requests_per_second"] for r in rows if r["side"] == s) for s in sides}
  result = {
      **report.run_info(sys.argv[1:] if argv is None else argv,
                        prog="benchmarks/harness_throughput.py"),
      "what": "lm-eval loglikelihood requests per second, pi_jax (PiJaxLM) vs lm-eval's hf "
              "backend, float32 CPU, timed runs interleaved",
      "settings": {"ckpt": files.portable(ckpt), "requests": len(reqs),
                   "batch_size": args.batch_size, "context_words": [lo, hi],
                   "max_length": args.max_length, "repeats": args.repeats,
                   "torch_threads": torch.get_num_threads()},
      "best_requests_per_second": best,
      "speedup_pi_jax_over_hf": round(best["pi_jax"] / best["hf"], 3),
      "max_rel_diff_loglikelihood": rel,
      "compiled_programs_pi_jax": len(sides["pi_jax"].compiled_shapes),
      "machine_before": start_state, "machine_after": quiet.machine_state(), "rows": rows,
  }
  print(f"best: pi_jax {best['pi_jax']} vs hf {best['hf']} requests/s "
        f"(x{result['speedup_pi_jax_over_hf']}); log-likelihoods agree to {rel:.1e} relative")
  if args.json:
    files.write_json(args.json, result, indent=2)
  if tmp is not None:
    tmp.cleanup()
  return 0


if __name__ == "__main__":
  sys.exit(main())
