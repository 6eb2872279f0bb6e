"""Passkey episodes in pre-training rows, the BPE trainer, the decaying schedule, the mini prompt."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pi_jax.evals import passkey
from pi_jax.tokenizer import train_bpe
from pi_jax.train import episodes, optim, pipeline
from pi_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(REPO, "data", "pg19_standin", "Psa_001.txt")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  with open(TEXT) as f:
    text = f.read()
  return train_bpe([text, passkey.FILLER * 3], 400, str(tmp_path_factory.mktemp("tok")))


def test_bpe_tokenizer_splits_digits_and_adds_bos(tok):
  ids = tok.encode("The pass key is 71432.")
  assert ids[0] == tok.bos_id == 0 and tok.eos_id == 1 and tok.vocab_size == 400
  pieces = [tok.decode([i]) for i in ids[1:]]
  assert [p for p in pieces if p.strip().isdigit()] == ["7", "1", "4", "3", "2"]
  assert tok.decode(ids) == "The pass key is 71432."


def _mixture(tok, fraction=0.5, seq_len=128, batch=8, seed=0):
  with open(TEXT) as f:
    stream = np.asarray(tok.encode(f.read()) + [tok.eos_id], np.int32)
  data = pipeline.TrainData(pipeline.PackedSequences(stream, seq_len, 4), batch, seed)
  return data, episodes.PasskeyMixture(data, tok, seq_len, batch, fraction, seed)


def test_episode_rows_hold_a_retrievable_key_at_spread_distances(tok):
  data, mix = _mixture(tok, fraction=1.0, seq_len=384)
  key_head = tok.encode(" The pass key is", add_bos=False)
  distances = set()
  for step in range(6):
    rows = mix.train_batch(step, slice(None))
    assert rows.shape == (8, 385) and rows.dtype == np.int32
    for row in rows:
      text = tok.decode(row)
      assert row[0] == tok.bos_id
      key = text.split("The pass key is ")[1][:5]
      assert key.isdigit() and text.rstrip().endswith("What is the pass key? The pass key is " + key)
      # distance from the key line to the end of the row, in tokens
      starts = [i for i in range(len(row)) if list(row[i:i + len(key_head)]) == key_head]
      distances.add(len(row) - starts[0])
  assert len(distances) >= 4 and max(distances) - min(distances) > 128, sorted(distances)


def test_mixture_is_a_pure_function_of_step_and_rows(tok):
  data, mix = _mixture(tok, fraction=0.5)
  full = mix.train_batch(3, slice(None))
  np.testing.assert_array_equal(full, mix.train_batch(3, slice(None)))
  np.testing.assert_array_equal(full[2:6], mix.train_batch(3, slice(2, 6)))  # another process
  plain = data.train_batch(3, slice(None))
  replaced = [not np.array_equal(a, b) for a, b in zip(full, plain)]
  many = np.mean([not np.array_equal(a, b) for s in range(20)
                  for a, b in zip(mix.train_batch(s, slice(None)), data.train_batch(s, slice(None)))])
  assert 0.3 < many < 0.7, many
  assert any(replaced) or not all(replaced)
  np.testing.assert_array_equal(mix.eval_batch(0, 4, slice(None)), data.eval_batch(0, 4, slice(None)))
  assert mix.fingerprint() != data.fingerprint()


def test_too_short_rows_are_refused(tok):
  with pytest.raises(ValueError, match="too short for a passkey episode"):
    _mixture(tok, seq_len=32)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_decaying_schedule_reaches_the_final_fraction(decay):
  config = TrainConfig(steps=101, learning_rate=1e-3, warmup_steps=10, warmup_start_fraction=0.1,
                       lr_decay=decay, final_lr_fraction=0.1)
  lr = optim.learning_rate_schedule(config)
  assert float(lr(0)) == pytest.approx(1e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(100)) == pytest.approx(1e-4, rel=1e-4)
  mid = float(lr(55))
  assert 1e-4 < mid < 1e-3
  if decay == "linear":
    assert mid == pytest.approx(5.5e-4, rel=1e-4)


def test_constant_schedule_is_unchanged():
  config = TrainConfig(steps=100, learning_rate=1e-3, warmup_steps=10)
  lr = optim.learning_rate_schedule(config)
  assert float(lr(99)) == pytest.approx(1e-3)
  with pytest.raises(ValueError, match="lr_decay"):
    TrainConfig(lr_decay="step")


def test_mini_template_prompts_fit_and_place_the_key(tok):
  builder = passkey.PromptBuilder(tok, passkey.get_template("mini"))
  per = len(tok.encode(passkey.FILLER, add_bos=False))  # tokens per filler group
  for length in (256, 1024):
    nearest = builder.trial(length, 0, 12345).actual_k  # key line + question
    for k in (0, length // 2, length - 60):
      t = builder.trial(length, k, 12345)
      assert len(t.ids) + len(t.key_ids) == length  # filled exactly, the answer inside
      assert abs(t.actual_k - max(k, nearest)) <= per  # within one filler group
      text = tok.decode(t.ids)
      assert "The pass key is 12345. Remember it. 12345 is the pass key." in text
      assert "important info" not in text
  with pytest.raises(ValueError, match="passkey template"):
    passkey.get_template("nope")
