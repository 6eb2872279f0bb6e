#!/usr/bin/env bash
# The zero-shot table on SmolLM2-135M-Instruct (trained window 8192), as run on CPU (2 cores
# shared with four other engineers' jobs, load average 10-16), 2026-11-24.
#
# Perplexity: one book-length document (data/pg19_standin/Psa_018.txt, Spurgeon on Psalm 18,
# ~35K tokens) cut to W+1 tokens for window W, so each number is ONE full window (every target
# scored with all the context before it from the document's start; stride = W). One
# invocation per (window, scaling), in priority order (the 4K row, then 16K beyond the trained
# window, then 8K), so an interrupted run still leaves complete cells; `eval.py report` merges.
# Passkey: L = 4096, 2 depths (k = 0, 2048), 1 trial, greedy generation, seed 0.
# Run from the repository root.
set -euo pipefail
CKPT=$(python -m convert.fetch smollm2)
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

# Passkey (run concurrently with the perplexity jobs above, in two invocations)
nice -n 10 python eval.py passkey --ckpt "$CKPT" --lengths 4096 --depths 2 --trials 1 \
  --mode generate --seed 0 --rope-scaling none,linear:2 --no-progress \
  --json $OUT/passkey_l4096.json --plot $OUT/passkey_l4096.png > $OUT/passkey_l4096.md
nice -n 10 python eval.py passkey --ckpt "$CKPT" --lengths 4096 --depths 2 --trials 1 \
  --mode generate --seed 0 --rope-scaling ntk:2,yarn:2 --no-progress \
  --json $OUT/passkey_l4096_ntk_yarn.json --plot $OUT/passkey_l4096_ntk_yarn.png \
  > $OUT/passkey_l4096_ntk_yarn.md
python eval.py report $OUT/passkey_l4096.json $OUT/passkey_l4096_ntk_yarn.json \
  --json $OUT/passkey.json --plot $OUT/passkey.png > $OUT/passkey.md
