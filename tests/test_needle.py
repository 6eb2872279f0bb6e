"""Needle tests (RULER's families): prompts, scoring, the summary and eval.py needle end to end."""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pi_jax
from pi_jax.evals import needle, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import eval as eval_cli  # noqa: E402  (the top-level script)

TINY = pi_jax.ModelConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=2048)
# A haystack of short numbered sentences: where a needle went can be read off the text.
HAY = " ".join(f"Sentence number {i} is here." for i in range(400))
LENGTH = 1500


@pytest.fixture(scope="module")
def builder():
  tok = pi_jax.ByteTokenizer()
  return needle.PromptBuilder(tok, needle.Haystack(tok, [("hay", HAY)]))


def test_sentences_split_at_ends_and_blank_lines_and_long_ones_are_cut():
  text = ('He said "Go." Then he went!  Why?\n\nA new\nparagraph without an end\n\n'
          + " ".join(["word"] * 60) + ".")
  got = needle.split_sentences(text)
  assert got[:5] == ['He said "Go."', "Then he went!", "Why?", "A new paragraph without an end",
                     " ".join(["word"] * 24)]
  assert [len(s.split()) for s in got[4:]] == [24, 24, 12] and got[-1].endswith("word.")


def _answers_from_text(task, text):
  """Answers derived from the prompt text alone (an independent reader of the prompt)."""
  if task == "vartrack":
    value = re.search(r"assigned the value (\d+) in the text", text).group(1)
    assign = dict(re.findall(r" VAR ([A-Z]{5}) = ([A-Z0-9]+)\.", text))
    def resolve(name):
      while name in assign:
        name = assign[name]
      return name
    return sorted(n for n in assign if resolve(n) == value)
  pairs = re.findall(r" One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", text)
  question = text[text.rindex(" What"):]
  asked = re.match(r" What (?:is|are all) the special magic numbers? for (.+?) mentioned in the "
                   r"text above\?", question)
  keys = re.split(r", | and ", asked.group(1))
  return sorted(v for k, v in pairs if k in keys)


@pytest.mark.parametrize("task", needle.TASKS)
def test_prompts_fit_place_the_needle_at_the_depth_and_hold_their_answers(builder, task):
  tok = builder.tok
  head = len(tok.encode("")) + len(tok.encode(needle.NUMBERS_TASK if task != "vartrack"
                                              else needle.VARS_TASK, add_bos=False))
  for depth in (0.0, 25.0, 50.0, 75.0, 100.0):
    t = builder.trial(task, LENGTH, depth, trial=1, seed=3)
    assert len(t.ids) + t.new_tokens == LENGTH  # nothing the model sees or writes is past L
    text = tok.decode(t.ids)
    assert sorted(t.answers) == _answers_from_text(task, text)
    for n in t.needles:
      assert text.count(n) == 1
    # the asked needle sits where needle_pos says, at the requested depth of the haystack:
    # haystack tokens before it (all but the other needles) / all haystack tokens
    assert tok.decode(t.ids[t.needle_pos:]).startswith(
        t.needles[0] if task != "multiquery" else t.needles[0])
    needle_tokens = sum(len(tok.encode(n, add_bos=False)) for n in t.needles)
    haystack = len(t.ids) - head - needle_tokens - len(tok.encode(
        text[text.rindex(" What" if task != "vartrack" else " Find"):], add_bos=False))
    before = tok.decode(t.ids[head:t.needle_pos])
    for n in t.needles:
      before = before.replace(n, "")
    hay_before = len(tok.encode(before, add_bos=False))
    assert abs(100.0 * hay_before / haystack - t.actual_depth) < 0.01
    sentence = len(" Sentence number 100 is here.")
    assert abs(hay_before - depth / 100 * haystack) <= sentence / 2 + 1
    assert t.distance == len(t.ids) - t.needle_pos


def test_vartrack_chain_reads_in_order_after_the_depth(builder):
  t = builder.trial("vartrack", LENGTH, 30.0, seed=5)
  text = builder.tok.decode(t.ids)
  positions = [text.index(f" VAR {name} =") for name in t.answers]
  assert positions == sorted(positions) and len(t.answers) == 5
  assert positions[0] == len(builder.tok.decode(t.ids[:t.needle_pos]))
  distractor_value = re.findall(r" VAR [A-Z]{5} = (\d+)\.", text)
  assert len(distractor_value) == 2 and len(set(distractor_value)) == 2  # two chains


