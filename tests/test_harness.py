"""pi_jax as an lm-eval model equals lm-eval's own `hf` backend (transformers on torch, CPU).

The local tasks in tests/data/harness (multiple choice, generation, rolling log-likelihood) run
through lm_eval.simple_evaluate twice: on PiJaxLM and on HFLM loading our HF export of the same
checkpoint. Per-request log-likelihoods agree to 1e-4 relative, greedy generations are equal,
and so are the metrics. Offline: no dataset or model is downloaded.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from convert import fetch, to_hf, to_pi_jax  # noqa: E402
from conftest import make_hf_model  # noqa: E402
from pi_jax.evals import harness  # noqa: E402
import train_utils as tu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "data", "harness")
# The SmolLM2 tests share one xdist worker with tests/test_smollm2.py (its conversion and HF
# export are set up once); the tiny-model tests spread over the others. Their fixtures are
# session-wide: the worker may run another module's tests between them, and a module fixture
# would then run both backends over again (62 s).
SMOLLM2 = pytest.mark.xdist_group("smollm2")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
  return fetch.smollm2_checkpoint()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2, tmp_path_factory):
  return to_hf.export(smollm2, str(tmp_path_factory.mktemp("hf") / "smollm2"))


def hf_lm(path, max_length, batch_size=1):
  from lm_eval.models.huggingface import HFLM
  return HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=batch_size,
              max_length=max_length)


def run(lm, tasks, limit=None):
  return harness.evaluate(lm, tasks, include_path=TASKS, limit=limit, log_samples=True)


def responses(out, task):
  """Per-document model responses, ordered by doc_id: [[resp per request], ...]."""
  samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
  return [[r[0] for r in s["resps"]] for s in samples]


def assert_loglikelihoods_equal(got, want):
  got_lp = np.array([[r[0] for r in doc] for doc in got], np.float64)
  want_lp = np.array([[r[0] for r in doc] for doc in want], np.float64)
  err = np.max(np.abs(got_lp - want_lp) / np.abs(want_lp))
  print(f"per-request log-likelihoods: max rel err {err:.2e} over {got_lp.size} requests")
  assert err <= 1e-4
  assert [[r[1] for r in doc] for doc in got] == [[r[1] for r in doc] for doc in want]


def metrics(out, task, names):
  return {n: out["results"][task][f"{n},none"] for n in names}


@pytest.fixture(scope="session")
def smollm2_runs(smollm2, smollm2_hf):
  """Both backends on all three tasks; max_length 64 so the rolling task has several windows
  and the longest multiple-choice request is left-truncated."""
  tasks = ["pijax_mc", "pijax_gen", "pijax_ppl"]
  ours = harness.PiJaxLM(smollm2, max_length=64, batch_size=4, progress=False)
  got = run(ours, tasks)
  want = run(hf_lm(smollm2_hf, 64), tasks)
  return ours, got, want


@SMOLLM2
def test_smollm2_multiple_choice_equals_hf(smollm2_runs):
  ours, got, want = smollm2_runs
  assert_loglikelihoods_equal(responses(got, "pijax_mc"), responses(want, "pijax_mc"))
  assert metrics(got, "pijax_mc", ["acc", "acc_norm"]) == metrics(want, "pijax_mc",
                                                                  ["acc", "acc_norm"])
  # A handful of compiled programs, not one per request (18 requests).
  assert len([s for s in ours.compiled_shapes if s[0] == "loglikelihood"]) <= 4


@SMOLLM2
def test_smollm2_greedy_generation_equals_hf(smollm2_runs):
  _, got, want = smollm2_runs
  ours, theirs = responses(got, "pijax_gen"), responses(want, "pijax_gen")
  print("generations:", ours)
  assert ours == theirs
  assert any(text.strip() for [text] in ours)
  assert metrics(got, "pijax_gen", ["exact_match"]) == metrics(want, "pijax_gen", ["exact_match"])


@SMOLLM2
def test_smollm2_rolling_loglikelihood_equals_hf(smollm2_runs):
  _, got, want = smollm2_runs
  ours = np.array(responses(got, "pijax_ppl"), np.float64)
  theirs = np.array(responses(want, "pijax_ppl"), np.float64)
  assert np.max(np.abs(ours - theirs) / np.abs(theirs)) <= 1e-4
  for name in ["word_perplexity", "byte_perplexity", "bits_per_byte"]:
    a = got["results"]["pijax_ppl"][f"{name},none"]
    b = want["results"]["pijax_ppl"][f"{name},none"]
    assert abs(a - b) <= 1e-4 * abs(b), name


@SMOLLM2
def test_truncation_is_counted_as_lm_eval_truncates(smollm2):
  from lm_eval.api.instance import Instance
  lm = harness.PiJaxLM(smollm2, max_length=8, progress=False)
  long_ctx = "one two three four five six seven eight nine ten eleven twelve"
  reqs = [Instance("loglikelihood", {}, (ctx, " end"), 0) for ctx in (long_ctx, "one")]
  [(lp_long, _), _] = lm.loglikelihood(reqs)
  assert lm.truncated_requests["loglikelihood"] == 1
  ctx, cont = lm._encode_pair(long_ctx, " end")
  [(want, _)] = lm._loglikelihood_tokens([(None, (ctx + cont)[-9:-len(cont)], cont)], count=False)
  assert abs(lp_long - want) <= 1e-6 * abs(want)


@SMOLLM2
def test_sliding_rolling_reuses_perplexity(smollm2):
  """rolling_stride=S is pi_jax.evals.perplexity's sliding window: equal to its brute force."""
  import pi_jax
  from lm_eval.api.instance import Instance
  from pi_jax.evals import perplexity as ppl
  lm = harness.PiJaxLM(smollm2, max_length=32, rolling_stride=8, progress=False)
  text = json.loads(open(os.path.join(TASKS, "pijax_ppl.jsonl")).readline())["text"]
  [got] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  ids = np.asarray([lm.prefix_token_id] + lm.tok_encode(text), np.int32)
  want = -ppl.reference_nll(lm.config, lm.params, ids, 32, 8).sum()
  assert abs(got - want) <= 1e-4 * abs(want)
  assert pi_jax  # the library import stays lm_eval-free (test_layering)


