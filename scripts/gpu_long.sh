#!/usr/bin/env bash
# The tiny_long training run (issue 17) in GPU windows: each window trains a resumable chunk, checks
# the quality bar through the harness, and brings back what the next window and this repo need.
#
#   bash scripts/gpu_long.sh wheels        # here, once: wheels of what the GPU image lacks, into .whl/
#   device run: command "bash scripts/gpu_long.sh window", carry [".whl", "scripts/tiny_state/long"],
#               timeout_s 600
#   bash scripts/gpu_long.sh unpack DIR    # here: DIR = the run's files_at; restores the state into
#                                          # scripts/tiny_state/long, the fp32 export (with the tokenizer)
#                                          # into scripts/tiny_state/long_export, the window's quality runs
#                                          # and log into results/tiny_long_windows/step<N>
#   bash scripts/gpu_long.sh promote       # here, once the bar holds: the state's weights in fp16 (the
#                                          # window checked fp16 == fp32 completions) as src/asynclane/tiny_long
#   device run: "bash scripts/gpu_long.sh bench", carry [".whl"]   # after promote: the long benchmark
#   bash scripts/gpu_long.sh unpack-bench DIR                    # here: its results into results/
#
# bench (on the GPU machine): scripts/benchmark.py --long (BENCH_ARGS, default --extra device=cuda)
# for at most BENCH_SECONDS (default 480); a run cut off there resumes at the next bench window (the
# rows written so far travel back with the repository: results/benchmark_long is not ignored), and
# ORACLE=1 adds scripts/oracle_floor.py --long once the benchmark is complete; $OUT/bench.tar.gz holds
# results/benchmark_long.
#
# window (on the GPU machine, $OUT set by the device tool):
#  1. installs hydra-core/omegaconf/antlr4 from .whl/ (the image has torch, transformers, pandas...)
#     and this project (editable, no network);
#  2. trains TRAIN_SECONDS (default 420) on the state in scripts/tiny_state/long, a --compact-state
#     (weights, step, schedule, no optimizer moments: ~28 MB, small enough to travel with the repo);
#     the first window calibrates a cosine schedule for TOTAL_SECONDS (default 1440: four windows) of
#     training (about 1.4B tokens if an H100 trains ~1M tokens/s, an estimate the first window measures);
#  3. the quality bar on the export, through the harness: blockwise one token per step at 256/512/1024
#     (trace, dep_distance 1: the task's default), and parallel commits at 256 (4 and 8 tokens per
#     step; fast_dllm at threshold 0.5), the first QUALITY_N (default 50) held-out problems each; with
#     PARITY=1 the one-token runs again on the weights in fp16 (what promote commits), compared;
#  4. $OUT: state/ (the state's shards, each under 16 MiB, its index and the training log: copied
#     right after training, so they come back even if the evaluation runs out of time) and
#     rest.tar.gz (the window's output, the export's config/training.json, the quality runs): at
#     most 8 files come back from a window.
# Time: 360 s of training, ~40 s of start-up and calibration, the evaluation ~1-2 min on an H100
# (estimated, not yet measured): under the 10-minute limit of one command.
#
# Size: what travels to the device (tracked files ~32 MB, .whl 0.4 MB, the carried state 27.6 MB) must
# stay under 64 MiB, so promote (which adds the fp16 model, 13.8 MB, to the tracked files) comes after
# the last training window; bench windows carry no state.  The state lives in an ignored folder; a
# session that ends between windows commits it (git add -f scripts/tiny_state/long: it then travels as a
# tracked file, no carry needed) and the session after promote removes it from git again.
#
# Every knob is an environment variable (defaults below), so the same script runs a short CPU check:
#   OUT=/tmp/w DEVICE=cpu AMP= WORKERS=0 THREADS=2 MODEL="--d-model 32 --layers 1 --heads 2 --mlp 64" \
#   BATCH_TOKENS=4096 TRAIN_SECONDS=20 TOTAL_SECONDS=60 QUALITY_N=2 LENGTHS=256 bash scripts/gpu_long.sh window
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:---d-model 256 --layers 8 --heads 4 --mlp 768 --max-length 1600}
RECIPE=${RECIPE:---tasks trace --lr 1e-3 --warmup 300 --probe-every 1000 --probe-n 50 --save-every 1000}
STATE=${STATE:-scripts/tiny_state/long}
EXPORT=${EXPORT:-scripts/tiny_state/long_export}  # ignored: an untracked model here would travel to the GPU
PROMOTED=${PROMOTED:-src/asynclane/tiny_long}     # promote: the embedded model=tiny_long (fp16)
RESULTS=${RESULTS:-results/tiny_long_windows}  # unpack: each window's quality runs, training log and output
DEVICE=${DEVICE:-cuda}
AMP=${AMP---amp}
WORKERS=${WORKERS:-14}
THREADS=${THREADS:-2}
BATCH_TOKENS=${BATCH_TOKENS:-65536}
TRAIN_SECONDS=${TRAIN_SECONDS:-360}
TOTAL_SECONDS=${TOTAL_SECONDS:-1440}
QUALITY_N=${QUALITY_N:-50}
BENCH_OUT=${BENCH_OUT:-results/benchmark_long}
PARITY=${PARITY:-0}  # 1: also the one-token runs on fp16 weights (the window before promote)
LENGTHS=${LENGTHS:-256,512,1024}
PY=${PY:-python3}

