"""The compile-only planner: the smallest TPU slice a run fits, and what would make it fit.

`smallest_slice(config)` walks candidate slices by total HBM and compiles the real train step
(pi_jax.train.aot) until one fits; a slice whose floor (pi_jax.memory.train_floor_bytes: state,
gradients and saved layer inputs, which no compiler can avoid) is over its HBM is skipped in
milliseconds, without compiling. `levers(config, ...)` says, on paper, which setting would bring
a step that does not fit under a chip's HBM. train.py --compile-only --topology auto uses both;
benchmarks/tpu_capacity.py builds the committed capacity table with `smallest_slice`.
"""

from __future__ import annotations

import time

from pi_jax import memory, tpu
from pi_jax import model as model_lib
from pi_jax.train import setup
from pi_jax.train.config import TrainConfig

GiB = tpu.GiB
# The candidates, small to large (v5e and v6e by chips, v4 and v5p by TensorCores).
SLICES = ("v5e-4", "v5e-8", "v5e-16", "v6e-8", "v4-16", "v5e-32", "v6e-16", "v4-32", "v5p-16",
          "v5e-64", "v6e-32", "v4-64", "v5p-32", "v5e-128", "v6e-64", "v4-128", "v5p-64",
          "v5e-256", "v6e-128", "v4-256", "v5p-128", "v6e-256", "v5p-256", "v5p-512")


def slice_hbm(name: str) -> int:
  """Total HBM of a slice (bytes): the order in which the planner tries them."""
  s = tpu.parse_slice(name)
  return s.chips * s.hbm_bytes_per_chip


def floor_bytes(config: TrainConfig, chips: int) -> int:
  """pi_jax.memory.train_floor_bytes of the run's model on `chips` chips."""
  model, _ = setup.abstract_model_config(config)
  return memory.train_floor_bytes(model, config.run, config.seq_len, chips)


def candidates(spec: str) -> list[str]:
  """`auto` (every slice of SLICES), generations (`v5e,v5p`) or slice names, by total HBM."""
  parts = [p.strip() for p in spec.split(",") if p.strip()]
  if parts == ["auto"]:
    names = list(SLICES)
  else:
    names = []
    for p in parts:
      if p in tpu.HBM_GIB or p in ("v5", "v6", "v5litepod"):
        gen = tpu.parse_slice(f"{p}-8").generation
        names += [s for s in SLICES if tpu.parse_slice(s).generation == gen]
      else:
        tpu.parse_slice(p)  # a clear error for a bad name
        names.append(p)
  return sorted(dict.fromkeys(names), key=slice_hbm)


def smallest_slice(config: TrainConfig, slices, log=print, skip=()) -> dict:
  """The record of the first slice (by total HBM) whose compiled step fits, with "tried" (every
  compiled slice: topology, fits, per-chip bytes); {"fits": False, "tried": ...} when none does.
  `skip`: slices known not to fit (not compiled again)."""
  from pi_jax.train import aot
  tried = []
  for name in sorted(slices, key=slice_hbm):
    slice_ = tpu.parse_slice(name)
    if config.micro_batch == -1 and config.global_batch % slice_.chips:
      log(f"{name}: skipped (global_batch {config.global_batch} is not a multiple of its "
          f"{slice_.chips} chips, one sequence per chip)")
      continue
    if name in skip:
      log(f"{name}: skipped (did not fit before with the same shapes)")
      continue
    floor = floor_bytes(config, slice_.chips)
    if floor > slice_.hbm_bytes_per_chip:
      log(f"{name}: skipped without compiling (state, gradients and saved layer inputs alone are "
          f"{floor / GiB:.1f} GiB per chip, over {slice_.hbm_bytes_per_chip // GiB} GiB)")
      continue
    t0 = time.time()
    try:
      record = aot.compile_train_step(config, name)
    except ValueError as e:  # a mesh or batch that does not split over this slice
      log(f"{name}: skipped ({e})")
      continue
    per_chip = record["per_chip_bytes"]
    log(f"{name}: {'fits' if record['fits'] else 'does not fit'} "
        f"({per_chip / GiB if per_chip else float('nan'):.2f} GiB per chip, "
        f"{time.time() - t0:.0f} s)")
    tried.append({k: record[k] for k in ("topology", "fits", "per_chip_bytes")})
    if record["fits"]:
      return {**record, "tried": tried}
  return {"fits": False, "tried": tried}


def levers(config: TrainConfig, chips: int, hbm_bytes: int, per_chip_bytes: int | None) -> list[str]:
  """What would bring one chip's bytes under `hbm_bytes`, each with its saving on paper
  (pi_jax.memory's per-token model; the compiler's real figure can differ)."""
  model, _ = setup.abstract_model_config(config)
  run = config.run
  floor = memory.train_floor_bytes(model, run, config.seq_len, chips)
  per_token = memory.bytes_per_token(model, run)
  micro = chips if config.micro_batch == -1 else config.global_batch // config.accum_steps
  tokens = max(1, micro // chips) * config.seq_len  # one chip's tokens per micro-batch
  out = []
  over = (per_chip_bytes or floor) - hbm_bytes
  if over > 0:
    out.append(f"over by {over / GiB:.1f} GiB per chip")
  if run.remat == "none":
    saved = (model.num_layers - 1) * per_token["layer"] * tokens
    out.append(f"--set run.remat=full: keep only each layer's input (~{saved / GiB:.1f} GiB per "
               "chip less)")
  if run.compute_dtype == "float32":
    out.append(f"--set run.compute_dtype=bfloat16: halves activations (~"
               f"{per_token['total'] * tokens / 2 / GiB:.1f} GiB per chip less)")
  if (run.param_dtype or "float32") == "float32":
    params = model_lib.count_params(model)
    out.append(f"--set run.param_dtype=bfloat16: parameters in 2 bytes (~"
               f"{params * 2 / chips / GiB:.2f} GiB per chip less)")
  if config.micro_batch != -1 and micro > chips:
    out.append("--set micro_batch=-1: one sequence per chip per micro-batch, the rest of the "
               "global batch by accumulation")
  need = next((n for n in (2 ** k for k in range(2, 13))
               if memory.train_floor_bytes(model, run, config.seq_len, n) <= hbm_bytes), None)
  if need and need > chips:
    out.append(f"more chips: the floor (state, gradients, saved layer inputs) fits from {need} "
               "chips of this generation (--topology auto searches)")
  if config.seq_len >= 32768 and "sequence" not in (config.mesh or ""):
    out.append("a sequence axis (--set mesh=fsdp:N,sequence:S): ring attention splits each "
               "sequence's activations over S chips")
  return out