@pytest.fixture(scope="module")
def scaled_tiny(smollm2, tmp_path_factory):
  """A tiny random model with SmolLM2's tokenizer and a 32-token window, extended to 128 by
  rope_scaling=linear:4: (pi_jax checkpoint, HF export of the scaled checkpoint)."""
  import pi_jax
  root = tmp_path_factory.mktemp("tiny")
  make_hf_model(root / "hf", vocab_size=49152, bos_token_id=1, eos_token_id=2)
  for name in os.listdir(os.path.join(smollm2, "tokenizer")):
    shutil.copy(os.path.join(smollm2, "tokenizer", name), root / "hf" / name)
  base = str(root / "base")
  to_pi_jax.convert(str(root / "hf"), base)
  config, params = pi_jax.load_checkpoint(base)
  scaled = str(root / "scaled")
  pi_jax.save_checkpoint(scaled, config.with_rope_scaling("linear:4"), params)
  shutil.copytree(os.path.join(base, "tokenizer"), os.path.join(scaled, "tokenizer"))
  return base, to_hf.export(scaled, str(root / "scaled_hf"))


def test_linear_scaling_past_the_window_equals_hf(scaled_tiny):
  base, scaled_hf = scaled_tiny
  lm = harness.PiJaxLM(base, rope_scaling="linear:4", batch_size=2, progress=False)
  assert lm.max_length == 128
  got = run(lm, ["pijax_mc", "pijax_ppl"])
  want = run(hf_lm(scaled_hf, 128), ["pijax_mc", "pijax_ppl"])
  assert_loglikelihoods_equal(responses(got, "pijax_mc"), responses(want, "pijax_mc"))
  ours = np.array(responses(got, "pijax_ppl"), np.float64)
  theirs = np.array(responses(want, "pijax_ppl"), np.float64)
  assert np.max(np.abs(ours - theirs) / np.abs(theirs)) <= 1e-4
  # Some request runs past the original 32-token window.
  assert max(len(lm.tok_encode(json.loads(line)["text"]))
             for line in open(os.path.join(TASKS, "pijax_ppl.jsonl"))) > 32


