"""SmolLM2-135M, 8192 -> 32768 by Position Interpolation, with the paper's 7B recipe (lr 2e-5,
warm-up 20 steps from 10%, 1000 steps) at global batch 64.

The checkpoint is the one `python -m convert.fetch smollm2` writes (SmolLM2-135M-Instruct).
"""

import os

from convert import fetch
from pi_jax.train.recipes import extend


def get_config():
  # The recipe's bf16 compute and remat "full": with remat "none" and float32 one 32K sequence
  # needs ~56 GiB per chip and fits no TPU slice (docs/tpu_capacity.md).
  return extend("smollm2-135m", "7b", 32768, "pi", global_batch=64,
                init_checkpoint=os.path.join(fetch.cache_dir(), fetch.CKPT_NAME))
