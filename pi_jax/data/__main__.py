"""python -m pi_jax.data prepare SPEC OUT --tokenizer CKPT [--format sft] | info STORE"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m pi_jax.data",
                                   description="Token stores: tokenize a corpus once, train from it.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prepare", help="tokenize a data spec into a token store",
                     description="Tokenize SPEC (directory, glob, .jsonl[.gz|.zst], .parquet, "
                     "tfds:NAME:SPLIT) into the token store OUT (a local path or gs://...). "
                     "Rerunning an interrupted prepare resumes it.")
  p.add_argument("spec", help="the documents: a data spec")
  p.add_argument("out", help="the store directory to write (then: train.py --set data=OUT)")
  p.add_argument("--format", choices=("text", "sft", "summaries"), default="text",
                 help="text: documents (default). sft: one .jsonl/.parquet file of "
                 "{prompt, completion} or {messages} rows, rendered with the checkpoint's chat "
                 "template, loss on the completions only (train with --set packing=documents). "
                 "summaries: one .jsonl file of {report, summary} rows (GovReport's), prompted "
                 "as eval.py summarize prompts them, loss on the summary only, each example cut "
                 "to --max-length (no chat template needed: base models too)")
  p.add_argument("--max-length", type=int, default=None,
                 help="--format summaries: tokens per example, the fine-tune's seq_len (the "
                 "report's end is cut to fit; a summary that alone does not fit is skipped)")
  p.add_argument("--prompt-template", default=None,
                 help="--format summaries: the prompt around the report (default "
                 "'{report}\n\nSummary:'; pass eval.py summarize the same --template)")
  p.add_argument("--tokenizer", required=True,
                 help="checkpoint or tokenizer folder whose tokenizer the trained model uses; "
                 "`bytes` for the byte tokenizer of randomly initialized models")
  p.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for tfds: specs")
  p.add_argument("--max-docs", type=int, default=None,
                 help="only the first N documents (SFT: examples)")
  p.add_argument("--text-key", default="text", help="JSONL field / Parquet column of the text")
  p.add_argument("--workers", type=int, default=None,
                 help="tokenizer processes (default: one per CPU core; 1: in this process)")
  p.add_argument("--shard-tokens", type=int, default=None,
                 help="tokens per store file and per commit (default 16M)")
  p.add_argument("--restart", action="store_true",
                 help="discard an interrupted or different store at OUT and start over")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--json", action="store_true", help="print the summary as JSON too")
  i = sub.add_parser("info", help="print what a token store holds")
  i.add_argument("store", help="the token store directory (a local path or gs://...)")
  i.add_argument("--verify", action="store_true",
                 help="read every token and recompute the store's checksum (slow: the whole "
                 "store; opening it only checks that every shard file is there)")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)

  from pi_jax.data import prepare as prepare_lib
  from pi_jax.data import store as store_lib
  from pi_jax.data.sources import DataError
  try:
    if args.command == "info":
      store = store_lib.TokenStore(args.store)
      print(json.dumps(store.meta, indent=1, sort_keys=True))
      if args.verify:
        from tqdm import tqdm
        with tqdm(total=store.num_tokens, unit=" tokens", unit_scale=True, file=sys.stderr,
                  dynamic_ncols=True) as bar:
          store.verify(progress=lambda done: bar.update(done - bar.n))
        print(f"verified: {store.num_tokens} tokens read, checksum "
              + ("matches" if store.meta.get("commits") else
                 "not recorded by the prepare that made this store (every chunk's crc32c is fine)"),
              file=sys.stderr)
      return 0
    if args.format != "summaries":
      for flag, value in (("--max-length", args.max_length),
                          ("--prompt-template", args.prompt_template)):
        if value is not None:
          raise ValueError(f"{flag} applies to --format summaries only")
    if args.format in ("sft", "summaries"):
      from pi_jax.data import sft, summaries
      for flag, value in (("--data-dir", args.data_dir), ("--workers", args.workers),
                          ("--shard-tokens", args.shard_tokens),
                          ("--text-key", args.text_key != "text" or None)):
        if value:
          raise ValueError(f"{flag} does not apply to --format {args.format} (one file, "
                           "tokenized in this process)")
      if args.format == "sft":
        summary = sft.prepare_sft(args.spec, args.out, args.tokenizer,
                                  max_examples=args.max_docs, restart=args.restart,
                                  progress_bar=not args.no_progress)
      else:
        if args.max_length is None:
          raise ValueError("--format summaries needs --max-length (the fine-tune's seq_len)")
        summary = summaries.prepare_summaries(
            args.spec, args.out, args.tokenizer, max_length=args.max_length,
            template=args.prompt_template or summaries.DEFAULT_TEMPLATE,
            max_examples=args.max_docs, restart=args.restart, progress_bar=not args.no_progress)
      if args.json:
        print(json.dumps(summary, sort_keys=True))
      return 0
    kwargs = {}
    if args.shard_tokens:
      kwargs["shard_tokens"] = args.shard_tokens
      kwargs["chunk_tokens"] = min(prepare_lib.DEFAULT_CHUNK_TOKENS, args.shard_tokens)
    summary = prepare_lib.prepare(
        args.spec, args.out, args.tokenizer, data_dir=args.data_dir, max_docs=args.max_docs,
        text_key=args.text_key, workers=args.workers, restart=args.restart,
        progress_bar=not args.no_progress, **kwargs)
  except (DataError, store_lib.StoreError, ValueError, FileNotFoundError, ImportError) as e:
    print(f"python -m pi_jax.data: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  if args.json:
    print(json.dumps(summary, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