EIGHT_DEVICES = """
import json, sys
from pi_jax.evals import harness
out = {}
for mesh in (None, "data:8"):
  lm = harness.PiJaxLM(sys.argv[1], rope_scaling="linear:4", batch_size=3, mesh=mesh,
                       progress=False)
  r = harness.evaluate(lm, ["pijax_mc", "pijax_gen", "pijax_ppl"], include_path=sys.argv[2],
                       log_samples=True)
  out[str(mesh)] = {t: [s["resps"] for s in sorted(r["samples"][t], key=lambda s: s["doc_id"])]
                    for t in r["samples"]}
print("RESULT" + json.dumps(out))
"""


def test_eight_devices_equal_one(scaled_tiny):
  base, _ = scaled_tiny
  stdout = tu.run_on_devices(EIGHT_DEVICES, base, TASKS, marker="RESULT")
  out = json.loads(stdout.split("RESULT", 1)[1])
  one, eight = out["None"], out["data:8"]
  assert one["pijax_gen"] == eight["pijax_gen"]
  for task in ("pijax_mc", "pijax_ppl"):
    a = np.array([[r[0][0] if isinstance(r[0], list) else r[0] for r in doc] for doc in one[task]])
    b = np.array([[r[0][0] if isinstance(r[0], list) else r[0] for r in doc] for doc in eight[task]])
    assert np.max(np.abs(a - b) / np.abs(a)) <= 1e-5, task


def test_registered_and_model_args_map_to_the_constructor(scaled_tiny):
  from lm_eval.api.registry import get_model
  base, _ = scaled_tiny
  cls = get_model("pi_jax")
  assert cls is harness.PiJaxLM
  lm = cls.create_from_arg_string(f"checkpoint={base},rope_scaling=linear:4,max_length=96,"
                                  "batch_size=2,dtype=float32",
                                  {"batch_size": None, "max_batch_size": None, "device": None})
  assert (lm.max_length, lm.batch_size, lm.config.rope_scaling.factor) == (96, 2, 4.0)
  with pytest.raises(ValueError, match="unknown argument"):
    cls.create_from_arg_string(f"checkpoint={base},pretrained=x")


def test_sampled_generation_follows_gen_kwargs(scaled_tiny):
  from lm_eval.api.instance import Instance
  base, _ = scaled_tiny
  lm = harness.PiJaxLM(base, progress=False, seed=3)
  kw = {"until": ["\n\n"], "do_sample": True, "temperature": 1.0, "top_p": 0.9,
        "max_gen_toks": 8}
  req = [Instance("generate_until", {}, ("Once upon a time", kw), i) for i in range(4)]
  texts = lm.generate_until(req)
  assert len(set(texts)) > 1  # four samples of a random model differ
  greedy = {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 8}
  g = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", greedy), i)
                         for i in range(2)])
  assert g[0] == g[1]


def test_bad_input_messages(scaled_tiny, tmp_path):
  base, _ = scaled_tiny
  no_tok = tmp_path / "no_tok"
  shutil.copytree(base, no_tok, ignore=shutil.ignore_patterns("tokenizer"))
  with pytest.raises(ValueError, match=f"{no_tok} has no tokenizer"):
    harness.PiJaxLM(str(no_tok))
  shutil.copy(os.path.join(TASKS, "pijax_mc.yaml"), tmp_path / "mc.yaml")
  (tmp_path / "pijax_mc.json").write_text("")
  with pytest.raises(ValueError, match="pijax_mc.json holds no records"):
    harness.resolve_tasks(["pijax_mc"], str(tmp_path))
  (tmp_path / "pijax_mc.json").write_text("[{\"question\": ")
  with pytest.raises(ValueError, match="pijax_mc.json is not valid JSON"):
    harness.resolve_tasks(["pijax_mc"], str(tmp_path))


