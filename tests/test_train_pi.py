"""A small honest version of the paper's Table 3 trend, with train.py end to end (slow).

A tiny byte-level model (configs/tiny.py: 2 layers, hidden 64) is pre-trained at a 64-byte
window, then fine-tuned for the same 100 steps at 4× that window (256) either with Position
Interpolation (rope_scaling=linear:4) or directly without it (max_position_embeddings=256, the
paper's FT baseline). Both are evaluated on the same held-out 256-byte sequences.

Measured here (notes/training.md): fine-tuning helps both, but direct fine-tuning ends LOWER
than PI (eval loss 1.853 vs 1.943 after 100 steps; 2.436 vs 2.904 before fine-tuning), so the
paper's PI-over-FT trend does not reproduce at this scale; that test is a strict xfail, which
turns into a failure the day it starts to hold.
"""

from __future__ import annotations

import pytest

from pi_jax.train.metrics import read_metrics
from tests import train_utils as tu

PRETRAIN = ["steps=400", "global_batch=16", "max_docs=40", "eval_every=400",
            "eval_sequences=64", "checkpoint_every=1000"]
FINETUNE = ["model=null", "seq_len=256", "steps=100", "global_batch=8", "max_docs=40",
            "eval_every=25", "eval_sequences=32", "learning_rate=1e-3", "checkpoint_every=1000"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Eval losses at the 256-byte window by fine-tuning step, for 'pi' and 'ft'."""
  root = tmp_path_factory.mktemp("pi_vs_ft")
  tu.run_train(root / "pre", PRETRAIN, timeout=1200)
  out = {}
  for name, extra in (("pi", "rope_scaling=linear:4"), ("ft", "max_position_embeddings=256")):
    tu.run_train(root / name, [f"init_checkpoint={root / 'pre' / 'final'}", extra, *FINETUNE],
                 timeout=1200)
    out[name] = {r["after_steps"]: r["eval_loss"]
                 for r in read_metrics(str(root / name), "eval_loss")}
  print({k: {s: round(v, 4) for s, v in r.items()} for k, r in out.items()})
  return out


@pytest.mark.slow
def test_fine_tuning_at_the_long_window_helps_both(runs):
  for r in runs.values():
    assert sorted(r) == [0, 25, 50, 75, 100]
    assert r[100] < r[0] - 0.2


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: direct fine-tuning beats PI for this tiny "
                   "byte-level model (see module docstring)")
def test_pi_beats_direct_fine_tuning_at_4x(runs):
  # The paper (Table 3 vs. Table 4's FT rows): with the same short fine-tune, PI reaches a lower
  # loss at the extended window than fine-tuning without interpolation.
  assert runs["pi"][100] < runs["ft"][100], runs