wheels() {
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.0
  "$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist upstream: built here
  ls .whl
}

install() {
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! "$PY" -c "import eval.conf" 2>/dev/null; then
    # this project, editable and offline; failing that, from src/ with conf/ linked in as eval.conf
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
      ln -sfn ../../conf src/eval/conf
      export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    }
    "$PY" -c "import eval.conf, asynclane, baselines"
  fi
}

window() {
  : "${OUT:?OUT must name the folder whose files come back}"
  install
  local q=$OUT/work/quality
  mkdir -p "$STATE" "$q"
  PYTHONUNBUFFERED=1 "$PY" scripts/train_tiny.py --device "$DEVICE" $AMP --workers "$WORKERS" --threads "$THREADS" \
    $MODEL $RECIPE --batch-tokens "$BATCH_TOKENS" --steps 0 --time-budget "$TOTAL_SECONDS" \
    --chunk-seconds "$TRAIN_SECONDS" --shard-mib 15 --compact-state --state "$STATE" --out "$OUT/work/export" \
    --weights-only --log "$STATE/log.jsonl" 2>&1 | tee "$OUT/work/train.out"
  mkdir -p "$OUT/state"  # the state first: it comes back even if the evaluation below runs out of time
  cp "$STATE"/state-*-of-*.pt "$STATE/state-index.pt" "$STATE/log.jsonl" "$OUT/state/"
  cp src/asynclane/tiny/{tokenizer.json,tokenizer_config.json,chat_template.jinja} "$OUT/work/export/"
  local n=$QUALITY_N
  local base=(model=tiny_long "device=$DEVICE" task=trace "limit=$n" "batch_size=$n" warmup=0)
  local m=("${base[@]}" "model.path=$OUT/work/export") m16=("${base[@]}" "model.path=$OUT/work/export16")
  "$PY" -m eval -m "${m[@]}" sampler=blockwise "gen_length=$LENGTHS" \
    "hydra.sweep.dir=$q/lengths" 'hydra.sweep.subdir=blockwise-L${gen_length}' 2>&1 | tail -n 40
  local L0=${LENGTHS%%,*}
  "$PY" -m eval -m "${m[@]}" sampler=blockwise "gen_length=$L0" "sampler.steps=$((L0 / 4)),$((L0 / 8))" \
    "hydra.sweep.dir=$q/parallel" 'hydra.sweep.subdir=blockwise-L${gen_length}-steps${sampler.steps}' 2>&1 | tail -n 20
  "$PY" -m eval "${m[@]}" sampler=fast_dllm "gen_length=$L0" sampler.threshold=0.5 \
    "hydra.run.dir=$q/parallel/fast_dllm-L$L0-threshold0.5" 2>&1 | tail -n 12
  if [ "$PARITY" = 1 ]; then
    "$PY" scripts/train_tiny.py $MODEL $RECIPE --state "$STATE" --out "$OUT/work/export16" --export-only --export-dtype fp16
    "$PY" -m eval -m "${m16[@]}" sampler=blockwise "gen_length=$LENGTHS" \
      "hydra.sweep.dir=$q/lengths_fp16" 'hydra.sweep.subdir=blockwise-L${gen_length}' 2>&1 | tail -n 20
  fi
  "$PY" - "$q" <<'EOF'
import json, sys
from pathlib import Path
q = Path(sys.argv[1])
for s in sorted(q.rglob("summary.json")):
    d = json.loads(s.read_text())
    print(f"{s.parent.relative_to(q)}: n={d['n']} accuracy={d['accuracy']:.3f} nfe={d.get('nfe_mean')}")
def completions(run):
    return {r["example_id"]: r["completion"] for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())}
