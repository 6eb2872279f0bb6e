"""Pre-train the demo's tiny byte-level LLaMA at a 128-byte window (assets/tiny_base).

  python train.py --config configs/tiny_pretrain.py

Trains on Psalms 1-99 of the bundled PG-19 stand-in (data/pg19_standin/Psa_0??.txt); the demo
holds out Psalms 140-149 for evaluation, so they are never seen in pre-training or fine-tuning.
AdamW, linear warm-up then a constant learning rate (the trainer's schedule).
"""

from pi_jax.config import ModelConfig
from pi_jax.train.config import TrainConfig

TRAIN_DATA = "data/pg19_standin/Psa_0??.txt"
WINDOW = 128


def get_config() -> TrainConfig:
  return TrainConfig(
      workdir="runs/tiny_pretrain",
      # ~0.69M parameters, 2.8 MB in float32: small enough to commit.
      model=ModelConfig(vocab_size=258, hidden_size=128, intermediate_size=352, num_layers=4,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=WINDOW,
                        rope_theta=10000.0, bos_token_id=256, eos_token_id=257,
                        tie_word_embeddings=False),
      data=TRAIN_DATA,
      seq_len=WINDOW,
      global_batch=16,
      steps=1400,
      learning_rate=3e-3,
      warmup_steps=100,
      warmup_start_fraction=0.1,
      weight_decay=0.0,
      seed=0,
      checkpoint_every=200,
      keep_checkpoints=2,
      eval_sequences=64,
      eval_every=200,
      log_every=50,
      loss_chunk=WINDOW,
  )
