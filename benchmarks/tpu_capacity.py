"""The capacity table: for each of the paper's recipes, the smallest TPU slice its train step fits.

  python -m benchmarks.tpu_capacity --json results/tpu_capacity.json --markdown docs/tpu_capacity.md

Every number comes from the TPU compiler (compile-only, on this host: no TPU needed): the real
train step of configs/NAME.py (pi_jax.train.aot.compile_train_step) compiled for a slice, its
memory per chip from memory_analysis(). The search tries few candidates: slices in order of
total HBM, with the config exactly as `train.py` runs it (the recipes: FSDP over every chip,
remat full, micro_batch=-1 = one sequence per chip and the rest of the global batch by gradient
accumulation); the first slice whose step fits is the row. Slices whose HBM is below a floor
(state, gradients and saved layer inputs: pi_jax.train.plan.floor_bytes) are not compiled. Rows already in the
--json file are kept (--redo NAME recompiles one), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.common import REPO

GiB = 2**30

# (row name, config file, what the paper calls it)
ROWS = (
    ("7B 8K PI", "llama_7b_8k.py"),
    ("7B 16K PI", "llama_7b_16k.py"),
    ("7B 32K PI", "llama_7b_32k.py"),
    ("13B 8K PI", "llama_13b_8k.py"),
    ("33B 8K PI", "llama_33b_8k.py"),
    ("65B 8K PI", "llama_65b_8k.py"),
    ("Llama-2 7B 32K PI", "llama2_7b_32k.py"),
    ("7B 8K FT (direct fine-tuning)", "llama_7b_8k_ft.py"),
    ("SmolLM2-135M 32K PI", "smollm2_135m_32k.py"),
)

# Candidate slices, cheapest first within a generation; the search walks them in order of total
# HBM (chips × HBM per chip) and stops at the first that fits.
def _row_config(config_file: str):
  """The row's config as the file gives it (the recipes' micro_batch=-1: one sequence per chip,
  the rest of the global batch by accumulation)."""
  from pi_jax.train import config as config_lib
  return config_lib.load_config_file(os.path.join(REPO, "configs", config_file))


# The model fields that shape the step's buffers (the rest are constants: RoPE, norm epsilon).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "tie_word_embeddings")


def shape_key(config_file: str) -> str:
  """What decides a step's buffers: the architecture's shapes and dtypes, and the batch,
  window, mesh, remat and loss chunk. Two recipes with one key (Llama-2 7B at 32K and 7B at 32K;
  PI and direct fine-tuning at 8K) compile to programs with the same buffers."""
  from pi_jax.train import setup
  config = _row_config(config_file)
  model, _ = setup.abstract_model_config(config)
  arch = {k: getattr(model, k) for k in SHAPE_FIELDS}
  return json.dumps([arch, config.run.to_dict(), config.seq_len, config.global_batch, config.micro_batch, config.mesh,
                     config.loss_chunk], sort_keys=True)


def search(name: str, config_file: str, slices, log, twin: dict | None = None) -> dict:
  """The row's smallest slice (pi_jax.train.plan.smallest_slice). `twin`: a finished row with the
  same shape_key; the slices it tried and did not fit are not compiled again."""
  from pi_jax.train import plan
  too_small = {t["topology"] for t in (twin or {}).get("tried", []) if not t["fits"]}
  record = plan.smallest_slice(_row_config(config_file), slices, lambda m: log(f"{name}: {m}"),
                               skip=too_small)
  return {"row": name, "config": config_file, **record}


def markdown(rows: list[dict]) -> str:
  head = ("| run | smallest slice | mesh | micro-batch × accum | remat | attention | "
          "per chip (temp) | HBM | compile |\n|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in rows:
    if not r.get("fits"):
      tried = ", ".join(t["topology"] for t in r.get("tried", []))
      lines.append(f"| {r['row']} | none fits (tried {tried}) | | | | | | | |")
      continue
    mesh = ",".join(f"{k}:{v}" for k, v in r["mesh"].items() if v > 1)
    lines.append(
        f"| {r['row']} | {r['topology']} | {mesh} | {r['micro_batch']} × {r['accum_steps']} | "
        f"{r['run']['remat']} | {r['attention_compiled']} | "
        f"{r['per_chip_bytes'] / GiB:.1f} GiB ({r['temp_bytes'] / GiB:.1f}) | "
        f"{r['hbm_bytes_per_chip'] // GiB} GiB | {r['compile_seconds']:.0f} s |")
  return "\n".join(lines) + "\n"


def table(rows: list[dict]) -> str:
  """The markdown table of `rows`, then a line for each recipe not compiled yet."""
  missing = [name for name, config_file in ROWS if all(r["config"] != config_file for r in rows)]
  return markdown(rows) + "".join(f"| {name} | not compiled yet | | | | | | | |\n"
                                  for name in missing)


def main(argv=None) -> int:
  from pi_jax import files
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", dest="json_out", required=True, help="results file (resumed if present)")
  p.add_argument("--markdown", default=None, help="write the table here")
  p.add_argument("--only", action="append", default=[], help="row config file(s) to run")
  p.add_argument("--redo", action="append", default=[], help="recompile these rows")
  p.add_argument("--slices", default="auto",
                 help="candidate slices: auto, generations (v5e,v5p) or slice names")
  args = p.parse_args(argv)
  done = {}
  if os.path.exists(args.json_out):
    with open(args.json_out) as f:
      done = {r["config"]: r for r in json.load(f)["rows"]}
  from pi_jax.train import plan
  slices = plan.candidates(args.slices)
  rows = []
  for name, config_file in ROWS:
    if args.only and config_file not in args.only:
      if config_file in done:
        rows.append(done[config_file])
      continue
    if config_file in done and config_file not in args.redo:
      rows.append(done[config_file])
      continue
    key = shape_key(config_file)
    twin = next((r for r in rows if shape_key(r["config"]) == key), None)
    rows.append(search(name, config_file, slices, lambda m: print(m, flush=True), twin))
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    files.write_json(args.json_out, {
        "command": "python -m benchmarks.tpu_capacity " + " ".join(argv or sys.argv[1:]),
        "rows": rows})
  text = table(rows)
  print(text)
  if args.markdown:
    with files.atomic_file(args.markdown) as f:
      f.write("<!-- written by: python -m benchmarks.tpu_capacity; do not edit by hand -->\n")
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
