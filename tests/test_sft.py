"""Prompt/completion fine-tuning data (issue 25): SmolLM2-Instruct's chat template renders the
examples, only completion tokens are targets, `prepare --format sft` stores tokens, example
boundaries and loss masks, and the store reads back as the same packed rows; bad input is one
line naming the row, line or checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from convert import fetch
from pi_jax.data import packing, sft
from pi_jax.tokenizer import load_tokenizer
from pi_jax.train import pipeline
from pi_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [
    {"prompt": "What is 2 + 2?", "completion": "4."},
    {"prompt": "Name a colour.", "completion": "Blue, like the sea on a clear day."},
    {"prompt": "Translate 'chat' from French.", "completion": "Cat."},
    {"prompt": "Summarize: " + "the report says costs rose. " * 12, "completion": "Costs rose."},
]
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]


@pytest.fixture(scope="module")
def smollm2():
  return fetch.smollm2_checkpoint()


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _hf_tokenizer(checkpoint):
  from tokenizers import Tokenizer
  return Tokenizer.from_file(os.path.join(checkpoint, "tokenizer", "tokenizer.json"))


def test_completion_flags_cover_exactly_the_assistant_turns(smollm2, tmp_path):
  """The ids are those of the whole rendered conversation tokenized at once (transformers'
  apply_chat_template), and the flagged tokens decode to the assistant turns with their end."""
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(os.path.join(smollm2, "tokenizer"))
  raw = _hf_tokenizer(smollm2)
  path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
  ((where, ids, flags),) = sft.encode_file(path, smollm2)
  assert where.endswith("line 1")
  want = hf.apply_chat_template(CONVERSATION, tokenize=True)
  want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding
  assert ids.tolist() == list(want)
  runs, cur = [], []
  for i, f in zip(ids.tolist(), flags.tolist()):
    if f:
      cur.append(i)
    elif cur:
      runs.append(cur)
      cur = []
  runs.append(cur) if cur else None
  assert [raw.decode(r, skip_special_tokens=False) for r in runs] == [
      "Hello.<|im_end|>\n", "Goodbye!<|im_end|>\n"]


def test_prompt_completion_rows_are_a_user_and_an_assistant_turn(smollm2, tmp_path):
  path = _write_jsonl(tmp_path / "pc.jsonl", EXAMPLES[:1])
  ((_, ids, flags),) = sft.encode_file(path, smollm2)
  raw = _hf_tokenizer(smollm2)
  text = raw.decode(ids.tolist(), skip_special_tokens=False)
  assert text.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n4."
                       "<|im_end|>\n")
  assert raw.decode(ids[flags > 0].tolist(), skip_special_tokens=False) == "4.<|im_end|>\n"


def test_prepare_sft_store_reads_as_the_same_packed_rows(smollm2, tmp_path):
  path = _write_jsonl(tmp_path / "train.jsonl", EXAMPLES * 3)
  out = tmp_path / "store"
  proc = subprocess.run([sys.executable, "-m", "pi_jax.data", "prepare", path, str(out),
                         "--format", "sft", "--tokenizer", smollm2, "--no-progress"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "12 SFT examples" in proc.stdout
  encoded = sft.encode_file(path, smollm2)
  want = packing.DocumentRows(packing.InMemoryDocuments([e[1] for e in encoded],
                                                        [e[2] for e in encoded]), seq_len=63)
  config = TrainConfig(data=str(out), init_checkpoint=smollm2, seq_len=63, global_batch=2,
                       packing="documents")
  data = pipeline.load_train_data(config, load_tokenizer(smollm2), 49152)
  assert data.packed.plan.skipped == 3 and data.packed.plan.truncated == 0  # the long prompts
  assert data.packed.num_train == want.num_train
  every = range(want.num_train)
  np.testing.assert_array_equal(data.packed.rows(every), want.rows(every))
  # Trained with packing=concat, the store is refused with the setting to use.
  with pytest.raises(ValueError, match="holds SFT examples .* packing=documents"):
    pipeline.load_train_data(config.replace(packing="concat"), load_tokenizer(smollm2), 49152)


def test_parquet_rows(smollm2, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(EXAMPLES[:2]), tmp_path / "x.parquet")
  jsonl = sft.encode_file(_write_jsonl(tmp_path / "x.jsonl", EXAMPLES[:2]), smollm2)
  parquet = sft.encode_file(str(tmp_path / "x.parquet"), smollm2)
  assert [w.rsplit(": ", 1)[1] for w, _, _ in parquet] == ["row 1", "row 2"]
  for (_, a, fa), (_, b, fb) in zip(jsonl, parquet):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)


@pytest.mark.parametrize("rows,message", [
    ([EXAMPLES[0], {"messages": CONVERSATION}],
     r"x.jsonl: line 2: a messages row, but .*line 1 is a prompt/completion row"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
     r"x.jsonl: line 1: message 2 has role 'bot'; the roles are system, user, assistant"),
    ([EXAMPLES[0], {"prompt": "a"}], r"x.jsonl: line 2: 'completion' must be a string"),
    ([{"text": "a"}], r"x.jsonl: line 1: a row needs 'prompt' and 'completion', or 'messages'"),
])
def test_bad_rows_name_the_line(smollm2, tmp_path, rows, message):
  path = _write_jsonl(tmp_path / "x.jsonl", rows)
  with pytest.raises(sft.SFTError, match=message):
    sft.encode_file(path, smollm2)


def test_checkpoint_without_a_chat_template_is_named(smollm2, tmp_path):
  folder = tmp_path / "notemplate"
  shutil.copytree(os.path.join(smollm2, "tokenizer"), folder / "tokenizer")
  os.remove(folder / "tokenizer" / "chat_template.jinja")
  path = _write_jsonl(tmp_path / "x.jsonl", EXAMPLES[:1])
  proc = subprocess.run([sys.executable, "-m", "pi_jax.data", "prepare", path,
                         str(tmp_path / "out"), "--format", "sft", "--tokenizer", str(folder)],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert f"checkpoint {folder} has no chat template" in proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out")


def test_prepare_sft_refuses_an_existing_store_unless_restart(smollm2, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", EXAMPLES[:2])
  out = str(tmp_path / "store")
  sft.prepare_sft(path, out, smollm2, progress_bar=False, log=lambda m: None)
  with pytest.raises(Exception, match="already holds a token store; pass --restart"):
    sft.prepare_sft(path, out, smollm2, progress_bar=False, log=lambda m: None)
  _write_jsonl(tmp_path / "x.jsonl", EXAMPLES[:3])
  summary = sft.prepare_sft(path, out, smollm2, restart=True, progress_bar=False,
                            log=lambda m: None)
  assert summary["examples"] == 3 and not os.path.exists(out + ".partial")
  from pi_jax.data import TokenStore
  assert TokenStore(out).num_documents == 3
