"""Data: document sources (`iter_documents`) and token stores (`prepare`, `TokenStore`).

    python -m pi_jax.data prepare SPEC OUT --tokenizer CKPT   # tokenize once into a token store
    python -m pi_jax.data info OUT                            # what a store holds
    from pi_jax.data import prepare; prepare.prepare(SPEC, OUT, CKPT)   # the same, in Python

A data spec names documents (see pi_jax.data.sources) or a token store made by `prepare` (see
pi_jax.data.store); the trainer accepts both, evaluation reads documents.
"""

from pi_jax.data.sources import (BUNDLED, JSONL_SUFFIXES, RECORD_SUFFIXES, REPO_ROOT,
                                 TEXT_SUFFIXES, DataError, iter_documents, resolve_spec,
                                 spec_files)
from pi_jax.data.store import StoreError, TokenStore, looks_like_store


def is_token_store(spec: str) -> bool:
  """Whether the data spec names a token store (complete or interrupted), not documents."""
  if spec.startswith("tfds:") or spec in BUNDLED:
    return False
  return looks_like_store(spec)

