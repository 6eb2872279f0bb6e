"""Sliding-window perplexity equals brute force; batching changes nothing; SmolLM2 = transformers."""

import math

import jax
import numpy as np
import pytest

import pi_jax
from pi_jax.evals import perplexity as ppl

TINY = pi_jax.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=16)
LENGTHS = (1, 5, 40, 97)  # a BOS-only document (no target), one shorter than every window


@pytest.fixture(scope="module")
def model():
  params = pi_jax.init_params(TINY, jax.random.key(0))
  # Random init at N(0, 0.02) predicts ~uniformly whatever the context; sharper weights make
  # every token's NLL depend on its context, so a wrong context cannot pass unnoticed.
  params = jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, params)
  return TINY, params


@pytest.fixture(scope="module")
def documents():
  rng = np.random.RandomState(0)
  return [(f"doc{i}", rng.randint(0, 256, n).astype(np.int32)) for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("num_tokens,window,stride", [
    (2, 4, 4), (10, 4, 4), (10, 4, 1), (33, 8, 3), (9, 8, 3), (8, 8, 3), (100, 16, 16)])
def test_plan_scores_every_target_once_with_enough_context(num_tokens, window, stride):
  plan = ppl.plan_windows(num_tokens, window, stride)
  scored = []
  for i, (start, length, score_from) in enumerate(plan):
    assert start == i * stride and 1 <= length <= window
    assert score_from == 0 if i == 0 else score_from >= window - stride
    scored += [start + j + 1 for j in range(score_from, length)]
  assert scored == list(range(1, num_tokens))


def test_plan_rejects_stride_above_window():
  with pytest.raises(ValueError, match="stride"):
    ppl.plan_windows(100, 8, 9)


@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (128, 32)])
def test_sliding_window_equals_brute_force(model, documents, window, stride):
  config, params = model
  got = ppl.evaluate_perplexity(config, params, documents, [window], stride, batch_size=1)[0]
  per_doc = [ppl.reference_nll(config, params, t, window, stride) for _, t in documents
             if len(t) > 1]
  want = np.concatenate(per_doc)
  assert got.tokens == want.size == sum(n - 1 for n in LENGTHS)
  assert got.documents == 3
  assert got.short_documents == sum(1 < n <= window for n in LENGTHS)
  np.testing.assert_allclose(got.nll_sum, want.sum(), rtol=2e-6)
  assert got.perplexity() == pytest.approx(math.exp(want.mean()), rel=2e-6)
  # per_window_mean: the same targets, averaged per window (YaRN's script)
  means = []
  for (_, t), nll in zip([d for d in documents if len(d[1]) > 1], per_doc):
    for start, length, score_from in ppl.plan_windows(len(t), window, stride):
      means.append(nll[start + score_from:start + length].mean())
  assert got.perplexity("per_window_mean") == pytest.approx(math.exp(np.mean(means)), rel=2e-6)
  # the oracle is sensitive to context: another stride gives other numbers
  other = np.concatenate([ppl.reference_nll(config, params, t, window, max(1, stride // 4))
                          for _, t in documents if len(t) > 1])
  if window < 97:
    assert np.abs(other - want).max() > 0.5


def test_batched_padded_equals_unbatched(model, documents):
  config, params = model
  one = ppl.evaluate_perplexity(config, params, documents, [16, 32], 6, batch_size=1)
  three = ppl.evaluate_perplexity(config, params, documents, [16, 32], 6, batch_size=3)
  for a, b in zip(one, three):
    assert (a.tokens, a.windows, a.documents) == (b.tokens, b.windows, b.documents)
    np.testing.assert_allclose(a.nll_sum, b.nll_sum, rtol=1e-6)
    np.testing.assert_allclose(a.window_mean_sum, b.window_mean_sum, rtol=1e-6)


def test_skip_short_drops_documents_below_largest_window(model, documents):
  config, params = model
  got = ppl.evaluate_perplexity(config, params, documents, [8, 32], 8, skip_short=True)
  assert [r.skipped_documents for r in got] == [2, 2]  # lengths 1 and 5 are below 33
  assert [r.documents for r in got] == [2, 2]
  assert got[0].tokens == 39 + 96
  with pytest.raises(ValueError, match="shorter than"):
    ppl.evaluate_perplexity(config, params, documents, [128], 8, skip_short=True)


def test_window_too_large_for_memory_fails_before_work(model, documents, monkeypatch):
  from pi_jax import memory
  config, params = model
  monkeypatch.setattr(memory, "free_device_memory", lambda: (1000, "test device"))
  with pytest.raises(MemoryError, match="window 64 .*GiB free"):
    ppl.evaluate_perplexity(config, params, documents, [64], 8, progress=lambda *a: 1 / 0)


def _hf_sliding_nll(model, ids, window, stride):
  """The same definition in transformers: one forward per window, masked labels."""
  import torch
  total, count = 0.0, 0
  n, start, scored_until = len(ids), 0, 0
  while scored_until < n - 1:
    end = min(start + window, n - 1)
    x = torch.tensor(ids[start:end], dtype=torch.long)[None]
    with torch.no_grad():
      logits = model(x).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[start + 1:end + 1], dtype=torch.long)
    nll = -logp[torch.arange(end - start), targets]
    first = scored_until - start if start else 0
    total += float(nll[first:].sum())
    count += end - start - first
    scored_until, start = end, start + stride
  return total, count


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers():
  """SmolLM2-135M on real text: pi_jax's windowed perplexity = transformers' (GGUF, float32)."""
  import os
  import torch
  import transformers
  from convert import fetch
  from pi_jax import data
  ckpt = fetch.smollm2_checkpoint()
  config, params = pi_jax.load_checkpoint(ckpt)
  tok = pi_jax.load_tokenizer(ckpt)
  docs = list(data.iter_documents("pg19_standin", max_docs=1))
  documents = ppl.tokenize_documents(tok, docs, max_tokens=4096)
  got = ppl.evaluate_perplexity(config, params, documents, [2048], 1024, batch_size=1)[0]
  gguf = fetch.smollm2_gguf()
  torch.set_num_threads(2)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
  total, count = 0.0, 0
  for _, ids in documents:
    t, c = _hf_sliding_nll(hf, [int(i) for i in ids], 2048, 1024)
    total, count = total + t, count + c
  assert got.tokens == count
  want = math.exp(total / count)
  print(f"SmolLM2 pg19_standin W=2048 S=1024: pi_jax {got.perplexity():.6f} transformers {want:.6f}")
  assert got.perplexity() == pytest.approx(want, rel=1e-4)


def test_prefix_perplexities_equal_one_window_each(model):
  """One forward over max(W) + 1 tokens gives, for every W, evaluate_perplexity's number for one
  window of W tokens; scalings whose table depends on the length are refused."""
  config, params = model
  ids = np.random.RandomState(3).randint(0, 256, 40).astype(np.int32)
  got = ppl.prefix_perplexities(config, params, ids, [8, 16, 39])
  for w in (8, 16, 39):
    (want,) = ppl.evaluate_perplexity(config, params, [("d", ids[:w + 1])], [w], w)
    assert want.tokens == w
    assert got[w] == pytest.approx(want.perplexity(), rel=1e-5)
  with pytest.raises(ValueError, match="fewer than the largest window 40"):
    ppl.prefix_perplexities(config, params, ids, [40])
  for spec in ("dynamic:2", {"rope_type": "longrope", "factor": 2.0,
                              "original_max_position_embeddings": 16,
                              "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}):
    with pytest.raises(ValueError, match="depends on the sequence length"):
      ppl.prefix_perplexities(config.with_rope_scaling(spec), params, ids, [8])
