#!/usr/bin/env bash
# The zero-shot table on SmolLM2-135M-Instruct (trained window 8192), CPU (2 cores shared with
# four other engineers' jobs). One book-length document (data/pg19_standin/Psa_018.txt, Spurgeon
# on Psalm 18, ~35K tokens) cut to W+1 tokens for window W: each perplexity is ONE full window
# (every target scored with all the context before it). One invocation per (window, scaling), in
# priority order (the 4K row, then the 16K window beyond the trained one, then 8K), so an
# interrupted run still leaves complete cells; `eval.py report` merges them.
# Run from the repository root.
set -euo pipefail
CKPT=$(python -m pi_jax.fetch smollm2)
DOC=data/pg19_standin/Psa_018.txt
OUT=results/zero_shot
run() {  # run WINDOW SCALING
  local W=$1 S=$2
  nice -n 10 python eval.py perplexity --ckpt "$CKPT" --data "$DOC" --windows $W \
    --max-tokens $((W + 1)) --stride $W --rope-scaling $S --no-progress \
    --json $OUT/ppl_w${W}_${S/:/}.json
}
for S in none linear:2 ntk:2 yarn:2; do run 4096 $S; done
for S in none linear:2 yarn:2 ntk:2; do run 16384 $S; done
for S in none linear:2 ntk:2 yarn:2; do run 8192 $S; done
python eval.py report $OUT/ppl_w*.json --json $OUT/perplexity.json --plot $OUT/perplexity.png \
  > $OUT/perplexity.md
