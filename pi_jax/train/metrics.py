"""Throughput accounting (FLOPs per token, MFU) and the metrics writers (JSONL, TensorBoard)."""

from __future__ import annotations

import json
import math
import os

import jax

from pi_jax import model as model_lib
from pi_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against jax's device_kind.
PEAK_TFLOPS = (
    ("h200", 989.0),
    ("h100", 989.0),  # SXM; PCIe parts are slower, override with --set peak_tflops=
    ("a100", 312.0),
    ("l4", 121.0),
    ("tpu v6", 918.0),
    ("tpu v5p", 459.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v4", 275.0),
    ("tpu v3", 123.0),
)


def peak_flops_per_device(device: jax.Device, override_tflops: float | None = None) -> float | None:
  """Peak FLOP/s of one device from the table (None when unknown, e.g. CPU)."""
  if override_tflops:
    return override_tflops * 1e12
  kind = device.device_kind.lower()
  for key, tflops in PEAK_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6·N for the matmuls plus 6·layers·L·D for causal attention.

  N counts every parameter used in a matmul: all but the input embedding table (which is a
  lookup), unless the embeddings are tied and double as the output projection.
  """
  n = model_lib.count_params(config)
  if not config.tie_word_embeddings:
    n -= config.vocab_size * config.hidden_size
  attention = 6 * config.num_layers * seq_len * config.num_heads * config.head_dim
  return 6.0 * n + attention


def trim_metrics(path: str, resume_step: int) -> int:
  """Drops the records of steps after `resume_step` (a run that went on past its last checkpoint
  before it stopped), so a resumed run logs every step once; returns how many were dropped.
  Training records keep step < resume_step; evaluation records after_steps <= resume_step (the
  one at 0 only when resuming past 0: a fresh start evaluates step 0 again)."""
  if not os.path.isfile(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a crash
        dropped += 1
        continue
      if "step" in record:
        keep = record["step"] < resume_step
      elif "after_steps" in record:
        keep = record["after_steps"] <= resume_step and resume_step > 0
      else:
        keep = True
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    from pi_jax import files
    files.write_text(path, "".join(kept))
  return dropped


class MetricsWriter:
  """One JSON object per step to WORKDIR/metrics.jsonl, scalars to TensorBoard (process 0).

  resume_step: the step the run (re)starts from; later records of an earlier attempt are
  dropped from metrics.jsonl, and TensorBoard is told to purge them (purge_step).
  """

  def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      trim_metrics(self.path, resume_step)
    self._file = open(self.path, "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step)

  def write(self, record: dict, tensorboard: bool = True) -> None:
    if not self.enabled:
      return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    self._file.write(json.dumps(clean) + "\n")
    if self._tb is not None and tensorboard:
      step = record.get("step", record.get("after_steps"))
      for key, value in record.items():
        if key not in ("step", "after_steps") and isinstance(value, (int, float)) and not isinstance(value, bool):
          group = "eval" if key.startswith("eval_") else "train"
          self._tb.add_scalar(f"{group}/{key}", value, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str, key: str = "loss") -> list[dict]:
  """Records of metrics.jsonl that have `key`, in step order; for a resumed run the later record
  of a step wins. Training records have `step` (0-based index of the update); evaluation records
  (key="eval_loss") have `after_steps` (updates completed; 0 is before training)."""
  by_step: dict[int, dict] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        if key in record:
          by_step[record.get("step", record.get("after_steps"))] = record
  return [by_step[k] for k in sorted(by_step)]
