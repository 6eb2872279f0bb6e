"""Extend the demo's tiny model (assets/tiny_base, trained at 128 bytes) to a longer window.

PI fine-tuning to 8x (1024 bytes):
  python train.py --config configs/tiny_extend.py --set workdir=runs/pi8 \\
      --set rope_scaling=linear:8 --set seq_len=1024 --set global_batch=2
Direct fine-tuning (no interpolation) to the same window:
  python train.py --config configs/tiny_extend.py --set workdir=runs/ft8 \\
      --set max_position_embeddings=1024 --set seq_len=1024 --set global_batch=2

The paper's recipe (PI §3.1) scaled to a tiny model: AdamW (0.9, 0.95), no weight decay, linear
warm-up from 10% of the peak, then constant; the same data, steps and tokens per step for both
methods. demo.py sets steps, seq_len and global_batch per run.
"""

from pi_jax.train.config import TrainConfig

TRAIN_DATA = "data/pg19_standin/Psa_0??.txt"  # the pre-training documents (Psalms 1-99)


def get_config() -> TrainConfig:
  return TrainConfig(
      workdir="runs/tiny_extend",
      init_checkpoint="assets/tiny_base",
      data=TRAIN_DATA,
      seq_len=1024,
      global_batch=2,
      steps=40,
      learning_rate=2e-3,
      warmup_steps=5,
      warmup_start_fraction=0.1,
      weight_decay=0.0,
      seed=0,
      checkpoint_every=1000,  # the run saves at its last step anyway
      keep_checkpoints=1,
      async_checkpoints=False,
      eval_sequences=0,
      log_every=10,
      loss_chunk=1024,
      tensorboard=False,
  )
