"""Compile-only (ahead-of-time) runs: the real train step, compiled for a TPU slice on any host.

`compile_train_step(config, "v5p-64")` builds the step exactly as `Trainer` does (make_train_step,
step_specs' state and batch shardings, the mesh spec, remat, attention) over abstract state
(ShapeDtypeStructs: no parameter is read or allocated), compiles it with the TPU compiler for the
slice's compile-only devices and returns a record: per-chip argument / output / temporary bytes
from `memory_analysis()`, the chip's HBM, whether it fits, the step's model FLOPs and the compile
time. train.py --compile-only and eval.py perplexity --compile-only print it.
"""

from __future__ import annotations

import re
import time

import jax

from pi_jax import dispatch, files
from pi_jax import sharding as sharding_lib
from pi_jax import tpu
from pi_jax.evals import runtime
from pi_jax.run import RunOptions
from pi_jax.train import metrics as metrics_lib
from pi_jax.train import setup
from pi_jax.train import step as step_lib
from pi_jax.train.config import TrainConfig

GiB = tpu.GiB


def memory_record(compiled, hbm_bytes: int) -> dict:
  """Per-chip bytes of a compiled executable (XLA's memory_analysis) against the chip's HBM.

  total = arguments + outputs − outputs aliased to donated arguments + temporaries (+ code).
  peak_live_bytes: the most bytes the program's buffers hold at any one point of its schedule
  (XLA's peak, in all memory spaces); the temporaries are what its heap reserves, which also
  depends on how XLA packs the buffers.
  """
  m = compiled.memory_analysis()
  args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
  temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
  total = args + out - alias + temp + code
  host = m.host_temp_size_in_bytes + m.host_argument_size_in_bytes + m.host_output_size_in_bytes
  return {
      "fits": bool(total <= hbm_bytes),
      "per_chip_bytes": int(total),
      "hbm_bytes_per_chip": int(hbm_bytes),
      "argument_bytes": int(args),
      "output_bytes": int(out),
      "alias_bytes": int(alias),
      "temp_bytes": int(temp),
      "code_bytes": int(code),
      "host_bytes": int(host),
      "peak_live_bytes": int(m.peak_memory_in_bytes),
  }


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _size(number: str, unit: str) -> int:
  """`254.30`, `G` (the compiler's binary units) -> bytes."""
  return int(float(number) * _UNITS[unit])


def overflow_record(message: str, hbm_bytes: int) -> dict | None:
  """The record of a compile the TPU compiler refused for running out of HBM, or None.

  The compiler stops at its own memory check ("Ran out of memory in memory space hbm. Used
  254.30G of 95.74G hbm", "HLO temporaries 254.30G exceed ...") before memory_analysis exists;
  its numbers are the record.
  """
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  record = {"fits": False, "per_chip_bytes": None, "hbm_bytes_per_chip": int(hbm_bytes),
            "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
            "temp_bytes": None, "code_bytes": None, "host_bytes": None, "peak_live_bytes": None,
            "compiler_message": message.strip()[:2000]}
  m = re.search(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", message)
  if m:
    record["per_chip_bytes"] = _size(m.group(1), m.group(2))
  m = re.search(r"temporaries \(?([\d.]+)([KMGT]?)", message) or re.search(
      r"program\s+([\d.]+)([KMGT]?)", message)
  if m:
    record["temp_bytes"] = _size(m.group(1), m.group(2))
  m = re.search(r"arguments\s+([\d.]+)([KMGT]?)", message)
  if m:
    record["argument_bytes"] = _size(m.group(1), m.group(2))
  if record["per_chip_bytes"] is None:
    parts = [record[k] for k in ("temp_bytes", "argument_bytes") if record[k] is not None]
    record["per_chip_bytes"] = sum(parts) if parts else None
  return record


def _compile(lowered, hbm_bytes: int) -> dict:
  try:
    compiled = lowered.compile()
  except Exception as e:  # the TPU compiler's out-of-memory refusal is a result, not a crash
    record = overflow_record(str(e), hbm_bytes)
    if record is None:
      raise
    return record
  return memory_record(compiled, hbm_bytes)


def _mesh_for_spec(spec: str | None, slice_: tpu.TpuSlice):
  devices = tpu.compile_only_devices(slice_)
  try:
    return sharding_lib.make_mesh(spec, devices)
  except ValueError as e:
    raise ValueError(f"{slice_.name} ({len(devices)} chips): {e}") from None


def compile_train_step(config: TrainConfig, topology: str) -> dict:
  """Compiles the run's train step for the TPU slice `topology`; returns the record."""
  slice_ = tpu.parse_slice(topology)
  model, source = setup.abstract_model_config(config)
  mesh = _mesh_for_spec(config.mesh, slice_)
  config = step_lib.batch_config_for_mesh(config, mesh)
  specs = step_lib.step_specs(config, model, mesh, config.run.param_dtype or "float32")
  rows = jax.ShapeDtypeStruct((config.global_batch, *step_lib.row_shape(config)),
                              jax.numpy.int32, sharding=specs.batch_sharding)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    step = step_lib.make_train_step(config, model, specs.optimizer, specs.shardings,
                                    specs.batch_sharding)
    kernels = dispatch.choose(config.run)
    lowered = step.lower(specs.abstract_state(), rows)
    compiled = _compile(lowered, slice_.hbm_bytes_per_chip)
  seconds = time.perf_counter() - t0
  tokens = config.global_batch * config.seq_len
  flops = metrics_lib.flops_per_token(model, config.seq_len) * tokens
  record = {
      "what": "train_step",
      "topology": slice_.name,
      "slice": slice_.describe(),
      "generation": slice_.generation,
      "chips": slice_.chips,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "model_source": files.portable(source),
      "model": _model_summary(model),
      "run": _run_summary(config.run, kernels),
      "attention_compiled": kernels.attention,
      "seq_len": config.seq_len,
      "global_batch": config.global_batch,
      "micro_batch": config.global_batch // config.accum_steps,
      "accum_steps": config.accum_steps,
      "loss_chunk": config.loss_chunk,
      "tokens_per_step": tokens,
      "model_flops_per_step": flops,
      "model_flops_per_chip": flops / slice_.chips,
      "compile_seconds": round(seconds, 1),
      **compiled,
  }
  return record


def _model_summary(model) -> dict:
  from pi_jax import model as model_lib
  return {"params": model_lib.count_params(model), "num_layers": model.num_layers,
          "hidden_size": model.hidden_size, "rope_scaling": model.rope_scaling.describe()}


def _run_summary(run: RunOptions, kernels: dispatch.Kernels) -> dict:
  return {"param_dtype": run.param_dtype or "float32", "compute_dtype": run.compute_dtype,
          "remat": run.remat, "attention_impl": run.attention_impl,
          "attention_block_size": kernels.block_size}


def _gib(n: int) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 2**20:.2f} MiB"


