"""Does a rerun in a workdir that holds checkpoints match them? Checked before anything is touched.

A resume restores the newest checkpoint into the state the *new* run config describes. When the
model changed (layers, widths, parameter dtype), the restore would fail and the good checkpoints
would look damaged; when only the RoPE scaling or the window changed, it would succeed and the
final checkpoint would claim a scaling its earlier steps never saw. So the run's model is
compared with the one recorded in the newest checkpoint (its `data` item) and the run config
with WORKDIR/run_config.json, and a difference that changes what the checkpoints *are* is
refused with one line naming each difference and what to do.

Optimizer settings (learning rate, schedule, AdamW constants, steps) may change on a resume: a
lower learning rate for the rest of a run is a normal decision. They continue, with a printed
notice per changed setting, so no change goes unannounced. Gradient clipping switched on or off
changes the optimizer state's structure and is refused like a model change.

`check_workdir` is the other check before a run touches anything: a workdir that is a file or
cannot be written is one line, not a traceback half-way through start-up.
"""

from __future__ import annotations

import json
import os

from pi_jax import files

# TrainConfig fields that may change on a resume, announced.
NOTICE_FIELDS = ("learning_rate", "warmup_steps", "warmup_start_fraction", "lr_decay",
                 "final_lr_fraction", "weight_decay", "b1", "b2", "eps", "grad_clip", "steps")

RUN_CONFIG = "run_config.json"


class ResumeMismatchError(ValueError):
  """The rerun's model or optimizer structure is not the one its checkpoints were written with."""


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def model_differences(saved: dict, new: dict) -> list[str]:
  """'FIELD: OLD then, NEW now' for every architecture or RoPE field that differs (how a run
  computes, pi_jax.run.RunOptions, may differ between a run and its resume)."""
  a, b = _flat(saved), _flat(new)
  return [f"model.{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


def read_run_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ResumeMismatchError(f"{path}: cannot read the run's recorded config ({e}); restore it "
                              "or use a new workdir") from None


def check_resume(workdir: str, config_dict: dict, model_dict: dict, checkpoint_step: int | None,
                 checkpoint_meta: dict | None, param_dtype: str, log=print) -> list[str]:
  """Raises ResumeMismatchError when the run (its TrainConfig.to_dict(), final model's to_dict()
  and parameter dtype) cannot resume the checkpoints in `workdir`: checkpoint_meta is the newest
  checkpoint's `data` item (None when it does not read). Returns (and logs) the notices of the
  optimizer settings that changed."""
  recorded = read_run_config(workdir)
  checkpoint_model = (checkpoint_meta or {}).get("model")
  # The state's parameter dtype: recorded beside the model (older checkpoints: inside it).
  saved_dtype = (checkpoint_meta or {}).get("param_dtype") or (checkpoint_model or {}).get(
      "param_dtype")
  if checkpoint_model is not None:  # as this version reads it: retired keys out, defaults in
    from pi_jax.config import ModelConfig
    try:
      checkpoint_model = ModelConfig.from_dict(checkpoint_model).to_dict()
    except (TypeError, ValueError):
      pass
  refused = []
  if checkpoint_model is not None:
    refused += model_differences(checkpoint_model, model_dict)
  if saved_dtype is not None and saved_dtype != param_dtype:
    refused.append(f"param_dtype: {saved_dtype!r} then, {param_dtype!r} now (the optimizer state "
                   "holds parameters of the old dtype)")
  if recorded is not None:
    if (recorded.get("grad_clip") is None) != (config_dict.get("grad_clip") is None):
      refused.append(f"grad_clip: {recorded.get('grad_clip')!r} then, "
                     f"{config_dict.get('grad_clip')!r} now (clipping on or off changes the "
                     "optimizer state)")
  where = f"checkpoint {checkpoint_step}" if checkpoint_step is not None else RUN_CONFIG
  if refused:
    raise ResumeMismatchError(
        f"workdir {workdir} holds checkpoints of another run setting ({where}): "
        f"{'; '.join(refused)}. Nothing was changed. Use a new workdir for the new setting, or "
        "restore the old one to resume")
  notices = []
  if recorded is not None:
    for key in NOTICE_FIELDS:
      if key in recorded and recorded[key] != config_dict.get(key):
        notices.append(f"{key} {recorded[key]!r} -> {config_dict.get(key)!r}")
  if notices:
    log(f"resuming with changed optimizer settings from step {checkpoint_step}: "
        f"{', '.join(notices)} (the steps before keep the old values; the change is recorded in "
        f"{RUN_CONFIG})")
  return notices


def check_workdir(workdir: str) -> None:
  """One line, before the run, for a workdir that is a file or cannot be written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir} is a file, not a folder: choose another workdir")
  if os.path.isdir(workdir):
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise ValueError(f"workdir {workdir} cannot be written (permission denied): choose "
                       "another workdir or fix its permissions")
  else:
    files.check_writable(workdir, what="workdir")
