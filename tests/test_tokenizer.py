"""Tokenizer kinds (bytes, tokenizer.json, tokenizer.model) against transformers' tokenizers."""

import glob
import json
import os

import pytest

import pi_jax
from pi_jax.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def real_text(n_chars=3000):
  """Book text and LaTeX from the repository's stand-in corpora."""
  book = open(sorted(glob.glob(os.path.join(ROOT, "data/pg19_standin/*.txt")))[0]).read()
  tex = open(sorted(glob.glob(os.path.join(ROOT, "data/proofpile_standin/*.tex")))[0]).read()
  return book[:n_chars], tex[:n_chars]


def train_sentencepiece(folder, vocab_size=400):
  """A small LLaMA-style (BPE, byte fallback, no normalization) sentencepiece model trained on
  the stand-in corpora; returns its path."""
  import sentencepiece as spm
  os.makedirs(folder, exist_ok=True)
  book, tex = real_text(20000)
  corpus = os.path.join(folder, "corpus.txt")
  with open(corpus, "w") as f:
    f.write(book + "\n" + tex)
  prefix = os.path.join(folder, "sp")
  spm.SentencePieceTrainer.Train(input=corpus, model_prefix=prefix, vocab_size=vocab_size,
                                 model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2,
                                 unk_id=0, byte_fallback=True, normalization_rule_name="identity",
                                 remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
  return prefix + ".model"


def test_byte_tokenizer_round_trip(tmp_path):
  tok = ByteTokenizer()
  ids = tok.encode("héllo")
  assert ids[0] == tok.bos_id and tok.decode(ids) == "héllo"
  assert tok.encode("a", add_bos=False) == [97]
  tok.save(str(tmp_path / "tokenizer"))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, ByteTokenizer) and loaded.add_bos


def _write_bpe_tokenizer_json(folder, adds_bos):
  """A byte-level BPE tokenizer.json trained on real text; BOS added by its post-processor."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(real_text(20000)), trainer)
  if adds_bos:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>"}, f)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_tokenizer_json_matches_transformers(tmp_path, adds_bos):
  from transformers import AutoTokenizer
  _write_bpe_tokenizer_json(tmp_path / "tokenizer", adds_bos)
  tok = load_tokenizer(str(tmp_path))
  ref = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
  assert isinstance(tok, HFTokenizer) and tok.add_bos == adds_bos
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  for text in real_text(2000):
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"]
    assert (ids[0] == 1) == adds_bos
    assert tok.encode(text, add_bos=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_tokenizer_config_add_bos_overrides_post_processor(tmp_path):
  _write_bpe_tokenizer_json(tmp_path / "tokenizer", adds_bos=False)
  cfg_file = tmp_path / "tokenizer" / "tokenizer_config.json"
  cfg = json.load(open(cfg_file))
  json.dump({**cfg, "add_bos_token": True}, open(cfg_file, "w"))
  tok = load_tokenizer(str(tmp_path))
  assert tok.add_bos and tok.encode("abc")[0] == 1


def test_sentencepiece_matches_transformers_llama_tokenizer(tmp_path):
  from transformers import AutoTokenizer
  sp_file = train_sentencepiece(tmp_path / "sp")
  os.makedirs(tmp_path / "tokenizer")
  os.replace(sp_file, tmp_path / "tokenizer" / "tokenizer.model")
  tok = load_tokenizer(str(tmp_path))
  assert isinstance(tok, SentencePieceTokenizer) and tok.add_bos
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 400)
  with open(tmp_path / "tokenizer" / "tokenizer_config.json", "w") as f:  # for transformers
    json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
               "unk_token": "<unk>", "add_bos_token": True, "legacy": True}, f)
  ref = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
  for text in real_text(2000):
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.encode(text, add_bos=False) == ids[1:]
    assert ids == ref(text)["input_ids"]
    assert tok.decode(ids) == text


def test_missing_tokenizer_names_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer found"):
    load_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    load_tokenizer(str(tmp_path))


def test_exported_in_package():
  assert pi_jax.load_tokenizer is load_tokenizer
