#!/usr/bin/env bash
# `make gpu-check`: run on the lent GPU machine, where nothing can be installed.  Uses that machine's
# python3 (torch with CUDA, triton, ninja, pytest), builds in place for sm_90 with 16 jobs, runs the
# whole test suite on the GPU, then the benchmarks.  Logs and results go to $OUT (<= 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The image's default g++ (/opt/gcc) once produced a _C.so whose integer-formatting error paths crashed
# (benchmarks/results/NOTES.md); GPU_CHECK_CXX=/usr/bin/g++ builds with another host compiler.
if [ -n "${GPU_CHECK_CXX:-}" ]; then export CXX=$GPU_CHECK_CXX; fi
echo "== build (sm_90, 16 jobs)"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
echo "build took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
$PY -m convmixer_kernels info | tee -a "$OUT/machine.txt"

echo "== tests"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -rfE tests ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
tail -40 "$OUT/tests.log"

echo "== benchmarks"
timeout ${BENCH_TIMEOUT:-200} $PY benchmarks/run.py --quick --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -30 "$OUT/bench.log"
exit $status
