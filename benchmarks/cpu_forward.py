"""pi_jax vs transformers on CPU: forward + next-token NLL of one long window, SmolLM2-135M, fp32.

  python -m benchmarks.cpu_forward --lengths 2048,8192,16384 --repeats 3 --json runs/cpu_forward.json
  python -m benchmarks.cpu_forward --lengths 32768 --sides jax          # the 32K memory check
  python -m benchmarks.cpu_forward --lengths 8192 --task logits          # plain forward, full logits

Each side runs in its own subprocess (so their peak RSS do not mix) and is warmed first (pi_jax:
compiled; the compile time is reported separately). Then the parent asks them for one timed run
at a time, alternating which side goes first (A B B A A B ...), so load from other processes on a
shared machine hits both sides alike; the table shows medians. Both sides score the same random
tokens with the same weights (the real SmolLM2-135M-Instruct when `convert.fetch` has it, else
random weights of the exact shape: timing does not depend on the weights), and the mean NLLs are
printed side by side as a check that they computed the same thing.

--task nll (default): transformers runs `model(ids, labels=ids)` with attn_implementation="sdpa"
(the full float32 logits exist there: 6.4 GB at 32K); pi_jax runs `loss.mean_loss` (blockwise
attention, chunked logits). --task logits: both return the full [1, L, V] float32 logits
(transformers `model(ids).logits`, pi_jax `model.forward`), and the check is the mean of the
logits' log-sum-exp instead of the NLL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import common, quiet
from pi_jax.loss import DEFAULT_CHUNK


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _real_weights_available() -> bool:
  try:
    from convert import fetch
    from pi_jax.checkpoint import is_checkpoint
  except ImportError:
    return False
  return (is_checkpoint(os.path.join(fetch.cache_dir(), fetch.CKPT_NAME))
          and os.path.isfile(os.path.join(fetch.cache_dir(), fetch.GGUF_NAME)))


def _jax_side(length: int, weights: str, block_size: int | None, chunk: int, impl: str,
              task: str):
  import jax
  import jax.numpy as jnp
  from pi_jax import loss as loss_lib
  from pi_jax import model as model_lib
  from pi_jax.run import RunOptions
  options = RunOptions(attention_impl=impl, attention_block_size=block_size)
  if weights == "real":
    from convert import fetch
    from pi_jax.checkpoint import load_checkpoint
    config, params = load_checkpoint(fetch.smollm2_checkpoint())
  else:
    config = common.smollm2_config()
    params = jax.jit(model_lib.init_params, static_argnums=0)(config, jax.random.key(0))
  tokens = jnp.asarray(common.tokens(length, config.vocab_size))
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.ones_like(tokens).at[:, -1].set(0)  # the last position has no target

  def fwd(params, tokens, targets, mask):
    if task == "logits":
      logits = model_lib.forward(config, params, tokens, run=options)
      return logits, jnp.mean(jax.nn.logsumexp(logits, axis=-1))
    return loss_lib.mean_loss(config, params, tokens, targets, mask, chunk=chunk,
                              run=options)[0]

  start = time.perf_counter()
  compiled = jax.jit(fwd).lower(params, tokens, targets, mask).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  memory = {"compiled_temp_mb": mem.temp_size_in_bytes / 2**20,
            "compiled_argument_mb": mem.argument_size_in_bytes / 2**20}
  if task == "logits":
    def run():
      logits, check = compiled(params, tokens, targets, mask)
      logits.block_until_ready()
      return float(check)
  else:
    run = lambda: float(compiled(params, tokens, targets, mask))
  return run, compile_s, memory


def _torch_side(length: int, weights: str, task: str):
  import torch
  import transformers
  if weights == "real":
    from convert import fetch
    path = fetch.smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="sdpa")
  else:
    cfg = transformers.LlamaConfig(**common.smollm2_config().to_hf())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa",
                                                       dtype=torch.float32)
  model.eval()
  ids = torch.from_numpy(common.tokens(length, model.config.vocab_size).astype(np.int64))

  def run():
    with torch.inference_mode():
      if task == "logits":
        return float(torch.logsumexp(model(input_ids=ids).logits, dim=-1).mean())
      return float(model(input_ids=ids, labels=ids).loss)
  return run, 0.0, {}


def worker(side: str, length: int, weights: str, block_size: int | None, chunk: int,
           warmup: int, impl: str = "auto", task: str = "nll") -> None:
  """Line protocol on stdin/stdout: prints a 'ready' record, then one record per 'run'."""
  if side == "jax":
    run, compile_s, memory = _jax_side(length, weights, block_size, chunk, impl, task)
  else:
    run, compile_s, memory = _torch_side(length, weights, task)
  start, nll = time.perf_counter(), None
  for _ in range(warmup):  # pi_jax is already compiled; torch allocates and picks kernels
    nll = run()
  warm_s = time.perf_counter() - start
  print(json.dumps({"ready": True, "compile_s": compile_s, "warmup_s": warm_s, "nll": nll,
                    "rss_after_setup_mb": _peak_rss_mb(), **memory}), flush=True)
  for line in sys.stdin:
    if line.strip() != "run":
      break
    start = time.perf_counter()
    nll = run()
    print(json.dumps({"seconds": time.perf_counter() - start, "nll": nll}), flush=True)
  print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)


class Worker:

  def __init__(self, side, args, length):
    cmd = [sys.executable, "-m", "benchmarks.cpu_forward", "--worker", side, "--lengths", str(length),
           "--weights", args.weights, "--chunk", str(args.chunk), "--warmup", str(args.warmup),
           "--impl", args.impl, "--task", args.task]
    if args.block_size is not None:
      cmd += ["--block-size", str(args.block_size)]
    self.side = side
    # A CPU benchmark: JAX should not start a TPU runtime that happens to be installed
    # (jax[tpu] is in requirements-dev.txt for the compile-only tests).
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=common.REPO)
    self.ready = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"{self.side} worker died (exit {self.proc.wait()}); see its stderr above")
    return json.loads(line)

  def run(self):
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    self.proc.stdin.write("quit\n")
    self.proc.stdin.flush()
    rss = self._read()["peak_rss_mb"]
    self.proc.wait()
    return rss


def bench_length(args, length):
  sides = [s for s in args.sides.split(",") if s != "torch" or length <= args.torch_max_length]
  workers = {}
  for side in sides:  # set up one at a time so start-up work does not overlap
    print(f"[{length}] starting {side} ...", file=sys.stderr, flush=True)
    workers[side] = Worker(side, args, length)
  times = {s: [] for s in sides}
  nlls = {s: workers[s].ready["nll"] for s in sides}
  watches = {s: [] for s in sides}
  for r in range(args.repeats):
    order = sides if r % 2 == 0 else sides[::-1]
    for side in order:
      with quiet.Watch() as watch:
        rec = workers[side].run()
      times[side].append(rec["seconds"])
      watches[side].append(watch.record())
      nlls[side] = rec["nll"]
      print(f"[{length}] {side} run {r + 1}: {rec['seconds']:.2f}s (load before "
            f"{watch.load_before:.2f}, others {watch.others_cores:.2f} cores"
            f"{', NOISY' if watch.noisy else ''})", file=sys.stderr, flush=True)
  row = {"length": length, "repeats": args.repeats}
  for side in sides:
    row[side] = {**workers[side].ready, "times_s": times[side], "nll": nlls[side],
                 "median_s": statistics.median(times[side]) if times[side] else None,
                 "peak_rss_mb": workers[side].close(), "machine": watches[side]}
    row[side].pop("ready")
  row["noisy"] = any(w["noisy"] for ws in watches.values() for w in ws)
  if args.repeats and "jax" in row and "torch" in row:
    row["speedup"] = row["torch"]["median_s"] / row["jax"]["median_s"]
  return row


def _fmt(row, side, key, fmt):
  value = row.get(side, {}).get(key)
  return "–" if value is None else format(value, fmt)


def markdown(rows, weights, task="nll"):
  what = ("forward + next-token NLL" if task == "nll" else "plain forward, full logits")
  check = "NLL" if task == "nll" else "mean log-sum-exp of the logits"
  lines = [f"SmolLM2-135M shape, {what}, float32, batch 1, {weights} weights; median of the "
           "repeats. "
           "'noisy': other processes used more than "
           f"{quiet.NOISY_CORES} cores during a timed run, or the load average was above "
           f"{quiet.NOISY_LOAD} when the benchmark started and before the run: not a result "
           "(the benchmark's own runs keep the load above 1 between runs).", "",
           "| length | pi_jax s | transformers s | speedup | pi_jax compile s | pi_jax peak RSS MB"
           f" | transformers peak RSS MB | pi_jax compiled temp MB | {check} pi_jax / transformers"
           " | repeats | machine |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    speed = f"{row['speedup']:.2f}×" if "speedup" in row else "–"
    loads = [w["load_before"] for s in ("jax", "torch") for w in row.get(s, {}).get("machine", [])]
    machine = ("**noisy**" if row.get("noisy") else "quiet") + (
        f" (load before {min(loads):.2f}–{max(loads):.2f})" if loads else "")
    lines.append(
        f"| {row['length']} | {_fmt(row, 'jax', 'median_s', '.2f')} | "
        f"{_fmt(row, 'torch', 'median_s', '.2f')} | {speed} | {_fmt(row, 'jax', 'compile_s', '.1f')} | "
        f"{_fmt(row, 'jax', 'peak_rss_mb', '.0f')} | {_fmt(row, 'torch', 'peak_rss_mb', '.0f')} | "
        f"{_fmt(row, 'jax', 'compiled_temp_mb', '.0f')} | {_fmt(row, 'jax', 'nll', '.4f')} / "
        f"{_fmt(row, 'torch', 'nll', '.4f')} | {row['repeats']} | {machine} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="2048,8192,16384,32768",
                 help="comma-separated window lengths (default: %(default)s)")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed runs per side and length (0: only set up, compile and warm up)")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
  p.add_argument("--sides", default="jax,torch", help="jax, torch, or both (default)")
  p.add_argument("--torch-max-length", type=int, default=16384,
                 help="skip transformers above this length (its float32 logits alone are "
                      "L × 49152 × 4 bytes: 6.4 GB at 32K) (default: %(default)s)")
  p.add_argument("--weights", choices=("auto", "real", "random"), default="auto",
                 help="real SmolLM2 weights (needs `python -m convert.fetch smollm2`), random "
                      "weights of the same shape, or auto: real when cached")
  p.add_argument("--block-size", type=int, default=None,
                 help="pi_jax attention block size (default: the implementation's own, "
                      "pi_jax.dispatch: 256 for cpu_flash and for xla_blockwise on "
                      "the CPU)")
  p.add_argument("--impl", default="auto",
                 help="pi_jax attention_impl: auto (what a user gets: cpu_flash where the native "
                      "kernels build), cpu_flash, xla_blockwise or reference (default: "
                      "%(default)s; docs/performance.md names the variants tried)")
  p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                 help="pi_jax loss chunk (positions; default pi_jax.loss.DEFAULT_CHUNK, "
                      "%(default)s; 128-256 used less CPU than 1024 here, docs/performance.md)")
  p.add_argument("--task", choices=("nll", "logits"), default="nll",
                 help="what one run computes: forward + next-token NLL (chunked logits on the "
                      "pi_jax side), or a plain forward returning the full logits")
  p.add_argument("--json", default=None, help="write the results here as JSON")
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.weights == "auto":
    args.weights = "real" if _real_weights_available() else "random"
  lengths = [int(x) for x in args.lengths.split(",")]
  if args.worker:
    worker(args.worker, lengths[0], args.weights, args.block_size, args.chunk, args.warmup,
           args.impl, args.task)
    return 0
  bad = set(args.sides.split(",")) - {"jax", "torch"}
  if bad:
    p.error(f"--sides: unknown {sorted(bad)}; use jax and/or torch")
  start_state = quiet.machine_state()
  print(f"machine before: {start_state}", file=sys.stderr, flush=True)
  rows = []
  for length in lengths:
    rows.append(bench_length(args, length))
    print(markdown(rows[-1:], args.weights, args.task), flush=True)
  print()
  print(markdown(rows, args.weights, args.task))
  if args.json:
    from pi_jax import files
    files.write_json(args.json, {
        "command": "python -m benchmarks.cpu_forward " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "weights": args.weights, "task": args.task, "impl": args.impl,
        "block_size": args.block_size,
        "chunk": args.chunk,
        "cpu_count": os.cpu_count(), "machine_before": start_state,
        "machine_after": quiet.machine_state(), "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