def format_record(record: dict) -> str:
  """The human-readable lines train.py / eval.py print."""
  m, r = record["model"], record["run"]
  lines = [
      f"{record['what']} compiled for {record['slice']} in {record['compile_seconds']} s",
      f"  mesh {record['mesh']}; model {m['params'] / 1e9:.2f}B params ({record['model_source']}), "
      f"{m['rope_scaling']}, {r['param_dtype']} params / {r['compute_dtype']} compute, "
      f"remat {r['remat']}, attention {r['attention_impl']} -> {record['attention_compiled']}",
  ]
  if record["what"] == "train_step":
    lines.append(f"  batch {record['global_batch']} × {record['seq_len']} tokens "
                 f"(micro-batch {record['micro_batch']}, loss chunk {record['loss_chunk']}); "
                 f"model FLOPs {record['model_flops_per_step']:.3e} per step, "
                 f"{record['model_flops_per_chip']:.3e} per chip")
  else:
    lines.append(f"  batch {record['batch']} windows × {record['window']} tokens; "
                 f"model FLOPs {record['model_flops_per_step']:.3e} per call")
  if record.get("compiler_message"):
    total = record["per_chip_bytes"]
    return "\n".join(lines + [
        "  DOES NOT FIT: the TPU compiler ran out of HBM"
        + (f" (needs {_gib(total)} of {_gib(record['hbm_bytes_per_chip'])} per chip, over by "
           f"{_gib(total - record['hbm_bytes_per_chip'])})" if total else ""),
        "  " + record["compiler_message"].splitlines()[0][:400]])
  lines += [
      "  per chip: arguments " + _gib(record["argument_bytes"]) +
      ", outputs " + _gib(record["output_bytes"]) +
      f" ({_gib(record['alias_bytes'])} aliased to donated arguments)" +
      ", temporaries " + _gib(record["temp_bytes"]) +
      f" (peak live {_gib(record['peak_live_bytes'])})",
      f"  total {_gib(record['per_chip_bytes'])} of {_gib(record['hbm_bytes_per_chip'])} HBM: " +
      ("fits" if record["fits"] else
       f"DOES NOT FIT (over by {_gib(record['per_chip_bytes'] - record['hbm_bytes_per_chip'])})"),
  ]
  return "\n".join(lines)


def compile_perplexity_step(model, topology: str, window: int, batch: int | None = None,
                            mesh_spec: str | None = None, chunk: int = 1024,
                            model_source: str = "", run: RunOptions | None = None) -> dict:
  """Compiles eval.py perplexity's window scorer (pi_jax.evals.perplexity.window_nll_fn) for a
  TPU slice: parameters sharded as load_checkpoint places them, window batches over the data
  axes. `batch` defaults to one window per data shard."""
  from pi_jax import model as model_lib
  from pi_jax.evals import perplexity as ppl
  from pi_jax.train import state as state_lib
  slice_ = tpu.parse_slice(topology)
  mesh = _mesh_for_spec(mesh_spec, slice_)
  batch = runtime.check_batch_size(sharding_lib.batch_shards(mesh) if batch is None else batch, mesh)
  run = run or RunOptions()
  params = state_lib.with_shardings(model_lib.abstract_params(model, run.param_dtype or "float32"),
                                    state_lib.param_shardings(mesh, model))
  tokens = runtime.batch_struct((batch, window), mesh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    kernels = dispatch.choose(run)
    compiled = _compile(jax.jit(ppl.window_nll_fn(model, window, chunk, run)).lower(
        params, tokens, tokens), slice_.hbm_bytes_per_chip)
  seconds = time.perf_counter() - t0
  # A forward pass is a third of a training step's 6·N + attention FLOPs per token.
  flops = metrics_lib.flops_per_token(model, window) / 3 * batch * window
  return {
      "what": "perplexity_window", "topology": slice_.name, "slice": slice_.describe(),
      "generation": slice_.generation, "chips": slice_.chips,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "model_source": files.portable(model_source),
      "model": _model_summary(model), "run": _run_summary(run, kernels),
      "attention_compiled": kernels.attention,
      "window": window, "batch": batch, "loss_chunk": chunk,
      "model_flops_per_step": flops, "model_flops_per_chip": flops / slice_.chips,
      "compile_seconds": round(seconds, 1),
      **compiled,
  }
