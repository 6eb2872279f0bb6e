"""A tiny byte-level LLaMA on the bundled PG-19 stand-in: 20 steps on 2 CPU cores.

Pre-train at a short window, then extend it (see README, "Training"):
  python train.py --config configs/tiny.py --set workdir=runs/tiny
"""

from pi_jax.config import ModelConfig
from pi_jax.train.config import TrainConfig


def get_config() -> TrainConfig:
  return TrainConfig(
      workdir="runs/tiny",
      model=ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=176, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=64,
                        bos_token_id=256, eos_token_id=257, tie_word_embeddings=False),
      data="pg19_standin",
      max_docs=20,
      seq_len=64,
      global_batch=8,
      steps=20,
      learning_rate=3e-3,
      warmup_steps=5,
      warmup_start_fraction=0.1,
      weight_decay=0.0,
      checkpoint_every=10,
      keep_checkpoints=2,
      eval_sequences=16,
      eval_every=10,
      loss_chunk=64,
  )
