"""Passkey retrieval: the paper's prompt, the k grid and fill, k_max, and both modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from pi_jax.evals import passkey

TINY = pi_jax.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def test_prompt_is_the_papers_template():
  # PI (arXiv 2306.15595) §3.3 / Mohtashami & Jaggi 2023, written out by hand for key 12345,
  # two filler groups before the key line and one after.
  want = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
          "memorize them. I will quiz you about the important information there. The grass is "
          "green. The sky is blue. The sun is yellow. Here we go. There and back again. The "
          "grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
          " The pass key is 12345. Remember it. 12345 is the pass key. The grass is green. The "
          "sky is blue. The sun is yellow. Here we go. There and back again. What is the pass "
          "key? The pass key is")
  assert passkey.passkey_prompt(12345, 2, 1).encode() == want.encode()


@pytest.mark.parametrize("ks,acc,want", [
    ([0, 256, 512, 768], [1.0, 0.5, 0.2, 0.1], 512),  # 0.2 counts, 0.1 does not
    ([0, 256, 512, 768], [1.0, 0.0, 1.0, 1.0], 0),  # every k' <= k must pass, not just k
    ([0, 256, 512, 768], [0.1, 1.0, 1.0, 1.0], None),  # even the nearest k fails
    ([0, 256, 512, 768], [0.3, 0.3, 0.3, 0.3], 768),
    ([768, 0, 512, 256], [1.0, 1.0, 0.0, 1.0], 256),  # order of the table does not matter
])
def test_effective_window_rule(ks, acc, want):
  assert passkey.effective_window(ks, acc) == want


def test_depth_grid_is_evenly_spaced_over_length():
  assert passkey.depth_grid(8192, 4) == [0, 2048, 4096, 6144]
  assert len(passkey.depth_grid(4096, 32)) == 32 and passkey.depth_grid(4096, 32)[1] == 128


def test_prompts_fill_length_and_place_key_at_k():
  tok = pi_jax.ByteTokenizer()
  builder = passkey.PromptBuilder(tok)
  filler = len(passkey.FILLER)
  for length in (600, 1500):
    for k in passkey.depth_grid(length, 5):
      t = builder.trial(length, k, 12345)
      assert length - filler < len(t.ids) <= length  # as long as fits
      text = tok.decode(t.ids)
      n_before = text.split(" The pass key is 12345")[0].count("grass")
      n_after = text.split("12345 is the pass key.")[1].count("grass")
      assert text == passkey.passkey_prompt(12345, n_before, n_after)
      # the measured k: tokens from the key's first token to the end
      assert t.actual_k == len(t.ids) - text.index(" 12345. Remember") - 1
      # Reachable k: past the tail that follows the key, before the task line.
      if 100 <= k <= length - len(passkey.TASK) - filler:
        assert abs(t.actual_k - k) <= filler / 2 + 1
      assert tok.decode(t.key_ids) == " 12345"
  with pytest.raises(ValueError, match="shorter than the prompt"):
    builder.trial(100, 0, 12345)


def _trials(depths=3, num=2):
  return passkey.PromptBuilder(pi_jax.ByteTokenizer()).trials([400, 700], depths, num, seed=1)


def test_score_mode_equals_forward_argmax():
  params = pi_jax.init_params(TINY, jax.random.key(0))
  tok = pi_jax.ByteTokenizer()
  trials = _trials()
  got = passkey.run_trials(TINY, params, tok, trials, mode="score", batch_size=4)
  assert len(got) == len(trials) == 12
  for t, r in zip(trials[:3], got[:3]):  # brute force: full forward of prompt + key
    seq = jnp.asarray([list(t.ids + t.key_ids)], jnp.int32)
    logp = jax.nn.log_softmax(pi_jax.forward(TINY, params, seq)[0], -1)
    rows = np.arange(len(t.ids) - 1, len(t.ids) - 1 + len(t.key_ids))
    want_logp = float(sum(logp[i, k] for i, k in zip(rows, t.key_ids)))
    want_hit = all(int(jnp.argmax(logp[i])) == k for i, k in zip(rows, t.key_ids))
    assert r["key_logprob"] == pytest.approx(want_logp, rel=1e-5)
    assert r["success"] == want_hit


def test_generate_mode_success_rule_and_summary():
  tok = pi_jax.ByteTokenizer()
  trials = _trials()
  keys_by_prompt = {t.ids: t.key for t in trials}

  def oracle(config, params, prompt_BL, max_new, *, temperature, eos_id):
    """Answers the true key for prompts of 400-token trials, a wrong one otherwise."""
    out = []
    for row in np.asarray(prompt_BL):
      key = keys_by_prompt[tuple(int(i) for i in row)]
      text = f" {key}." if len(row) <= 400 else f" {key + 1}."
      out.append(tok.encode(text, add_bos=False)[:max_new])
    return np.asarray(out, np.int32)

  got = passkey.run_trials(TINY, None, tok, trials, mode="generate", batch_size=2,
                           generate_fn=oracle)
  assert [r["success"] for r in got] == [r["length"] == 400 for r in got]
  summary = passkey.summarize(got)
  s400 = summary[400]
  assert s400["nominal_k"] == [0, 133, 266] and s400["accuracy"] == [1.0, 1.0, 1.0]
  # k is the real distance: the mean measured k of the grid point's trials, not the grid value
  for k, nominal in zip(s400["k"], s400["nominal_k"]):
    want = np.mean([r["actual_k"] for r in got if r["length"] == 400 and r["k"] == nominal])
    assert k == round(want)
  assert s400["k"][0] > 0 and s400["nearest_k"] == s400["k"][0]  # the key line + question
  assert s400["k_max"] == s400["k"][-1] and "every distance passes" in s400["verdict"]
  assert summary[700]["mean_accuracy"] == 0.0 and summary[700]["k_max"] is None
  assert summary[700]["verdict"].startswith("no distance passes")


def test_summary_says_what_k_max_hides_when_the_nearest_distance_fails():
  # SmolLM2's pattern: the nearest distance (~31 tokens) fails, farther ones pass
  results = [{"length": 1000, "k": k, "actual_k": k + 31, "success": ok}
             for k, ok in ((0, False), (0, False), (250, True), (250, False), (500, False),
                           (500, False), (750, True), (750, True))]
  s = passkey.summarize(results)[1000]
  assert s["k"] == [31, 281, 531, 781] and s["accuracy"] == [0.0, 0.5, 0.0, 1.0]
  assert s["k_max"] is None and s["nearest_k"] == 31 and not s["nearest_passes"]
  assert s["largest_passing_k"] == 781 and s["far_run_from"] == 781 and s["passing"] == 2
  assert s["verdict"] == ("nearest distance k = 31 fails, so k_max is undefined; largest "
                          "passing k = 781; every k >= 781 passes")
  from pi_jax.evals import report
  table = report.passkey_table([{"rope_scaling": "none", "lengths": {1000: s}}])
  assert "| none | 1000 | 0.38 | – | 781 | 781 | 2/4 | 31:0.0 281:0.5 531:0.0 781:1.0 |" in table
  assert "- none, length 1000: nearest distance k = 31 fails" in table
  assert "None" not in table and "null" not in table


def test_generate_mode_runs_the_real_decoder():
  params = pi_jax.init_params(TINY, jax.random.key(0))
  tok = pi_jax.ByteTokenizer()
  trials = _trials(depths=1, num=1)
  got = passkey.run_trials(TINY, params, tok, trials, mode="generate", batch_size=1)
  assert len(got) == 2
  for g, t in zip(got, trials):
    # greedy decoding: the first new token is the argmax after the whole prompt
    logits = pi_jax.forward(TINY, params, jnp.asarray([list(t.ids)], jnp.int32))[0, -1]
    assert g["output_ids"][0] == int(jnp.argmax(logits))
    assert g["success"] == tok.decode(g["output_ids"]).lstrip().startswith(str(t.key))
