"""Will it fit? Every memory estimate and check of pi_jax, in one place.

- `free_device_memory`: what one device has free (the host's available memory on the CPU).
- `check_state_fits`: a train state's per-device bytes (parameters, AdamW moments, float32
  gradients) against that, before anything is allocated.
- `check_eval_fits`: a lower bound for an evaluation at some lengths (parameters, activations,
  KV cache), before a checkpoint is read.
- `check_compiled_fits`: XLA's own estimate of a compiled call (memory_analysis), before it runs.
- `bytes_per_token`, `train_floor_bytes`: the analytic model of a train step's memory that the
  compile-only planner uses (docs/tpu.md): what a token costs, and a floor under a slice's bytes
  per chip below which compiling is pointless.
"""

from __future__ import annotations

import jax
import numpy as np

from pi_jax import model as model_lib
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions

# Leave room for the allocator, the parameters' own growth and the host process.
MEMORY_HEADROOM = 0.9
GiB = 2**30


def _itemsize(dtype: str) -> int:
  return np.dtype(jax.numpy.dtype(dtype)).itemsize


def free_device_memory() -> tuple[int | None, str]:
  """(bytes free on one device, its name); on CPU the host's available memory."""
  device = jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement it
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), device.device_kind
  if device.platform == "cpu":
    import psutil
    return int(psutil.virtual_memory().available), "CPU host memory"
  return None, device.device_kind


def state_bytes_per_device(abstract: dict, shardings: dict) -> int:
  """Bytes of one device's shard of the train state, plus float32 gradients of the parameters."""
  def shard_bytes(a, s, itemsize=None):
    return int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * (itemsize or a.dtype.itemsize)
  state = sum(jax.tree.leaves(jax.tree.map(shard_bytes, abstract, shardings)))
  grads = sum(jax.tree.leaves(jax.tree.map(lambda a, s: shard_bytes(a, s, 4),
                                           abstract["params"], shardings["params"])))
  return state + grads


def check_state_fits(abstract: dict, shardings: dict) -> None:
  """Refuses, before allocating anything, a train state that cannot fit in device memory."""
  free, name = free_device_memory()
  need = state_bytes_per_device(abstract, shardings)
  if free is not None and need > MEMORY_HEADROOM * free:
    raise ValueError(
        f"the train state (parameters, optimizer moments, gradients) needs {need / GiB:.1f} "
        f"GiB per device before any activation, but {name} has {free / GiB:.1f} GiB free; "
        "shard it over more devices (--set mesh=fsdp:N), use a smaller model, or "
        "--set run.param_dtype=bfloat16")


def eval_bytes(config: ModelConfig, param_dtype: str, compute_dtype: str, length: int,
               batch: int, kv_cache: bool) -> int:
  """A lower bound for one evaluation call: parameters + one layer's activations (+ KV cache)."""
  act = _itemsize(compute_dtype)
  need = model_lib.count_params(config) * _itemsize(param_dtype)
  need += batch * length * (2 * config.hidden_size + config.intermediate_size) * act
  if kv_cache:
    need += 2 * config.num_layers * batch * length * config.num_kv_heads * config.head_dim * act
  return need


def check_eval_fits(config: ModelConfig, param_dtype: str, compute_dtype: str,
                    lengths: list[int], batch: int, what: str, kv_cache: bool) -> None:
  """Refuses lengths whose parameters + activations (+ KV cache) cannot fit in the memory there
  is, before anything is loaded (a rough lower bound: the exact XLA estimate comes later)."""
  free, name = free_device_memory()
  if free is None:
    return
  for length in lengths:
    need = eval_bytes(config, param_dtype, compute_dtype, length, batch, kv_cache)
    if need > MEMORY_HEADROOM * free:
      raise MemoryError(
          f"{what} {length}: needs at least {need / GiB:.1f} GiB (parameters, activations"
          f"{', KV cache' if kv_cache else ''}) but {name} has {free / GiB:.1f} GiB free; "
          "use shorter lengths")


def check_compiled_fits(compiled, what: str, hint: str) -> int | None:
  """XLA's per-device estimate of the scratch + output memory a compiled call needs.

  Parameters already on the device are not counted again. Raises MemoryError before the call
  runs when the estimate is above what the device has free.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:
    stats = None
  if stats is None:
    return None
  need = int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  free, name = free_device_memory()
  if free is not None and need > MEMORY_HEADROOM * free:
    raise MemoryError(
        f"{what} needs about {need / GiB:.2f} GiB of activation memory per device (XLA's "
        f"estimate) but {name} has {free / GiB:.2f} GiB free; {hint}")
  return need


def bytes_per_token(model: ModelConfig, run: RunOptions) -> dict:
  """What one token of one sequence costs the train step, on paper (bytes; see docs/tpu.md).

  - residual: the layer input saved at each of the Y layer boundaries under remat (compute
    dtype): Y·c·D. Everything else inside a layer is recomputed in the backward pass.
  - layer: the working set of one layer's recompute + backward, alive for one layer at a time:
    its activations in the compute dtype (normed inputs, q, k, v, attention output, gate, up,
    SiLU product and their cotangents) plus the float32 pieces of flash attention's backward
    (output, its cotangent and dq, dk, dv): c·(4D + 4NH + 4KH + 6F) + 4·(3NH + 2KH).
  The loss's float32 logits are per chunk, not per token (a constant, loss_chunk·V·4·3).
  """
  c = _itemsize(run.compute_dtype)
  d, f = model.hidden_size, model.intermediate_size
  nh, kh = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
  residual = model.num_layers * c * d
  layer = c * (4 * d + 4 * nh + 4 * kh + 6 * f) + 4 * (3 * nh + 2 * kh)
  return {"residual": residual, "layer": layer, "total": residual + layer,
          "per_layer": (residual + layer) / model.num_layers}


def train_floor_bytes(model: ModelConfig, run: RunOptions, seq_len: int, chips: int) -> int:
  """A floor under a train step's bytes per chip, whatever the compiler does: the parameters,
  AdamW's two float32 moments and the float32 gradients spread evenly over every chip, plus
  (unless remat offloads them or there is no remat) the layer inputs remat keeps for the
  backward pass, one sequence per chip. A slice whose HBM is below it is not compiled."""
  param_bytes = _itemsize(run.param_dtype or "float32")
  state = model_lib.count_params(model) * (param_bytes + 12) // chips
  residuals = 0
  if run.remat not in ("offload", "none"):
    residuals = model.num_layers * model.hidden_size * seq_len * _itemsize(run.compute_dtype)
  return state + residuals
