#!/usr/bin/env bash
# SmolLM2-135M-Instruct (trained window 8192), CPU (2 shared cores), 2026-12-07, no scaling.
# Run from the repository root. Each writes JSON (settings, command, versions, every trial's
# continuation), the Markdown table (stdout) and a PNG.
set -euo pipefail
CKPT=$(python -m convert.fetch smollm2)
OUT=results/needle
# RULER's single and multi-key needles at 2048 tokens, depths 0% and 100%, 2 trials each.
nice -n 10 python eval.py needle --ckpt "$CKPT" --haystack pg19_standin --tasks single,multikey \
  --lengths 2048 --depths 2 --trials 2 --json $OUT/smollm2_2048.json \
  --plot $OUT/smollm2_2048.png --no-progress > $OUT/smollm2_2048.md
# Passkey at 1024 tokens, 8 distances x 2 keys: which distances fail (issue 29's k_max "–").
nice -n 10 python eval.py passkey --ckpt "$CKPT" --lengths 1024 --depths 8 --trials 2 \
  --mode generate --json $OUT/passkey_smollm2_l1024.json \
  --plot $OUT/passkey_smollm2_l1024.png --no-progress > $OUT/passkey_smollm2_l1024.md