def test_layering_pi_jax_imports_without_lm_eval():
  code = ("import sys; import pi_jax, pi_jax.evals; "
          "assert 'lm_eval' not in sys.modules and 'pi_jax.evals.harness' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- Table 6: summarization + ROUGE ----------------------------------------------------------

def test_summaries_are_transformers_greedy_generations_and_rouge_is_rouge_score(scaled_tiny):
  import torch
  import transformers
  from rouge_score import rouge_scorer
  import pi_jax
  from pi_jax.data import summaries
  from pi_jax.evals import summarization
  base, scaled_hf = scaled_tiny
  config, params = pi_jax.load_checkpoint(base)
  config = config.with_rope_scaling("linear:4")
  tok = pi_jax.load_tokenizer(base)
  docs = summaries.load_documents(os.path.join(TASKS, "govreport_tiny.jsonl"))
  out = summarization.summarize(config, params, tok, docs, max_length=30, max_new_tokens=6)
  assert out["truncated"] == 2  # both reports are longer than 30 - 6 prompt tokens
  model = transformers.AutoModelForCausalLM.from_pretrained(scaled_hf, dtype=torch.float32).eval()
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  for doc, row in zip(docs, out["per_document"]):
    ids, cut = summaries.build_prompt(tok, doc["report"], summaries.DEFAULT_TEMPLATE, 24)
    assert cut and len(ids) == 24 and row["prompt_tokens"] == 24
    assert tok.decode(ids).endswith("\n\nSummary:")  # the instruction survives the cut
    with torch.no_grad():
      want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                            eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(ids):]
    want = want.tolist()
    want = want[:want.index(tok.eos_id)] if tok.eos_id in want else want
    assert row["prediction"] == tok.decode(want).strip()
    ref = scorer.score(doc["summary"], row["prediction"])
    assert abs(row["rouge1"] - ref["rouge1"].fmeasure * 100) < 1e-3
  assert abs(out["rouge"]["rougeL"] - np.mean([r["rougeL"] for r in out["per_document"]])) < 1e-3


# --- eval.py harness / summarize -------------------------------------------------------------

def _eval_cli():
  sys.path.insert(0, ROOT)
  import eval as eval_cli
  return eval_cli


def test_eval_harness_two_columns_json_table_plot(scaled_tiny, tmp_path, capsys):
  base, _ = scaled_tiny
  out_json, out_png = tmp_path / "h.json", tmp_path / "h.png"
  rc = _eval_cli().main(["harness", "--ckpt", base, "--rope-scaling", "none,linear:4",
                         "--tasks", "pijax_mc,pijax_ppl", "--include-path", TASKS,
                         "--max-length", "40", "--batch-size", "2", "--no-progress",
                         "--json", str(out_json), "--plot", str(out_png)])
  assert rc == 0
  table = capsys.readouterr().out
  assert "| pijax_mc | acc |" in table and "linear:4" in table
  record = json.loads(out_json.read_text())
  assert [r["model"]["rope_scaling"] for r in record["runs"]] == ["none", "linear:4"]
  assert record["command"].startswith("eval.py harness")
  assert all(r["model"]["max_length"] == 40 for r in record["runs"])
  # The 3-document perplexity task has requests past 40 tokens only as rolling windows (never
  # truncated); multiple-choice prompts here are shorter than 40.
  assert record["truncated_requests"]["none"] == {"loglikelihood": 0, "generate_until": 0}
  assert 0 <= record["runs"][0]["results"]["pijax_mc"]["acc,none"] <= 1
  assert out_png.stat().st_size > 0
  assert record["settings"]["include_path"] == "tests/data/harness"  # files.portable


def test_eval_harness_counts_truncated_requests(scaled_tiny, tmp_path):
  base, _ = scaled_tiny
  out_json = tmp_path / "t.json"
  assert _eval_cli().main(["harness", "--ckpt", base, "--tasks", "pijax_mc", "--include-path",
                           TASKS, "--max-length", "8", "--no-progress", "--json",
                           str(out_json)]) == 0
  record = json.loads(out_json.read_text())
  assert record["truncated_requests"]["none"]["loglikelihood"] == 18  # all 6 × 3 requests


def test_eval_summarize_json_and_plot(scaled_tiny, tmp_path, capsys):
  base, _ = scaled_tiny
  out_json = tmp_path / "s.json"
  rc = _eval_cli().main(["summarize", "--ckpt", base, "--rope-scaling", "linear:4", "--data",
                         os.path.join(TASKS, "govreport_tiny.jsonl"), "--max-length", "64",
                         "--max-new-tokens", "4", "--no-progress", "--json", str(out_json),
                         "--plot", str(tmp_path / "s.png")])
  assert rc == 0
  assert "ROUGE-1" in capsys.readouterr().out
  record = json.loads(out_json.read_text())
  assert record["runs"][0]["documents"] == 2 and set(record["runs"][0]["rouge"]) == {
      "rouge1", "rouge2", "rougeL"}


