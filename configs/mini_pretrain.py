"""Pre-train the miniature's base model (assets/mini_base) at a 256-token window.

  python demo.py pretrain          # trains the BPE tokenizer, then runs this config

or, with a tokenizer already trained (demo.py pretrain writes it to runs/mini_pretrain/tokenizer):
  python train.py --config configs/mini_pretrain.py --set tokenizer=runs/mini_pretrain/tokenizer

A token-level LLaMA in the paper's regime, scaled down (see assets/mini_base/README.md):
head_dim 64 (32 frequency pairs, half of LLaMA's 64), RoPE base 500 so that about the same share of
frequency pairs as LLaMA-7B's at 2048 never completes a turn inside the window (12 of 32 here,
23 of 64 there), half of the rows are passkey episodes with the key anywhere in the window, and
the learning rate decays (cosine) to 10% of its peak, as LLaMA's pre-training did.
Pre-training text: Psalms 1-99 of the bundled PG-19 stand-in; the demo fine-tunes on Psalms
100-139 and evaluates on Psalms 140-149, which pre-training never sees.
"""

from pi_jax.config import ModelConfig
from pi_jax.train.config import TrainConfig

TRAIN_DATA = "data/pg19_standin/Psa_0??.txt"
WINDOW = 256
VOCAB = 1024


def get_config() -> TrainConfig:
  return TrainConfig(
      workdir="runs/mini_pretrain",
      # ~0.98M parameters (3.9 MB in float32), sized to pre-train in under an hour on 2 cores.
      model=ModelConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_layers=4,
                        num_heads=2, num_kv_heads=2, head_dim=64, max_position_embeddings=WINDOW,
                        rope_theta=500.0, bos_token_id=0, eos_token_id=1,
                        tie_word_embeddings=True),
      tokenizer="runs/mini_pretrain/tokenizer",
      data=TRAIN_DATA,
      seq_len=WINDOW,
      passkey_fraction=0.5,
      passkey_template="mini",
      global_batch=16,
      steps=4000,
      learning_rate=3e-3,
      lr_decay="cosine",
      final_lr_fraction=0.1,
      warmup_steps=100,
      warmup_start_fraction=0.1,
      weight_decay=0.0,
      seed=0,
      checkpoint_every=500,
      keep_checkpoints=8,
      eval_sequences=64,
      eval_every=500,
      log_every=50,
      loss_chunk=WINDOW,
  )
