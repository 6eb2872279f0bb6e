"""The run configuration: a frozen dataclass, loaded from a Python file, overridden by --set.

A run config is a Python file defining `get_config() -> TrainConfig`. Every field can be replaced
from the command line with `--set key=value` (parsed by the field's type); `model.FIELD=value`
replaces one field of a literal `ModelConfig`, `run.FIELD=value` one of the run options
(pi_jax.run.RunOptions: dtypes, remat, attention kernel and tile).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import typing
from typing import Any

from pi_jax import run as run_lib
from pi_jax.config import ModelConfig
from pi_jax.run import RunOptions

# Run options that run configs (and run_config.json files) before pi_jax.run held at the top
# level; from_dict moves them into `run`, --set names their new place.
_MOVED_TO_RUN = ("param_dtype", "compute_dtype", "remat", "attention_impl")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a staged-length run (pi_jax.train.stages): `steps` optimizer steps at window
  seq_len with RoPE scaling rope_scaling (e.g. linear:4; None keeps the model's). None for
  global_batch, learning_rate, warmup_steps: the run config's."""

  steps: int
  seq_len: int
  rope_scaling: str | None = None
  global_batch: int | None = None
  learning_rate: float | None = None
  warmup_steps: int | None = None

  def __post_init__(self):
    for name in ("steps", "seq_len", "global_batch"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"stage {name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs. Defaults follow the paper's fine-tuning recipe (PI §3.1)."""

  workdir: str = "runs/default"
  # Model: init_checkpoint (a pi_jax checkpoint) or else `model` (a preset name or a literal
  # ModelConfig) for a random init.
  init_checkpoint: str | None = None
  model: ModelConfig | str | None = None
  rope_scaling: str | None = None  # e.g. linear:4 (PI); none removes scaling; None keeps it
  max_position_embeddings: int | None = None  # the window, for direct fine-tuning without PI
  # How this run computes: dtypes, remat, attention kernel and tile (never read from a checkpoint).
  run: RunOptions = RunOptions()
  loss_chunk: int = 1024
  # Data.
  data: str = "pg19_standin"
  data_dir: str | None = None
  max_docs: int | None = None
  seq_len: int = 2048
  # concat: documents joined by EOS into one stream cut in rows (the paper's recipe; attention
  # and positions run through document boundaries). documents: documents packed whole into rows
  # with segment ids, each attending to itself only (pi_jax.data.packing); SFT stores need it.
  packing: str = "concat"
  # With packing=documents: restart (positions from 0 at each document) or continue (0..L-1
  # through the row, as concat).
  document_positions: str = "restart"
  eval_sequences: int = 0  # packed sequences held out of training for eval_loss
  # A random init trains on bytes unless `tokenizer` names a tokenizer folder (or checkpoint).
  tokenizer: str | None = None
  # Rows of each training batch replaced by passkey episodes (see train/episodes.py).
  passkey_fraction: float = 0.0
  passkey_template: str = "mini"
  # Batch: global_batch sequences per step, as grad_accum micro-batches of micro_batch.
  global_batch: int = 64
  # None: global_batch // grad_accum. -1: one sequence per batch shard of the mesh (data × fsdp
  # chips), the rest of global_batch by accumulation: the step's memory then depends on the
  # model and window only, whatever the slice (resolved by for_batch_shards).
  micro_batch: int | None = None
  grad_accum: int = 1
  # Optimizer and schedule (AdamW, linear warm-up from a fraction of the peak, then constant,
  # or decayed to final_lr_fraction × peak at `steps` when lr_decay is cosine or linear).
  steps: int = 1000
  learning_rate: float = 2e-5
  warmup_steps: int = 20
  warmup_start_fraction: float = 0.1
  lr_decay: str = "constant"
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float | None = None  # global-norm clipping; the paper does not clip
  seed: int = 0
  # Parallelism.
  mesh: str | None = None  # e.g. data:2,fsdp:2,tensor:2; None: FSDP over every device
  distributed: str = "auto"  # auto | on | off: jax.distributed.initialize()
  coordinator: str | None = None  # HOST:PORT of process 0 (explicit multi-process)
  num_processes: int | None = None
  process_id: int | None = None
  # Checkpoints, logging, evaluation.
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  async_checkpoints: bool = True
  log_every: int = 1  # console / TensorBoard cadence; metrics.jsonl gets every step
  eval_every: int = 0  # 0: never
  peak_tflops: float | None = None  # per device, for MFU when the device kind is not known
  tensorboard: bool = True
  # Staged lengths (e.g. 2K -> 8K -> 32K in one workdir; pi_jax.train.stages): with stages, the
  # run trains each in turn and `steps` is their sum.
  stages: tuple[Stage, ...] = ()

  def __post_init__(self):
    for name in ("steps", "seq_len", "global_batch", "grad_accum", "checkpoint_every",
                 "keep_checkpoints", "log_every", "loss_chunk"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "eval_every", "eval_sequences"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
    if self.micro_batch is not None and self.grad_accum != 1:
      raise ValueError(f"micro_batch {self.micro_batch} and grad_accum {self.grad_accum} are both "
                       "set: give one (micro_batch=null to use grad_accum)")
    if self.micro_batch is not None and self.micro_batch != -1:
      if self.micro_batch < 1 or self.global_batch % self.micro_batch:
        raise ValueError(f"micro_batch {self.micro_batch} must divide global_batch "
                         f"{self.global_batch}")
    elif self.global_batch % self.grad_accum:
      raise ValueError(f"grad_accum {self.grad_accum} must divide global_batch {self.global_batch}")
    if not 0.0 <= self.warmup_start_fraction <= 1.0:
      raise ValueError(f"warmup_start_fraction must be in [0, 1], got {self.warmup_start_fraction}")
    for name in ("learning_rate", "weight_decay", "b1", "b2", "eps", "grad_clip",
                 "warmup_start_fraction", "final_lr_fraction", "passkey_fraction", "peak_tflops"):
      value = getattr(self, name)
      if value is None and name in ("grad_clip", "peak_tflops"):
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if self.learning_rate < 0:
      raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
    for name in ("b1", "b2"):  # Adam's moment decays: 1 would never forget, > 1 diverges
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    for name in ("eps", "grad_clip", "peak_tflops"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}"
                         + (" (null: no clipping)" if name == "grad_clip" else ""))
    if self.lr_decay not in ("constant", "cosine", "linear"):
      raise ValueError(f"lr_decay must be constant, cosine or linear, got {self.lr_decay!r}")
    if not 0.0 <= self.final_lr_fraction <= 1.0:
      raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
    if not 0.0 <= self.passkey_fraction <= 1.0:
      raise ValueError(f"passkey_fraction must be in [0, 1], got {self.passkey_fraction}")
    if self.distributed not in ("auto", "on", "off"):
      raise ValueError(f"distributed must be auto, on or off, got {self.distributed!r}")
    if self.packing not in ("concat", "documents"):
      raise ValueError(f"packing must be concat or documents, got {self.packing!r}")
    if self.document_positions not in ("restart", "continue"):
      raise ValueError(f"document_positions must be restart or continue, got "
                       f"{self.document_positions!r}")
    if self.packing == "documents" and self.passkey_fraction > 0:
      raise ValueError("passkey_fraction > 0 mixes concat rows into the batch; it needs "
                       "packing=concat")
    if self.eval_every and not self.eval_sequences:
      raise ValueError("eval_every > 0 needs eval_sequences > 0 (held-out packed sequences)")

  @property
  def accum_steps(self) -> int:
    """Number of micro-batches per optimizer step."""
    if self.micro_batch == -1:
      raise ValueError("micro_batch=-1 depends on the mesh: resolve it with for_batch_shards")
    if self.micro_batch is not None:
      return self.global_batch // self.micro_batch
    return self.grad_accum

  def for_batch_shards(self, shards: int) -> TrainConfig:
    """This config on a mesh with `shards` batch shards: micro_batch=-1 becomes one sequence
    per shard (an error when global_batch is not a multiple of it); other values unchanged."""
    if self.micro_batch != -1:
      return self
    if self.global_batch % shards:
      raise ValueError(f"micro_batch=-1 (one sequence per batch shard): global_batch "
                       f"{self.global_batch} is not a multiple of the mesh's {shards} batch shards "
                       "(data × fsdp); use a tensor or sequence axis for some of the chips, or "
                       "set micro_batch / global_batch")
    return self.replace(micro_batch=shards)

  def replace(self, **changes) -> TrainConfig:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if isinstance(self.model, ModelConfig):
      d["model"] = self.model.to_dict()
    d["run"] = self.run.to_dict()
    d["stages"] = [dataclasses.asdict(s) for s in self.stages]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
    """The inverse of to_dict, as a run recorded it (WORKDIR/run_config.json); keys this version
    does not know are ignored, run options recorded before `run` existed are moved into it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    run = dict(d.get("run") or {})
    run.update({k: d[k] for k in _MOVED_TO_RUN if d.get(k) is not None})
    config = cls(**{k: v for k, v in d.items() if k in fields and k != "run"},
                 run=RunOptions.from_dict(run))
    if isinstance(config.model, dict):
      config = config.replace(model=ModelConfig.from_dict(config.model))
    return config.replace(stages=tuple(s if isinstance(s, Stage) else Stage(**s)
                                       for s in config.stages or ()))


def load_config_file(path: str) -> TrainConfig:
  """Runs `get_config()` from the Python file at `path`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"run config {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(
      "pi_jax_run_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"run config {path}: defines no get_config() function")
  config = module.get_config()
  if not isinstance(config, TrainConfig):
    raise TypeError(f"run config {path}: get_config() returned {type(config).__name__}, "
                    "expected TrainConfig")
  return config


def _parse_value(text: str, annotation, key: str):
  """Parses `text` as the type `annotation` (a field's resolved type hint)."""
  if annotation is ModelConfig:
    raise ValueError(f"--set {key}={text}: a ModelConfig is set field by field (model.FIELD=...)")
  if annotation is RunOptions:
    raise ValueError(f"--set {key}={text}: run options are set field by field (run.FIELD=...)")
  if key == "stages":
    raise ValueError(f"--set {key}={text}: stages are given in the run config file "
                     "(stages=(Stage(steps=..., seq_len=...), ...); docs/training.md)")
  try:
    return run_lib.parse_value(text, annotation, key)
  except ValueError as e:
    raise ValueError(f"--set {key}={text}: {e}" if not str(e).startswith("--set") else str(e))


def _unknown_key(key: str, known) -> ValueError:
  if key in _MOVED_TO_RUN:
    return ValueError(f"--set {key}: run options are set as run.{key}=... (pi_jax.run.RunOptions)")
  return run_lib.unknown_key(key, known)


def _split_items(items: list[str]) -> list[str]:
  """`a=1,b=2` is two overrides; a comma not followed by `key=` belongs to the value (mesh)."""
  out = []
  for item in items:
    parts = item.split(",")
    current = parts[0]
    for part in parts[1:]:
      head = part.split("=", 1)[0]
      if "=" in part and head.strip().replace(".", "_").isidentifier():
        out.append(current)
        current = part
      else:
        current += "," + part
    out.append(current)
  return out


def apply_overrides(config: TrainConfig, items: list[str]) -> TrainConfig:
  """Applies `key=value` strings; `model.FIELD=value` edits the model (a preset name is
  resolved to its ModelConfig first)."""
  hints = typing.get_type_hints(TrainConfig)
  changes: dict[str, Any] = {}
  model_changes: dict[str, Any] = {}
  run_settings: dict[str, str] = {}
  for item in _split_items(items):
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"--set {item!r}: expected key=value")
    if key.startswith("run."):
      run_settings[key[len("run."):]] = text
      continue
    if key.startswith("model."):
      field = key[len("model."):]
      model_hints = typing.get_type_hints(ModelConfig)
      if field not in model_hints:
        raise _unknown_key(field, model_hints)
      if field == "rope_scaling":
        raise ValueError("--set model.rope_scaling: use --set rope_scaling=KIND:FACTOR")
      model_changes[field] = _parse_value(text, model_hints[field], key)
      continue
    if key not in hints:
      raise _unknown_key(key, hints)
    changes[key] = _parse_value(text, hints[key], key)
  if "grad_accum" in changes and "micro_batch" not in changes:
    changes["micro_batch"] = None  # --set grad_accum=N replaces the config's micro_batch
  config = config.replace(**changes)
  if run_settings:
    config = config.replace(run=run_lib.with_settings(config.run, run_settings))
  if model_changes:
    model = config.model
    if isinstance(model, str):  # a preset name: edit the preset's architecture
      from pi_jax import presets
      model = presets.preset(model)
    if not isinstance(model, ModelConfig):
      raise ValueError("--set model.FIELD=...: the run config has no model to edit (set "
                       "model=PRESET_NAME first)")
    config = config.replace(model=model.replace(**model_changes))
  return config