def test_prompts_are_deterministic_given_the_seed(builder):
  a = builder.trials(["multikey", "vartrack"], [900], 2, 2, seed=7)
  b = builder.trials(["multikey", "vartrack"], [900], 2, 2, seed=7)
  c = builder.trials(["multikey", "vartrack"], [900], 2, 2, seed=8)
  assert [t.ids for t in a] == [t.ids for t in b]
  assert all(x.ids != y.ids for x, y in zip(a, c))
  assert len({t.ids for t in a}) == len(a)  # every trial draws its own needles


def test_short_haystack_wraps_and_a_too_short_length_is_refused():
  tok = pi_jax.ByteTokenizer()
  b = needle.PromptBuilder(tok, needle.Haystack(tok, [("short", "Only one sentence here.")]))
  t = b.trial("single", 1200, 50.0)
  assert len(t.ids) + t.new_tokens == 1200
  assert tok.decode(t.ids).count("Only one sentence here.") > 10
  with pytest.raises(ValueError, match="needle length 200 is too short for task multikey"):
    b.trial("multikey", 200, 50.0)
  with pytest.raises(ValueError, match="no sentences"):
    needle.Haystack(tok, [("empty.txt", " \n\n ")])
  with pytest.raises(ValueError, match="unknown task 'needles'"):
    needle.parse_tasks("single,needles")


def _trial_results(builder, generate_fn, tasks=("single", "multivalue")):
  trials = builder.trials(list(tasks), [700, 900], 3, 2, seed=0)
  return trials, needle.run_trials(TINY, None, builder.tok, trials, batch_size=2,
                                   generate_fn=generate_fn)


def test_scoring_is_string_match_of_every_answer(builder):
  tok = builder.tok
  answers = {}

  def oracle(config, params, prompt_BL, max_new, *, temperature, eos_id):
    """All answers at 700 tokens, only the first at 900 (where several are asked)."""
    out = []
    for row in np.asarray(prompt_BL):
      t = answers[tuple(int(i) for i in row)]
      got = t.answers if t.length == 700 else t.answers[:1]
      ids = tok.encode(" " + ", ".join(got) + ".", add_bos=False)
      assert temperature == 0.0 and len(ids) <= max_new == t.new_tokens
      out.append(ids + [eos_id] * (max_new - len(ids)))
    return np.asarray(out, np.int32)

  trials = builder.trials(["single", "multivalue"], [700, 900], 3, 2, seed=0)
  answers.update({t.ids: t for t in trials})
  got = needle.run_trials(TINY, None, tok, trials, batch_size=2, generate_fn=oracle)
  assert [(r["task"], r["length"], r["depth"], r["trial"]) for r in got] == [
      (t.task, t.length, t.depth, t.trial) for t in trials]
  for r in got:
    full = r["length"] == 700 or r["task"] == "single"
    assert r["success"] == full and r["recall"] == (1.0 if full else 0.25)
  s = needle.summarize(got)
  assert s["single"]["max_length"] == 900 and s["multivalue"]["max_length"] == 700
  assert s["multivalue"]["lengths"][900]["recall"] == [0.25] * 3
  assert s["multivalue"]["verdict"] == "max_length = 700; first failing length 900"
  assert needle.score("the numbers are 1, 22 and 333", ["22", "333"]) == {"success": True,
                                                                         "recall": 1.0}


def test_summary_when_the_nearest_depth_fails():
  rows = [(0.0, 900, [True, True]), (50.0, 500, [True, False]), (100.0, 100, [False, False])]
  results = [{"task": "single", "length": 1000, "depth": d, "distance": k, "success": ok,
              "recall": float(ok), "actual_depth": d} for d, k, oks in rows for ok in oks]
  results += [dict(r, length=500, success=True, recall=1.0) for r in results]
  s = needle.summarize(results, threshold=0.5)["single"]
  c = s["lengths"][1000]
  assert c["k"] == [900, 500, 100] and c["accuracy"] == [1.0, 0.5, 0.0]
  assert c["k_max"] is None and c["nearest_k"] == 100 and c["far_run_from"] == 500
  assert c["verdict"] == ("nearest distance k = 100 fails, so k_max is undefined; largest "
                          "passing k = 900; every k >= 500 passes")
  assert s["lengths"][500]["k_max"] == 900 and s["max_length"] == 500
  table = report.needle_table([{"rope_scaling": "linear:2", "tasks": {"single": s}}])
  assert "| linear:2 | single | 1000 | 0.50 | – | 500 | 2/3 | 0% (900): 1.00 50% (500): " \
         "0.50 100% (100): 0.00 |" in table
  assert "- linear:2, single, length 1000: nearest distance k = 100 fails" in table
  assert "None" not in table


