"""The paper's fine-tuning recipes (PI §3.1) as TrainConfigs, used by configs/*.py.

AdamW (β1 0.9, β2 0.95, weight decay 0); learning rate 2e-5 for 7B/13B and 1e-5 for 33B/65B;
linear warm-up over 20 steps from 10% of the peak, then constant; global batch 64 for
7B/13B/33B extended to 8192 and 128 otherwise; 1000 steps with PI, 10000 for direct
fine-tuning (FT, no interpolation). The paper trained on the Pile; the bundled PG-19 stand-in is
only a default that runs anywhere (--set data=... for real data).
"""

from __future__ import annotations

from pi_jax.run import RunOptions
from pi_jax.train.config import TrainConfig

PAPER_LR = {"7b": 2e-5, "13b": 2e-5, "33b": 1e-5, "65b": 1e-5}


def paper_batch(size: str, target_window: int) -> int:
  return 64 if size in ("7b", "13b", "33b") and target_window <= 8192 else 128


def extend(preset: str, size: str, target_window: int, method: str = "pi",
           **overrides) -> TrainConfig:
  """Fine-tune `preset` (a checkpoint at checkpoints/PRESET, converted with convert.to_pi_jax)
  from its window to `target_window` by PI (`method="pi"`) or direct fine-tuning (`"ft"`)."""
  from pi_jax import presets
  model = presets.preset(preset)
  window = model.original_window
  if target_window % window:
    raise ValueError(f"target window {target_window} is not a multiple of {preset}'s {window}")
  factor = target_window // window
  if method == "pi":
    scaling, steps, max_pos = f"linear:{factor}", 1000, None
  elif method == "ft":
    scaling, steps, max_pos = "none", 10000, target_window
  else:
    raise ValueError(f"method must be 'pi' or 'ft', got {method!r}")
  config = TrainConfig(
      workdir=f"runs/{preset}-{target_window // 1024}k-{method}",
      init_checkpoint=f"checkpoints/{preset}",
      model=preset,  # the architecture the checkpoint must have
      rope_scaling=scaling,
      max_position_embeddings=max_pos,
      run=RunOptions(param_dtype="float32", compute_dtype="bfloat16", remat="full"),
      data="pg19_standin",
      seq_len=target_window,
      global_batch=paper_batch(size, target_window),
      micro_batch=-1,  # one sequence per chip (per batch shard), the rest by accumulation
      steps=steps,
      learning_rate=PAPER_LR[size],
      warmup_steps=20,
      warmup_start_fraction=0.1,
      weight_decay=0.0,
      b1=0.9,
      b2=0.95,
      checkpoint_every=200,  # the paper's Table 3 evaluates every 200 steps
      keep_checkpoints=5,
  )
  return config.replace(**overrides) if overrides else config
