"""Extend a real pre-trained model's window: the paper's fine-tuning recipe (PI §3.1).

AdamW (0.9, 0.95), no weight decay, a 20-step linear warm-up from 10% of the peak, then
constant; plain long text. `python demo.py --real` (miniature/real.py) sets the checkpoint, data,
method, window, batch, steps and learning rate of each run, e.g. PI from 8192 to 32768:

  python train.py --config configs/real_extend.py --set init_checkpoint=CKPT \\
      --set workdir=runs/real/pi --set rope_scaling=linear:4 --set seq_len=32768 \\
      --set global_batch=1 --set steps=200 --set learning_rate=5e-5
Direct fine-tuning (no interpolation): --set max_position_embeddings=32768 instead of
rope_scaling. miniature/real.py says how the learning rate was chosen.
"""

from pi_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      workdir="runs/real_extend",
      init_checkpoint=None,
      data="pg19_standin",
      seq_len=32768,
      global_batch=1,
      steps=200,
      learning_rate=5e-5,
      warmup_steps=20,
      warmup_start_fraction=0.1,
      weight_decay=0.0,
      b1=0.9,
      b2=0.95,
      seed=0,
      checkpoint_every=10000,  # the run saves at its last step anyway
      keep_checkpoints=1,
      async_checkpoints=False,
      eval_sequences=0,
      log_every=1,
      loss_chunk=1024,
      tensorboard=False,
  )
