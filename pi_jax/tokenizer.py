"""Tokenizers with one small interface, loaded from a checkpoint's `tokenizer/` folder.

Every tokenizer has:
  encode(text, add_bos=None) -> list[int]   add_bos=None: as the source model's tokenizer does
  encode_batch(texts, add_bos=None) -> list[list[int]]
  decode(ids) -> str
  fingerprint() -> str                      changes whenever encode() could give other ids
  bos_id, eos_id (int or None), vocab_size, add_bos (bool: BOS is prepended by default)

Kinds, by the file found in CKPT/tokenizer/:
  bytes.json      ByteTokenizer: UTF-8 bytes 0..255, then BOS/EOS; for the project's tiny models
  tokenizer.json  Hugging Face `tokenizers` (LLaMA 3, SmolLM2, GGUF-embedded after conversion)
  tokenizer.model sentencepiece (LLaMA 1/2)
"""

from __future__ import annotations

import hashlib
import json
import os


def _digest(*parts) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
  return h.hexdigest()[:16]


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; BOS 256, EOS 257. Needs no files, so tiny models train anywhere."""

  kind = "bytes"
  bos_id, eos_id, vocab_size = 256, 257, 258

  def __init__(self, add_bos: bool = True):
    self.add_bos = add_bos

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([self.bos_id] + ids) if (self.add_bos if add_bos is None else add_bos) else ids

  def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
    return [self.encode(t, add_bos) for t in texts]

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def fingerprint(self) -> str:
    """Changes whenever encode() could give different ids (token stores record it)."""
    return _digest(self.kind, self.add_bos)

  def save(self, directory: str) -> str:
    from pi_jax import files
    path = os.path.join(directory, "bytes.json")
    files.write_json(path, {"type": "bytes", "add_bos": self.add_bos}, indent=None)
    return path


def _special_id(value, lookup) -> int | None:
  """A token id from tokenizer_config's bos_token/eos_token (a string or {"content": ...})."""
  if isinstance(value, dict):
    value = value.get("content")
  return lookup(value) if isinstance(value, str) else None


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON: {e}") from None


def _template_adds_bos(processor: dict | None, bos_token: str | None) -> bool:
  """Whether a tokenizer.json post-processor puts `bos_token` in front of a single sequence."""
  if not processor:
    return False
  if processor.get("type") == "Sequence":
    return any(_template_adds_bos(p, bos_token) for p in processor.get("processors", []))
  if processor.get("type") in ("TemplateProcessing",):
    single = processor.get("single") or []
    first = single[0] if single else {}
    return "SpecialToken" in first and first["SpecialToken"].get("id") == bos_token
  if processor.get("type") in ("BertProcessing", "RobertaProcessing"):
    return bos_token is not None and processor.get("cls", [None])[0] == bos_token
  return False


class HFTokenizer:
  """A Hugging Face tokenizer.json, run by the `tokenizers` package (no transformers).

  Special tokens are never added by the Rust post-processor; BOS is prepended here when the
  source model's tokenizer does (tokenizer_config.json add_bos_token, else its post-processor),
  so add_bos can be switched per call.
  """

  kind = "tokenizer.json"

  def __init__(self, folder: str, fallback_ids: dict | None = None):
    from tokenizers import Tokenizer
    file = os.path.join(folder, "tokenizer.json")
    try:
      self._tok = Tokenizer.from_file(file)
    except Exception as e:
      raise ValueError(f"{file}: not a readable tokenizers file: {e}") from None
    tok_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    spec = _read_json(file)
    lookup = self._tok.token_to_id
    fallback_ids = fallback_ids or {}
    self.bos_id = _special_id(tok_config.get("bos_token"), lookup)
    if self.bos_id is None:
      self.bos_id = fallback_ids.get("bos_token_id")
    self.eos_id = _special_id(tok_config.get("eos_token"), lookup)
    if self.eos_id is None:
      self.eos_id = fallback_ids.get("eos_token_id")
    bos_token = self._tok.id_to_token(self.bos_id) if self.bos_id is not None else None
    if "add_bos_token" in tok_config:
      self.add_bos = bool(tok_config["add_bos_token"]) and self.bos_id is not None
    else:
      self.add_bos = _template_adds_bos(spec.get("post_processor"), bos_token)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] + ids) if (self.add_bos if add_bos is None else add_bos) else ids

  def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
    """encode() of many texts at once (the Rust batch encoder, threaded)."""
    bos = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
    return [bos + e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def fingerprint(self) -> str:
    """Changes whenever encode() could give different ids (token stores record it)."""
    return _digest(self.kind, self._tok.to_str().encode(), [self.bos_id, self.eos_id, self.add_bos])


class SentencePieceTokenizer:
  """A sentencepiece tokenizer.model (LLaMA 1/2, Meta checkpoints); BOS prepended by default."""

  kind = "tokenizer.model"

  def __init__(self, folder: str):
    import sentencepiece as spm
    file = os.path.join(folder, "tokenizer.model")
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(file)
    except Exception as e:
      raise ValueError(f"{file}: not a readable sentencepiece model: {e}") from None
    ids = (self._sp.bos_id(), self._sp.eos_id())
    self.bos_id, self.eos_id = (i if i >= 0 else None for i in ids)
    tok_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    self.add_bos = bool(tok_config.get("add_bos_token", True)) and self.bos_id is not None
    self.vocab_size = self._sp.GetPieceSize()

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = self._sp.EncodeAsIds(text)
    return ([self.bos_id] + ids) if (self.add_bos if add_bos is None else add_bos) else ids

  def encode_batch(self, texts: list[str], add_bos: bool | None = None) -> list[list[int]]:
    return [self.encode(t, add_bos) for t in texts]

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  def fingerprint(self) -> str:
    """Changes whenever encode() could give different ids (token stores record it)."""
    return _digest(self.kind, self._sp.serialized_model_proto(),
                   [self.bos_id, self.eos_id, self.add_bos])


def load_tokenizer(path: str):
  """The tokenizer stored with checkpoint `path` (or in tokenizer folder `path`).

  Looks for bytes.json, then tokenizer.json, then tokenizer.model.
  """
  folder = os.path.join(path, "tokenizer")
  if not os.path.isdir(folder):
    folder = path
  byte_file = os.path.join(folder, "bytes.json")
  if os.path.isfile(byte_file):
    with open(byte_file) as f:
      return ByteTokenizer(add_bos=json.load(f).get("add_bos", True))
  if os.path.isfile(os.path.join(folder, "tokenizer.json")):
    # The checkpoint's config.json (pi_jax or HF) names BOS/EOS when the tokenizer files do not.
    ids = _read_json(os.path.join(path, "config.json"))
    return HFTokenizer(folder, fallback_ids=ids)
  if os.path.isfile(os.path.join(folder, "tokenizer.model")):
    return SentencePieceTokenizer(folder)
  raise FileNotFoundError(f"{path}: no tokenizer found (expected {folder}/bytes.json, "
                          "tokenizer.json or tokenizer.model)")


def train_bpe(texts, vocab_size: int, directory: str, bos: str = "<s>",
              eos: str = "</s>") -> "HFTokenizer":
  """Trains a byte-level BPE tokenizer on `texts` and saves it as tokenizer.json in `directory`.

  Every digit is its own token (as in LLaMA), so a 5-digit pass key is always 5 tokens. BOS is
  prepended by default (tokenizer_config.json's add_bos_token); ids 0 and 1 are BOS and EOS.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": bos, "eos_token": eos, "add_bos_token": True}, f, indent=2)
  return HFTokenizer(directory)