def test_generate_runs_the_real_decoder(builder):
  params = pi_jax.init_params(TINY, jax.random.key(0))
  t = builder.trial("single", 600, 50.0)
  (r,) = needle.run_trials(TINY, params, builder.tok, [t])
  logits = pi_jax.forward(TINY, params, jnp.asarray([list(t.ids)], jnp.int32))[0, -1]
  first = builder.tok.decode([int(jnp.argmax(logits))])
  assert r["output"].startswith(first) and r["success"] == (t.answers[0] in r["output"])


TINY_BASE = os.path.join(REPO, "assets", "tiny_base")


def test_cli_writes_json_table_and_plot(tmp_path, capsys):
  out_json, out_png = tmp_path / "n.json", tmp_path / "n.png"
  args = ["needle", "--ckpt", TINY_BASE, "--haystack", "pg19_standin", "--tasks",
          "single,vartrack", "--lengths", "600,800", "--depths", "2", "--trials", "1",
          "--rope-scaling", "linear:8", "--no-progress", "--json", str(out_json),
          "--plot", str(out_png)]
  assert eval_cli.main(args) == 0
  captured = capsys.readouterr()
  assert "needle: 8 prompts = 2 tasks × 2 lengths × 2 depths × 1 trials" in captured.err
  out = json.load(open(out_json))
  assert out["task"] == "needle" and out["command"].startswith("eval.py needle")
  assert out["settings"]["depths"] == [0.0, 100.0] and out["settings"]["haystack_documents"] == 150
  run = out["runs"][0]
  assert run["rope_scaling"] == "linear:8" and run["model_window"] == 1024
  assert list(run["tasks"]) == ["single", "vartrack"] and len(run["trials"]) == 8
  for r in run["trials"]:
    assert r["tokens"] < r["length"] and r["success"] == all(a in r["output"] for a in r["answers"])
  for task, s in run["tasks"].items():
    assert list(s["lengths"]) == ["600", "800"]
    assert out["max_length"]["linear:8"][task] == s["max_length"]
  assert "| linear:8 | vartrack | 800 |" in captured.out and "/work" not in json.dumps(out)
  with open(out_png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # report: one file per length merge back into the same table (max_length recomputed)
  parts = []
  for length in ("600", "800"):
    part = json.loads(json.dumps(out))
    for s in part["runs"][0]["tasks"].values():
      s["lengths"] = {length: s["lengths"][length]}
      s["max_length"] = s["verdict"] = None
    parts.append(str(tmp_path / f"n{length}.json"))
    with open(parts[-1], "w") as f:
      json.dump(part, f)
  assert eval_cli.main(["report", *parts[::-1], "--plot", str(tmp_path / "merged.png")]) == 0
  assert capsys.readouterr().out.strip() == captured.out.strip()
  assert eval_cli.main(["report", parts[0], parts[0]]) == 2
  assert "both have" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--haystack", "EMPTY", "--tasks", "single", "--lengths", "100"],
     "--haystack EMPTY: no text, every document is empty"),
    (["--haystack", "pg19_standin", "--tasks", "single,needles"], "unknown task 'needles'"),
    (["--haystack", "pg19_standin", "--tasks", "single", "--lengths", "4096"],
     "--lengths 4096 is beyond the window of"),
    (["--haystack", "pg19_standin", "--tasks", "multiquery", "--lengths", "100"],
     "needle length 100 is too short for task multiquery"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, message):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n")
  extra = [str(empty) if a == "EMPTY" else a for a in extra]
  json_out = tmp_path / "n.json"
  code = eval_cli.main(["needle", "--ckpt", TINY_BASE, *extra, "--no-progress",
                        "--json", str(json_out)])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith("eval.py needle: error: ") and message.replace("EMPTY", str(empty)) in err
  if "beyond the window" in message:
    assert "--rope-scaling linear:32" in err and "--allow-beyond-window" in err
  if "EMPTY" in message:
    assert "empty.txt" in err
  assert not json_out.exists()
