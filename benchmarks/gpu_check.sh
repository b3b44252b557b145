#!/usr/bin/env bash
# `make gpu-check`: run on the lent GPU machine, where nothing can be installed.  Uses that machine's
# python3 (torch with CUDA, triton, ninja, pytest), builds in place for sm_90a with 16 jobs, runs the
# whole test suite on the GPU, then the demo and the benchmarks.  Logs and results go to $OUT (<= 8 files).
# Stage limits (BUILD/TEST/DEMO/BENCH_TIMEOUT: 120 + 260 + 90 + 170 s) keep one call near the device
# tool's 10-minute command limit: on an H200 the build took 53 s, the tests 186 s and the demo 75 s, so
# a call of about 590 s gives the benchmarks their 170 s.  A stage stopped by its limit still leaves
# its log (and partial results).
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

# The image's default compiler (/opt/gcc, CC/CXX point there) built a _C.so holding its own copy of
# libstdc++'s ostream::_M_insert<long>, which crashed against the system libstdc++ that torch loads
# whenever an error message streamed an integer (benchmarks/results/NOTES.md).  Build with the
# system compiler, the one that matches the libstdc++ at run time, when there is one.
CXX_PICK=${GPU_CHECK_CXX:-}
if [ -z "$CXX_PICK" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then CXX_PICK=/usr/bin/g++; fi
if [ -n "$CXX_PICK" ]; then
  export CXX=$CXX_PICK CC=${CXX_PICK%++}cc LDSHARED="$CXX_PICK -shared"
  [ -x "$CC" ] || CC=$(dirname "$CXX_PICK")/gcc
fi
echo "host compiler: CC=${CC:-default} CXX=${CXX:-default} ($(${CXX:-g++} --version | head -1))" | tee -a "$OUT/machine.txt"

# CUTLASS's headers for csrc/cuda/pw_cutlass.cu: the nvidia-cutlass wheel from PyPI, carried in .whl/
# (pip download nvidia-cutlass==4.2.0.0 --no-deps -d .whl; nothing can be installed there), unpacked.
if [ -z "${CONVMIXER_KERNELS_CUTLASS_INCLUDE:-}" ] && ! $PY -c "import cutlass_library" 2>/dev/null; then
  whl=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    cdir=$(mktemp -d)
    $PY -m zipfile -e "$whl" "$cdir" && export CONVMIXER_KERNELS_CUTLASS_INCLUDE="$cdir/cutlass_library/source/include"
  fi
fi
echo "cutlass headers: ${CONVMIXER_KERNELS_CUTLASS_INCLUDE:-$($PY -c 'import cutlass_library' 2>/dev/null && echo package || echo none)}" | tee -a "$OUT/machine.txt"

# sm_90a (not sm_90): the same code for every kernel, and what CUTLASS's Hopper GEMMs need (TMA, WGMMA).
echo "== build (sm_90a, 16 jobs)"
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} \
  timeout ${BUILD_TIMEOUT:-120} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
echo "build took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
$PY -m convmixer_kernels info | tee -a "$OUT/machine.txt"

# A C++ error path that streams integers must raise, not crash (the failure above).
$PY - >> "$OUT/build.log" 2>&1 <<'PYEOF' && echo "error-path probe: OK" || { echo "error-path probe: FAILED (see build.log)"; status=1; }
import torch, convmixer_kernels  # noqa: F401
for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    x, w, s = torch.randn(2, 3, 4, 4, device=dev), torch.randn(5, 1, 3, 3, device=dev), torch.ones(3, device=dev)
    try:
        torch.ops.convmixer_kernels.dw_fwd(x, w, None, s, s, 1, True, False)
        raise SystemExit(f"{dev}: a channel mismatch did not raise")
    except RuntimeError as e:
        print(f"{dev}: raised as expected:", str(e).splitlines()[0][:200])
PYEOF

echo "== tests"
# Workers in parallel (pytest-xdist, when there): a worker that crashes is replaced and its test fails,
# instead of the crash ending the run; pytest-timeout stops a hung test.
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-14}"
TOUT=""; $PY -c "import pytest_timeout" 2>/dev/null && TOUT="--timeout 150"
# pytest-benchmark (installed there) warns once per worker that xdist disables it: leave it out.
$PY -c "import pytest_benchmark" 2>/dev/null && TOUT="$TOUT -p no:benchmark"
# The tests' CPU work is small: one thread per worker, or the workers' thread pools fight for the cores.
# Failures are written to failures.log as they happen (tests/conftest.py), so a stopped run names them.
OMP_NUM_THREADS=1 CONVMIXER_KERNELS_FAIL_LOG="$OUT/failures.log" timeout ${TEST_TIMEOUT:-260} \
  $PY -m pytest -q -rfE $XDIST $TOUT --durations=25 tests ${GPU_CHECK_K:+-k "$GPU_CHECK_K"} ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
tail -40 "$OUT/tests.log"
[ -s "$OUT/failures.log" ] && { echo "== failures"; grep "^==== " "$OUT/failures.log"; }

if [ "${GPU_CHECK_DEMO:-1}" = 1 ]; then
  echo "== demo"
  timeout ${DEMO_TIMEOUT:-90} $PY -m convmixer_kernels demo > "$OUT/demo.log" 2>&1 || status=1
  tail -12 "$OUT/demo.log"
fi

if [ "${GPU_CHECK_BENCH:-1}" = 1 ]; then
echo "== benchmarks"
timeout ${BENCH_TIMEOUT:-170} $PY -m benchmarks.run --quick --profile --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
tail -30 "$OUT/bench.log"
fi
exit $status
