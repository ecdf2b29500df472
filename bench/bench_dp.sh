#!/usr/bin/env bash
# Data parallel on one machine: 2 ranks x 1 thread against 1 rank x 2 threads on the same global
# batch (stage 1 of the tiny preset on the synthetic data, and the same with a 4x wider Q-Former),
# with both gradient reductions. Prints samples/s and the share of rank 0's training time spent
# waiting in blocking collectives (train_summary.json's collective_wait_seconds / train_seconds).
#   bash bench/bench_dp.sh            (BIN=build/blip2 STEPS=60 GLOBAL=64 by default)
set -euo pipefail
BIN=${BIN:-build/blip2}
STEPS=${STEPS:-60}
GLOBAL=${GLOBAL:-64}
work=$(mktemp -d /tmp/bench_dp.XXXXXX)
trap '[ "${KEEP:-0}" = 1 ] || rm -rf "$work"' EXIT

config() {  # name qformer_width data_parallel gradient_reduction
  local out="$work/$1.yaml"
  sed -e "s/^use_parallel: false/use_parallel: true/" \
      -e "s/^  epochs: 12/  epochs: 1/" \
      -e "s/^  batch_size: 64 .*/  batch_size: $((GLOBAL / $3))/" \
      -e "s/^  log_interval: 25/  log_interval: 10\n  max_steps: $STEPS/" \
      -e "s/^  eval_tasks: .*/  eval_tasks: []/" \
      -e "s/^  data_parallel: 1/  data_parallel: $3\n  gradient_reduction: $4/" \
      -e "s/^      hidden_size: 96/      hidden_size: $2/" \
      -e "s/^      intermediate_size: 192/      intermediate_size: $(($2 * 2))/" \
      configs/blip2/tiny_pretrain_stage_1.yaml >"$out"
  for want in "max_steps: $STEPS" "data_parallel: $3" "hidden_size: $2" "gradient_reduction: $4"; do
    grep -q "$want" "$out" || { echo "bench_dp: could not set '$want' in the config" >&2; exit 1; }
  done
  echo "$out"
}

field() { { grep -o "\"$2\": [0-9.e+-]*" "$1" || true; } | head -1 | sed 's/.*: //'; }

run() {  # name width dp reduction
  local cfg out
  cfg=$(config "$@")
  out="$work/$1"
  if [ "$3" = 1 ]; then
    OMP_NUM_THREADS=2 "$BIN" run --config "$cfg" --output_dir "$out" >"$work/$1.log" 2>&1
  else
    local pids=()
    for r in $(seq 0 $(($3 - 1))); do
      WORLD_SIZE=$3 RANK=$r LOCAL_RANK=$r LOCAL_WORLD_SIZE=$3 BLIP2_DIST_FILE_STORE="$work/$1.store" \
        OMP_NUM_THREADS=1 "$BIN" run --config "$cfg" --output_dir "$out" >"$work/$1.rank$r.log" 2>&1 &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  fi
  local s="$out/train_summary.json" sps waited total params
  sps=$(field "$s" samples_per_s)
  waited=$(field "$s" collective_wait_seconds)
  total=$(field "$s" train_seconds)
  params=$({ grep -ho 'train: [0-9]* of' "$work/$1"*.log || true; } | head -1 | sed 's/train: //; s/ of//')
  printf "| %-6s | %9s | %d x %d | %-9s | %8.1f | %s |\n" "$1" "$params" "$3" "$((2 / $3))" \
    "$4" "$sps" "$( [ -n "$waited" ] && awk -v w="$waited" -v t="$total" 'BEGIN{printf "%.2f s of %.2f s (%.1f%%)", w, t, 100*w/t}' || echo '-')"
}

echo "| run | trainable | ranks x threads | reduction | samples/s | waiting in collectives (rank 0) |"
echo "|---|---|---|---|---|---|"
for width in 96 384; do
  run "w${width}_1" $width 1 coalesced
  run "w${width}_2b" $width 2 bucketed
  run "w${width}_2c" $width 2 coalesced
done
