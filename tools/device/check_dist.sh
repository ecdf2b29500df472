#!/usr/bin/env bash
# The GPU check of multi-process training (issue 13), for a lent device machine: builds blip2cpp
# against the machine's CUDA torch, then runs the multi-process tests with CUDA tensors — two ranks
# sharing one GPU through Gloo (NCCL needs one GPU per rank) — and records what NCCL says about two
# ranks on one GPU. Run from the project's root with .devkit carried (../shared/device/make-kit.sh):
#   bash tools/device/check_dist.sh        (logs under $OUT, a summary on stdout)
set -uo pipefail
OUT=${OUT:-/tmp/blip2_device_out}
mkdir -p "$OUT"
eval "$(bash .devkit/use-kit.sh)"
nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
t0=$(date +%s)
cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DBLIP2_PYTHON="$(command -v python3)" \
  -DCMAKE_PREFIX_PATH="$KIT/usr;$KIT/usr/lib/x86_64-linux-gnu/cmake" >"$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-cuda -j16 --target blip2 blip2_tests >"$OUT/build.log" 2>&1 \
  || { grep -m 30 -A 6 'error' "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
grep -o 'USE_C10D_NCCL' build-cuda/build.ninja | head -1 | sed 's/^/defined: /'
cd build-cuda
run() {  # name, env..., then the gtest filter
  local name=$1 filter=$2; shift 2
  local s=$(date +%s)
  env "$@" timeout 240 ./tests/blip2_tests --gtest_filter="$filter" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - s )) s; $(grep -E '^\[  (PASSED|FAILED)' "$OUT/$name.log" | tr '\n' ' ')"
  grep -E '^\[       OK|^\[  FAILED  \]' "$OUT/$name.log" | head -12
}
run cuda_gloo 'Dist.TensorParallel*:Dist.Stage1Data*:Dist.Stage2Data*:Dist.Stage2AtData*:Dist.Evaluation*:Dist.Bucketed*' \
  BLIP2_TEST_DEVICE=cuda:0 BLIP2_DIST_CUDA_BACKEND=gloo
run cuda_nccl 'Dist.Stage2DataParallel*' BLIP2_TEST_DEVICE=cuda:0 BLIP2_DIST_CUDA_BACKEND=nccl BLIP2_DIST_TIMEOUT_S=30
cat /tmp/blip2_test_dist_stage2_*/two/error_rank*.txt 2>/dev/null | head -3
grep -rh -m 2 -i 'nccl\|duplicate' "$OUT/cuda_nccl.log" | head -4
