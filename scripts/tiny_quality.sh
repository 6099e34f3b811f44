#!/usr/bin/env bash
# Quality check of the embedded tiny model (issue 3's bar), through the real harness:
#  1. blockwise, one token per step, block 32, on all 200 held-out problems of arith and listops
#     at gen_length 64 / 128 / 256;
#  2. sensitivity to parallel commits: gen_length 128 with 1, 2, 4 and 8 tokens per step.
# Writes run directories under results/tiny_quality/ and, through `python -m eval.report`, the tables
# (table.md, table.tex, grouped.csv) and plots under results/tiny_quality/report/.
# Usage: bash scripts/tiny_quality.sh [extra overrides, e.g. limit=50]
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/tiny_quality
python -m eval -m task=arith,listops gen_length=64,128,256 limit=null batch_size=25 "$@" \
  hydra.sweep.dir=$out/lengths 'hydra.sweep.subdir=${task.name}-L${gen_length}'
python -m eval -m task=arith,listops gen_length=128 sampler.steps=64,32,16 limit=null batch_size=25 "$@" \
  hydra.sweep.dir=$out/parallel 'hydra.sweep.subdir=${task.name}-steps${sampler.steps}'
python -m eval.report $out --out $out/report --command "bash scripts/tiny_quality.sh $*"