for run in sorted((q / "lengths_fp16").glob("blockwise-L*")):
    a, b = completions(q / "lengths" / run.name), completions(run)
    print(f"fp16 weights, {run.name}: {sum(a[k] == b[k] for k in b)}/{len(b)} completions equal fp32's")
EOF
  tar czf "$OUT/rest.tar.gz" -C "$OUT/work" train.out quality export/config.json export/training.json
  rm -rf "$OUT/work"
  ls -la "$OUT" "$OUT/state"
}

unpack() {
  local dir=${1:?usage: bash scripts/gpu_long.sh unpack FILES_AT}
  mkdir -p "$STATE" "$RESULTS"
  rm -f "$STATE"/state-*-of-*.pt
  cp "$dir"/state/* "$STATE/"
  cp "$dir/state/log.jsonl" "$RESULTS/log.jsonl"
  local step
  step=$("$PY" -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=False)['skeleton']['step'])" \
    "$STATE/state-index.pt")
  if [ -f "$dir/rest.tar.gz" ]; then  # absent when the window ran out of time after training
    local tmp
    tmp=$(mktemp -d)
    tar xzf "$dir/rest.tar.gz" -C "$tmp"
    rm -rf "$RESULTS/step$step"
    mkdir -p "$RESULTS/step$step"
    cp -r "$tmp/quality" "$tmp/train.out" "$tmp/export/training.json" "$RESULTS/step$step/"
    rm -rf "$tmp"
  fi
  "$PY" scripts/train_tiny.py $MODEL $RECIPE --state "$STATE" --out "$EXPORT" --export-only
}

bench() {
  : "${OUT:?OUT must name the folder whose files come back}"
  install
  local out=$BENCH_OUT
  # shellcheck disable=SC2086
  if timeout "${BENCH_SECONDS:-480}" "$PY" scripts/benchmark.py --long --out "$out" ${BENCH_ARGS:---extra device=cuda} \
      > "$OUT/bench.out" 2>&1; then
    tail -n 60 "$OUT/bench.out"
    if [ "${ORACLE:-0}" = 1 ]; then
      # shellcheck disable=SC2086
      "$PY" scripts/oracle_floor.py --long --device "$DEVICE" --benchmark "$out" ${ORACLE_ARGS:-} \
        | tee "$out/oracle_floor.md"
    fi
  else
    tail -n 20 "$OUT/bench.out"
    echo "benchmark stopped (time limit or error above): a bench window resumes it"
  fi
  mkdir -p "$out"
  cp "$OUT/bench.out" "$out/"
  tar czf "$OUT/bench.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
  rm -f "$OUT/bench.out"
}

unpack_bench() {
  local dir=${1:?usage: bash scripts/gpu_long.sh unpack-bench FILES_AT}
  mkdir -p "$(dirname "$BENCH_OUT")"
  tar xzf "$dir/bench.tar.gz" -C "$(dirname "$BENCH_OUT")"
  ls "$BENCH_OUT"
}

promote() {
  "$PY" scripts/train_tiny.py $MODEL $RECIPE --state "$STATE" --out "$PROMOTED" --export-only --export-dtype fp16
}

case "${1:-}" in
  wheels) wheels ;;
  window) window ;;
  unpack) shift; unpack "$@" ;;
  promote) promote ;;
  bench) bench ;;
  unpack-bench) shift; unpack_bench "$@" ;;
  *) echo "usage: bash scripts/gpu_long.sh wheels|window|unpack FILES_AT|promote|bench|unpack-bench FILES_AT" >&2
     exit 2 ;;
esac
