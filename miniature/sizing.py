"""How much a RealPlan computes, and how long that should take on the device at hand.

FLOPs = 2 x the matrices of the forward per token plus QK^T and PV over the causal half; x3 for
a training step (x4 with remat); summed over every window, step and passkey prompt of a plan.
Time = FLOPs / (peak x an assumed utilisation) + a per-command start, load and compile time.
"""

from __future__ import annotations

import os
import subprocess
import sys

from miniature.runner import REPO


# Peak dense FLOP/s per device at the compute dtype the plan trains in (bf16 on accelerators;
# the CPU row is what this project's native float32 kernels measured on 2 cores: a 16K SmolLM2
# forward of 13.7 TFLOP in ~68 s, i.e. ~100 GFLOP/s per core), and the share of it we assume.
DEVICES = {
    "NVIDIA H100": (989e12, 0.35), "NVIDIA H200": (989e12, 0.35), "NVIDIA A100": (312e12, 0.4),
    "TPU v5p": (459e12, 0.4), "TPU v5 lite": (197e12, 0.4), "TPU v4": (275e12, 0.4),
    "cpu": (100e9, 1.0),  # per core, measured (see above)
}
# Start, load and compile per command (assumed, not measured on an accelerator: a GPU command
# reads its compiled programs from the persistent compilation cache after the first).
PROCESS_S = {"gpu": 12.0, "tpu": 20.0, "cpu": 25.0}


def forward_flops(cfg: dict, length: int) -> float:
  """FLOPs of one causal forward over `length` tokens: 2 x params in matmuls (the tied
  embedding counts once, as the output projection) + QK^T and PV over the causal half."""
  d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
  q = cfg["num_heads"] * cfg["head_dim"]
  kv = cfg["num_kv_heads"] * cfg["head_dim"]
  per_layer = d * q * 2 + d * kv * 2 + 3 * d * f
  matmul = n * per_layer + cfg["vocab_size"] * d
  return 2.0 * matmul * length + 2.0 * n * q * length * length


def _windows_flops(cfg: dict, tokens: int, window: int, stride: int) -> float:
  count = 1 + max(0, -(-(tokens - window) // stride))
  return count * forward_flops(cfg, min(window, tokens))


def sizing(plan, cfg: dict) -> dict:
  """FLOPs of every part of the plan (what `--real` prints before it starts)."""
  L = cfg["max_position_embeddings"]
  W = L * plan.factor
  T = W + 1  # tokens per held-out document
  docs = len(plan.heldout)
  train_mult = 4.0 if plan.remat == "full" else 3.0  # forward + backward (+ recomputation)
  steps = max(plan.steps)
  table1 = docs * sum(_windows_flops(cfg, T, w, plan.stride) for w in plan.windows)
  table3 = docs * (forward_flops(cfg, W) + _windows_flops(cfg, T, L, plan.stride))
  passkey = plan.passkey_depths * plan.passkey_trials * forward_flops(cfg, W)
  parts = {
      "base check": forward_flops(cfg, 4096 if plan.base == "smollm2" else L)
      + 2 * forward_flops(cfg, 4096 if plan.base == "smollm2" else L),
      "fine-tuning (2 arms)": 2 * steps * plan.batch * train_mult * forward_flops(cfg, W),
      "Table 1 (4 models)": 4 * table1,
      "Table 3 (intermediate steps)": 2 * (len(plan.steps) - 1) * table3,
      "Table 4 passkey": (2 + 2 * len(plan.steps)) * passkey,
  }
  # (fetch) + base check (2) + the base's perplexity and passkey + 3 per arm and checkpoint
  commands = (plan.base == "smollm2") + 2 + 2 + 2 * len(plan.steps) * 3
  return {"flops": parts, "total": sum(parts.values()), "commands": commands}


def device_kind() -> tuple[str, str, int]:
  """(platform, device kind, count) as JAX sees them, asked in a child process so that this
  one never takes the accelerator's memory from the commands it runs."""
  code = "import jax; d = jax.devices(); print(d[0].platform, len(d), d[0].device_kind)"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  if proc.returncode != 0:
    raise RuntimeError(f"JAX could not list its devices: {proc.stderr.strip()[-500:]}")
  platform, count, kind = proc.stdout.strip().splitlines()[-1].split(" ", 2)
  return platform, kind, int(count)


def estimate(plan, cfg: dict, platform: str, kind: str) -> tuple[list[str], float]:
  """The printed table: FLOPs per part and the expected time on this device."""
  size = sizing(plan, cfg)
  if platform == "cpu":
    peak, mfu = DEVICES["cpu"][0] * (os.cpu_count() or 1), 1.0
    name = f"cpu ({os.cpu_count()} cores, measured ~100 GFLOP/s per core)"
  else:
    match = next((k for k in DEVICES if kind.startswith(k)), None)
    peak, mfu = DEVICES.get(match, (989e12, 0.35))
    name = kind + ("" if match else " (unknown: assuming H100 numbers)")
  rate = peak * mfu
  overhead = size["commands"] * PROCESS_S.get(platform, 25.0)
  lines = [f"Sizing of `--{plan.name}` on {name}: peak {peak / 1e12:.3g} TFLOP/s x assumed "
           f"utilisation {mfu:.0%} = {rate / 1e12:.3g} TFLOP/s (an estimate from the FLOP "
           "count, not a measurement; the commands' own times are listed at the end)", "",
           "| part | FLOPs | expected s |", "|---|---|---|"]
  for part, flops in size["flops"].items():
    lines.append(f"| {part} | {flops:.3g} | {flops / rate:.0f} |")
  lines.append(f"| start, load, compile: {size['commands']} commands x "
               f"{PROCESS_S.get(platform, 25.0):.0f} s (assumed) | – | {overhead:.0f} |")
  total = size["total"] / rate + overhead
  lines.append(f"| **total** | {size['total']:.3g} | **{total:.0f}** ({total / 60:.1f} min) |")
  return lines, total
