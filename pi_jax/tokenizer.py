"""Tokenizers with one small interface, loaded from a checkpoint's `tokenizer/` folder.

Every tokenizer has:
  encode(text, add_bos=None) -> list[int]   add_bos=None: as the source model's tokenizer does
  decode(ids) -> str
  bos_id, eos_id (int or None), vocab_size, add_bos (bool: BOS is prepended by default)

Kinds, by the file found in CKPT/tokenizer/:
  bytes.json      ByteTokenizer: UTF-8 bytes 0..255, then BOS/EOS; for the project's tiny models
  tokenizer.json  Hugging Face `tokenizers` (LLaMA 3, SmolLM2, GGUF-embedded after conversion)
  tokenizer.model sentencepiece (LLaMA 1/2)
"""

from __future__ import annotations

import json
import os


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; BOS 256, EOS 257. Needs no files, so tiny models train anywhere."""

  kind = "bytes"
  bos_id, eos_id, vocab_size = 256, 257, 258

  def __init__(self, add_bos: bool = True):
    self.add_bos = add_bos

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    ids = list(text.encode("utf-8"))
    return ([self.bos_id] + ids) if (self.add_bos if add_bos is None else add_bos) else ids

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def save(self, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "bytes.json")
    with open(path, "w") as f:
      json.dump({"type": "bytes", "add_bos": self.add_bos}, f)
    return path


def load_tokenizer(path: str):
  """The tokenizer stored with checkpoint `path` (or in tokenizer folder `path`)."""
  folder = os.path.join(path, "tokenizer")
  if not os.path.isdir(folder):
    folder = path
  byte_file = os.path.join(folder, "bytes.json")
  if os.path.isfile(byte_file):
    with open(byte_file) as f:
      return ByteTokenizer(add_bos=json.load(f).get("add_bos", True))
  raise FileNotFoundError(f"{path}: no tokenizer found (expected {folder}/bytes.json, "
                          "tokenizer.json or tokenizer.model)")
