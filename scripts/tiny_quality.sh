#!/usr/bin/env bash
# Quality check of the embedded tiny model (issue 3's bar), through the real harness:
#  1. blockwise, one token per step, block 32: all 200 held-out problems of arith and listops at
#     gen_length 64 and 128; the first 50 at 256 (the no-collapse check: 256 cache-free steps over
#     ~300 tokens cost ~10x the L=128 run on a 2-core CPU);
#  2. sensitivity to parallel commits: gen_length 128 with 2, 4 and 8 tokens per step
#     (steps 64 / 32 / 16; the one-token baseline is run 1's L=128), first 100 problems.
# Writes run directories under results/tiny_quality/ and, through `python -m eval.report`, the tables
# (table.md, table.tex, grouped.csv) and plots under results/tiny_quality/report/.
# Rerunning resumes every run (rows already written are kept).  About 45 min on a quiet 2-core CPU.
# Usage: bash scripts/tiny_quality.sh [extra overrides, e.g. threads=2]
set -euo pipefail
cd "$(dirname "$0")/.."
out=results/tiny_quality
python -m eval -m task=arith,listops gen_length=64,128 limit=null batch_size=25 "$@" \
  hydra.sweep.dir=$out/lengths 'hydra.sweep.subdir=${task.name}-L${gen_length}'
python -m eval -m task=arith,listops gen_length=256 limit=50 batch_size=25 "$@" \
  hydra.sweep.dir=$out/lengths 'hydra.sweep.subdir=${task.name}-L${gen_length}'
python -m eval -m task=arith,listops gen_length=128 sampler.steps=64,32,16 limit=100 batch_size=25 "$@" \
  hydra.sweep.dir=$out/parallel 'hydra.sweep.subdir=${task.name}-steps${sampler.steps}'
python -m eval.report $out --out $out/report --command "bash scripts/tiny_quality.sh $*"
