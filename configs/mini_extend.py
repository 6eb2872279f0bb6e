"""Extend the miniature's base model (assets/mini_base, trained at 256 tokens) to a longer window.

The paper's fine-tuning recipe (PI §3.1) in the miniature's proportions: AdamW (0.9, 0.95), no
weight decay, a 20-step linear warm-up from 10% of the peak, then constant; the peak is the
base's final pre-training learning rate (3e-4: 10% of its 3e-3 peak), as the paper's 2e-5 sits
just below LLaMA's final 3e-5. Fine-tuning text: Psalms 100-139 of the bundled PG-19 stand-in,
plain long text (no passkey episodes), never seen in pre-training. demo.py sets the method,
window, steps and batch per run, e.g. PI to 4x:

  python train.py --config configs/mini_extend.py --set workdir=runs/pi4 \\
      --set rope_scaling=linear:4 --set seq_len=1024 --set global_batch=4 --set steps=200
Direct fine-tuning (no interpolation) to the same window:
  python train.py --config configs/mini_extend.py --set workdir=runs/direct4 \\
      --set max_position_embeddings=1024 --set seq_len=1024 --set global_batch=4 --set steps=200
"""

from pi_jax.train.config import TrainConfig

FT_DATA = "data/pg19_standin/Psa_1[0-3]?.txt"  # Psalms 100-139


def get_config() -> TrainConfig:
  return TrainConfig(
      workdir="runs/mini_extend",
      init_checkpoint="assets/mini_base",
      data=FT_DATA,
      seq_len=1024,
      global_batch=4,
      steps=200,
      learning_rate=3e-4,
      warmup_steps=20,
      warmup_start_fraction=0.1,
      weight_decay=0.0,
      seed=0,
      checkpoint_every=10000,  # the run saves at its last step anyway
      keep_checkpoints=1,
      async_checkpoints=False,
      eval_sequences=0,
      log_every=25,
      loss_chunk=1024,
      tensorboard=False,
  )
