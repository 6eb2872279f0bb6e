"""packing=documents (issue 25): documents packed whole into rows with segment ids and target
flags; the train step with them equals today's step bit for bit on rows of one document each
(where positions agree), and a packed batch equals its documents run alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pi_jax import model as model_lib
from pi_jax import sharding as sharding_lib
from pi_jax.config import ModelConfig
from pi_jax.data import packing
from pi_jax.run import RunOptions
from pi_jax.train import state as state_lib
from pi_jax.train import step as step_lib
from pi_jax.train.config import TrainConfig

MODEL = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=16,
                    tie_word_embeddings=False).with_rope_scaling("linear:2")


def _docs(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 61, n).astype(np.int32) for n in lengths]


def test_plan_never_crosses_rows_and_cuts_long_documents_with_one_token_overlap():
  lengths = [5, 7, 30, 1, 4, 9, 12]
  plan = packing.plan_rows(lengths, seq_len=10)
  width = 11
  for r in range(plan.num_rows):
    sel = plan.row == r
    assert plan.length[sel].sum() <= width
    np.testing.assert_array_equal(plan.slot[sel], np.cumsum(plan.length[sel]) - plan.length[sel])
  # Document 2 (30 tokens): pieces [0, 11), [10, 21), then the rest [20, 30) packed as a short one.
  d2 = plan.doc == 2
  assert plan.start[d2].tolist() == [0, 10, 20] and plan.length[d2].tolist() == [11, 11, 10]
  assert 3 not in plan.doc  # one token: no target
  # Every token but each document's first is a target exactly once.
  targets = {}
  for d, s, n in zip(plan.doc, plan.start, plan.length):
    for t in range(s + 1, s + n):
      targets[(d, t)] = targets.get((d, t), 0) + 1
  assert all(v == 1 for v in targets.values())
  assert len(targets) == sum(n - 1 for n in lengths if n > 1)


def test_rows_hold_segments_flags_and_padding():
  docs = _docs([4, 6, 3])
  rows = packing.DocumentRows(packing.InMemoryDocuments(docs), seq_len=9).rows([0, 1])
  assert rows.shape == (2, 3, 10)
  np.testing.assert_array_equal(rows[0, 0], np.concatenate([docs[0], docs[1]]))
  np.testing.assert_array_equal(rows[0, 1], [1] * 4 + [2] * 6)
  np.testing.assert_array_equal(rows[1, 1], [1] * 3 + [0] * 7)
  np.testing.assert_array_equal(rows[1, 2], [1] * 3 + [0] * 7)
  mask = packing.target_mask(rows)
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 1, 1, 1, 1, 1])  # not doc 1's first token
  np.testing.assert_array_equal(mask[1], [1, 1] + [0] * 7)


def test_sft_example_longer_than_the_row_is_cut_or_skipped_and_counted():
  docs = _docs([8, 20, 20, 6])
  flags = [np.r_[np.zeros(3), np.ones(5)], np.r_[np.zeros(4), np.ones(16)],
           np.r_[np.zeros(15), np.ones(5)], np.r_[np.zeros(2), np.ones(4)]]
  rows = packing.DocumentRows(packing.InMemoryDocuments(docs, flags), seq_len=10)
  assert rows.plan.skipped == 1 and rows.plan.truncated == 1  # example 2's prompt fills the row
  assert 2 not in rows.plan.doc
  batch = rows.rows(range(rows.num_train))
  for r in batch:  # no prompt token is ever a target
    for seg in set(r[1]) - {0}:
      where = np.flatnonzero(r[1] == seg)
      d = next(i for i, doc in enumerate(docs)
               if len(doc) >= len(where) and np.array_equal(doc[:len(where)], r[0, where]))
      np.testing.assert_array_equal(r[2, where], flags[d][:len(where)])


# --- the train step ------------------------------------------------------------------------------

def _step(config, rows):
  mesh = sharding_lib.make_mesh(None)
  specs = step_lib.step_specs(config, MODEL, mesh)
  state = state_lib.init_state(MODEL, specs.optimizer, specs.shardings, 0, "float32")
  with jax.set_mesh(mesh):
    step = step_lib.make_train_step(config, MODEL, specs.optimizer, specs.shardings,
                                    specs.batch_sharding)
    new, out = step(state, jax.device_put(rows, specs.batch_sharding))
  return jax.device_get(new["params"]), jax.device_get(out)


@pytest.mark.parametrize("impl", ["cpu_flash", "reference"])
def test_documents_step_on_rows_of_one_document_equals_concat_bit_for_bit(impl):
  """Rows each one document, all tokens flagged, positions continuing (= 0..L-1, as concat):
  the same loss, gradient norm and updated parameters, bit for bit."""
  from pi_jax import native
  if impl == "cpu_flash" and not native.available():
    pytest.skip("native kernels unavailable")
  base = TrainConfig(model=MODEL, seq_len=24, global_batch=4, grad_accum=2, learning_rate=1e-2,
                     warmup_steps=0, run=RunOptions(attention_impl=impl), loss_chunk=16)
  tokens = np.stack(_docs([25] * 4, seed=1))
  want_params, want = _step(base, tokens)
  rows = np.stack([tokens, np.ones_like(tokens), np.ones_like(tokens)], axis=1)
  got_params, got = _step(base.replace(packing="documents", document_positions="continue"), rows)
  # The loss too: with jnp.sum for the summed NLL it was 1-2 ulp apart here on an AVX-512 host
  # (7 Dec 2026); loss.pairwise_sum adds in one order whatever XLA fuses.
  for key in ("loss", "grad_norm", "tokens"):
    np.testing.assert_array_equal(got[key], want[key])
  jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
  # Positions restarting at 0 are the same positions here: equal to rounding.
  _, restart = _step(base.replace(packing="documents"), rows)
  np.testing.assert_allclose(restart["loss"], want["loss"], rtol=1e-6)


_PARAMS = model_lib.init_params(MODEL, jax.random.key(0))


@functools.partial(jax.jit, static_argnames=("positions", "run"))
def _jit_loss_and_grads(params, rows, positions, run):
  fn = lambda p: step_lib.summed_loss(MODEL, run, 16, p, rows, positions)
  return jax.value_and_grad(fn, has_aux=True)(params)


def _loss_and_grads(rows, positions="restart", run=RunOptions(attention_impl="reference")):
  (total, count), grads = _jit_loss_and_grads(_PARAMS, jnp.asarray(rows), positions, run)
  return float(total), float(count), grads


def _alone(rows):
  """Each segment of each packed row as a row of its own ([1, 3, n]): summed NLL, count, grads."""
  total = count = 0.0
  grads = None
  for r in rows:
    for seg in sorted(set(r[1].tolist()) - {0}):
      where = np.flatnonzero(r[1] == seg)
      t, c, g = _loss_and_grads(r[None][:, :, where])
      total, count = total + t, count + c
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
  return total, count, grads


@pytest.mark.parametrize("sft", [False, True])
def test_packed_batch_equals_its_documents_alone(sft):
  """Summed NLL, scored-token count and gradients of packed rows (text documents, or SFT
  examples flagged on their completions only) equal those of each document alone."""
  lengths = [9, 14, 5, 22, 7, 11, 3]
  docs = _docs(lengths, seed=2)
  flags = None
  if sft:
    rng = np.random.default_rng(3)
    flags = [(np.arange(n) >= rng.integers(1, n)).astype(np.int32) for n in lengths]
  rows = packing.DocumentRows(packing.InMemoryDocuments(docs, flags), seq_len=23)
  batch = rows.rows(range(rows.num_train))
  assert max(len(set(r[1].tolist()) - {0}) for r in batch) >= 2  # really packed
  total, count, grads = _loss_and_grads(batch)
  want_total, want_count, want_grads = _alone(batch)
  assert count == want_count == sum(int(packing.target_mask(r[None]).sum()) for r in batch)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads,
               want_grads)


def test_prompt_targets_change_neither_loss_nor_gradients():
  """Targets of unflagged (prompt) positions are replaced by other tokens: the same loss and
  gradients, bit for bit; a flagged target changed does change the loss."""
  from pi_jax import loss as loss_lib
  docs = _docs([12, 9], seed=4)
  flags = [np.r_[np.zeros(6), np.ones(6)], np.r_[np.zeros(3), np.ones(6)]]
  rows = packing.DocumentRows(packing.InMemoryDocuments(docs, flags), seq_len=21).rows([0])
  tokens, targets = jnp.asarray(rows[:, 0, :-1]), rows[:, 0, 1:]
  seg, mask = jnp.asarray(rows[:, 1, :-1]), jnp.asarray(packing.target_mask(rows))
  run = RunOptions(attention_impl="reference")

  @jax.jit
  def loss_and_grads(targets):
    fn = lambda p: loss_lib.mean_loss(MODEL, p, tokens, targets, mask, segment_ids_BL=seg,
                                      run=run)[0]
    return jax.value_and_grad(fn)(_PARAMS)

  want, want_g = loss_and_grads(targets)
  changed = np.where(np.asarray(mask), targets, (targets + 7) % 61)
  assert (changed != targets).sum() >= 8
  got, got_g = loss_and_grads(changed)
  np.testing.assert_array_equal(got, want)
  jax.tree.map(np.testing.assert_array_equal, got_g, want_g)
  flagged = targets.copy()
  flagged[0, np.flatnonzero(np.asarray(mask[0]))[0]] += 1
  assert loss_and_grads(flagged)[0] != want


def test_bad_settings_are_one_line():
  with pytest.raises(ValueError, match="packing must be concat or documents"):
    TrainConfig(packing="docs")
  with pytest.raises(ValueError, match="document_positions must be restart or continue"):
    TrainConfig(document_positions="reset")
  with pytest.raises(ValueError, match="needs packing=concat"):
    TrainConfig(packing="documents", passkey_fraction=0.5)


def test_train_py_with_documents_packing_and_eval(tmp_path):
  """train.py end to end: packing=documents trains, evaluates its held-out packed rows, and a
  rerun resumes (the data fingerprint of packed rows matches)."""
  from tests.train_utils import losses, run_train
  sets = ["packing=documents", "steps=2", "eval_sequences=4", "eval_every=2", "global_batch=4"]
  run_train(tmp_path, sets)
  assert sorted(losses(tmp_path)) == [0, 1]
  proc = run_train(tmp_path, sets[:1] + ["steps=3"] + sets[2:])
  assert "resuming from step 2" in proc.stderr
  assert sorted(losses(tmp_path)) == [0, 1, 2]


@pytest.mark.parametrize("mesh", ["data:2,fsdp:2,tensor:2", "data:2,fsdp:2,sequence:2"])
def test_documents_on_eight_devices_match_one(tmp_path, mesh):
  """packing=documents sharded over 8 fake devices (the ring with segment ids under a sequence
  axis) gives the one-device losses."""
  from tests.train_utils import losses, run_train
  sets = ["packing=documents", "steps=4", "checkpoint_every=100"]
  run_train(tmp_path / "one", sets)
  run_train(tmp_path / "eight", sets + [f"mesh={mesh}"], devices=8)
  want, got = losses(tmp_path / "one"), losses(tmp_path / "eight")
  assert sorted(got) == sorted(want) == [0, 1, 2, 3]
  np.testing.assert_allclose([got[k] for k in range(4)], [want[k] for k in range(4)], rtol=1e-5)
  assert want[3] < want[0] - 0.1