def _cli(args, **env):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], cwd=ROOT,
                        capture_output=True, text=True, env={**tu.subprocess_env(1), **env},
                        timeout=600)
  return proc.returncode, proc.stderr


def test_eval_harness_bad_input_is_one_line(scaled_tiny, tmp_path):
  base, _ = scaled_tiny
  rc, err = _cli(["harness", "--ckpt", base, "--tasks", "no_such_task", "--include-path", TASKS])
  assert rc == 2 and "Tasks not found: no_such_task" in err and "Traceback" not in err
  no_tok = tmp_path / "no_tok"
  shutil.copytree(base, no_tok, ignore=shutil.ignore_patterns("tokenizer"))
  rc, err = _cli(["harness", "--ckpt", str(no_tok), "--tasks", "pijax_mc", "--include-path",
                  TASKS])
  assert rc == 2 and f"{no_tok} has no tokenizer" in err and "Traceback" not in err
  bad = tmp_path / "tasks"
  bad.mkdir()
  shutil.copy(os.path.join(TASKS, "pijax_mc.yaml"), bad)
  (bad / "pijax_mc.json").write_text("[]")
  rc, err = _cli(["harness", "--ckpt", base, "--tasks", "pijax_mc", "--include-path", str(bad)])
  assert rc == 2 and "pijax_mc.json holds no records" in err and "Traceback" not in err
  rc, err = _cli(["summarize", "--ckpt", base, "--data", str(bad / "pijax_mc.json")])
  assert rc == 2 and "pijax_mc.json" in err and "Traceback" not in err


def test_eval_harness_without_lm_eval_says_how_to_install(tmp_path):
  code = ("import sys; sys.modules['lm_eval'] = None; sys.path.insert(0, '.'); import eval; "
          "sys.exit(eval.main(['harness', '--ckpt', 'x', '--tasks', 'boolq']))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        env=tu.subprocess_env(1))
  assert proc.returncode == 2
  assert "pip install pi_jax[harness]" in proc.stderr and "Traceback" not in proc.stderr


def test_table5_race_configs_index_and_render():
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import apply_template
  folder = os.path.join(ROOT, "configs", "lm_eval")
  manager = TaskManager(include_path=folder, include_defaults=False)
  assert {"race_middle", "race_high"} <= set(manager.all_tasks)
  cfg = harness.load_local_task(os.path.join(folder, "race_middle.yaml"))
  doc = {"article": "Tom has a red ball.", "question": "What color is the ball?",
         "options": ["blue", "red", "green", "black"], "answer": "B"}
  assert apply_template(cfg["doc_to_target"], doc) == "1"
  assert apply_template(cfg["doc_to_text"], doc).endswith("What color is the ball?\nAnswer:")


def test_lm_eval_own_command_line_runs_pi_jax(scaled_tiny, tmp_path):
  """`python -m pi_jax.evals.harness` is lm-eval's CLI with "pi_jax" registered (run from the
  task folder: lm-eval's loader reads relative data_files from the working directory)."""
  base, _ = scaled_tiny
  proc = subprocess.run(
      [sys.executable, "-m", "pi_jax.evals.harness", "--model", "pi_jax", "--model_args",
       f"checkpoint={base},rope_scaling=linear:4,progress=False", "--tasks", "pijax_mc",
       "--include_path", TASKS, "--limit", "2", "--batch_size", "2", "--output_path",
       str(tmp_path / "out")], cwd=TASKS, capture_output=True, text=True,
      env={**tu.subprocess_env(1), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "pijax_mc" in proc.stdout and "acc" in proc.stdout


def test_requests_sharing_a_row_equal_each_scored_alone(scaled_tiny):
  """Requests differing only in the last continuation token share one row (one forward)."""
  from lm_eval.api.instance import Instance
  base, _ = scaled_tiny
  lm = harness.PiJaxLM(base, rope_scaling="linear:4", batch_size=2, progress=False)
  pairs = [("The sky is", " blue"), ("The sky is", " red"), ("The sky is", " very blue"),
           ("The sky is", " very red"), ("Grass is", " green")]
  together = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
  alone = [lm.loglikelihood([Instance("loglikelihood", {}, p, 0)])[0] for p in pairs]
  for (a, ga), (b, gb) in zip(together, alone):
    assert abs(a - b) <= 1e-5 * abs(b) and ga == gb
  assert len({t for t, _ in together}) == len(pairs)
