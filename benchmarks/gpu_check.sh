#!/usr/bin/env bash
# `make gpu-check`: run on the lent GPU machine, where nothing can be installed.  Uses that machine's
# python3 (torch with CUDA, triton, ninja, pytest), builds in place for sm_90a with 16 jobs, times the
# tensor-core depthwise kernels against the FMA ones first (their own process), runs the GPU tests,
# then the benchmarks, then (GPU_CHECK_DEMO=1) the demo.  Logs and results go to $OUT.
# One deadline for the whole call: GPU_CHECK_BUDGET seconds (default 550) from the start, so that a
# device call with timeout_s 590 is never cut by the tool (which would lose the results).  Each stage
# gets at most its own limit and never more than the time left minus what the later stages need at
# least: build 200 s (53 s on an H200 on 2026-11-26; since then the per-activation CPU epilogues and the
# tensor-core and CUTLASS kernels were added: the slowest translation units take 40-90 s each on this
# project's CPU, one core each), the first look 90 s, tests 240 s (186 s for the GPU subset there,
# leaving the benchmarks at least 120 s), then the benchmarks all that is left (but the demo's 75 s
# when it is on), the demo what is left after them (skipped under 45 s).  The benchmarks rewrite their CSV/MD after every suite, so a stage stopped by its limit
# still leaves its log and the results measured so far.
# Tests: by default the GPU-relevant ones (-k "$GPU_CHECK_K"): the cuda and triton backends and the
# GPU-marked tests; the CPU-only files (and the CPU emulator of the CUDA kernels) run in CI.
# A short follow-up call can narrow every stage: GPU_CHECK_K / PYTEST_ARGS (tests), GPU_CHECK_FIRST_ARGS
# (the first look's benchmark arguments), GPU_CHECK_BENCH_ARGS (the benchmarks'), GPU_CHECK_DIAG=1,
# GPU_CHECK_NCU=0 / GPU_CHECK_NCU_ARGS (the last stage, Nsight Compute with the time left: --cases ...).
# FIRST_RESERVE / TEST_RESERVE: the seconds those stages leave for the later ones (280 / 120).
# TEST_TIMEOUT: the test stage's own limit (300 s: 217 s on 2026-11-27, and the thirteenth session added
# the CUTLASS training GEMM's tests and two activations to every activation list).
set -uo pipefail
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-550}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# limit STAGE_MAX RESERVE: the seconds a stage may take (its own limit, and the later stages' reserve)
limit() { local l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 10 ] && l=10; echo $l; }
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $PY -c "import timm, torchvision; print('timm', timm.__version__, 'torchvision', torchvision.__version__)" 2>&1 | tail -1
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The image's default compiler (/opt/gcc, CC/CXX point there) built a _C.so holding its own copy of
# libstdc++'s ostream::_M_insert<long>, which crashed against the system libstdc++ that torch loads
# whenever an error message streamed an integer (benchmarks/results/NOTES.md).  Build with the
# system compiler, the one that matches the libstdc++ at run time, when there is one.
CXX_PICK=${GPU_CHECK_CXX:-}
if [ -z "$CXX_PICK" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then CXX_PICK=/usr/bin/g++; fi
if [ -n "$CXX_PICK" ] && [ "$CXX_PICK" != default ]; then  # GPU_CHECK_CXX=default: the environment's own
  CXX_PICK=$(command -v "$CXX_PICK" || echo "$CXX_PICK")  # a bare name (g++) as a path
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
  timeout -k 10 $(limit ${BUILD_TIMEOUT:-200} 300) $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
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

# First look (its own process, so a fault in the never-run kernels cannot end the call or spoil the
# later stages): issue 3's k=7 case, eager, the default kernels, the channels_last backward without
# its fp32 dpre pass (cuda_bwd_staged, new on 2026-11-27 and never timed) and with its weight-gradient
# partials in registers (cuda_bwd_regs, new on 2026-11-28, never run).  -> $OUT/first/
if [ "${GPU_CHECK_FIRST:-1}" = 1 ]; then
  echo "== first look: k=7, eager vs cuda vs cuda_bwd_staged vs cuda_bwd_regs ($(left) s left)"
  BENCH_COMMIT=${GPU_CHECK_COMMIT:-} timeout -k 5 $(limit ${FIRST_TIMEOUT:-90} ${FIRST_RESERVE:-280}) \
    $PY -m benchmarks.run ${GPU_CHECK_FIRST_ARGS:---quick --suite dw --k 7 --providers eager,cuda,cuda_bwd_staged,cuda_bwd_regs} --out "$OUT/first" \
    > "$OUT/first.log" 2>&1 || echo "first look: exit status $? (see first.log)"
  grep "^| N=64" "$OUT"/first/*.md 2>/dev/null | grep " eval \| train " | cut -c1-150
fi

echo "== tests"
# Workers in parallel (pytest-xdist, when there): a worker that crashes is replaced and its test fails,
# instead of the crash ending the run; pytest-timeout stops a hung test.
XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-14}"
TOUT=""; $PY -c "import pytest_timeout" 2>/dev/null && TOUT="--timeout 150"
# pytest-benchmark (installed there) warns once per worker that xdist disables it: leave it out.
$PY -c "import pytest_benchmark" 2>/dev/null && TOUT="$TOUT -p no:benchmark"
# The tests' CPU work is small: one thread per worker, or the workers' thread pools fight for the cores.
# Outcomes are written to outcomes.log as they happen (tests/conftest.py: each failure in full, one
# `passed <id>` line a passed test), so a run stopped by its limit still names what failed and what passed.
GPU_CHECK_K=${GPU_CHECK_K-(cuda or triton or gpu) and not cuda_emu}
OMP_NUM_THREADS=1 CONVMIXER_KERNELS_FAIL_LOG="$OUT/outcomes.log" timeout -k 10 $(limit ${TEST_TIMEOUT:-300} ${TEST_RESERVE:-120}) \
  $PY -m pytest -q -rfE $XDIST $TOUT --durations=25 tests ${GPU_CHECK_K:+-k "$GPU_CHECK_K"} ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1 || status=1
tail -40 "$OUT/tests.log"
if [ -s "$OUT/outcomes.log" ]; then
  echo "== outcomes: $(grep -c "^passed " "$OUT/outcomes.log") passed, $(grep -c "^==== " "$OUT/outcomes.log") failed"
  grep "^==== " "$OUT/outcomes.log"
fi

# Diagnostics (GPU_CHECK_DIAG=1): where the Triton fp32 stem's BN-weight-gradient error comes from.
if [ "${GPU_CHECK_DIAG:-0}" = 1 ]; then
  echo "== diagnostics ($(left) s left)"
  timeout -k 5 $(limit 60 5) $PY -m benchmarks.diag_stem_fp32 > "$OUT/diag.log" 2>&1 || status=1
  grep -v Warning "$OUT/diag.log" | tail -12
fi

if [ "${GPU_CHECK_BENCH:-1}" = 1 ]; then
  echo "== benchmarks ($(left) s left)"
  BENCH_COMMIT=${GPU_CHECK_COMMIT:-} timeout -k 10 $(limit ${BENCH_TIMEOUT:-400} $([ "${GPU_CHECK_DEMO:-0}" = 1 ] && echo 75 || echo 5)) \
    $PY -m benchmarks.run ${GPU_CHECK_BENCH_ARGS:---quick --profile} --out "$OUT" > "$OUT/bench.log" 2>&1 || status=1
  tail -30 "$OUT/bench.log"
fi

if [ "${GPU_CHECK_DEMO:-0}" = 1 ] && [ "$(left)" -ge 45 ]; then
  echo "== demo ($(left) s left)"
  timeout -k 5 $(limit ${DEMO_TIMEOUT:-90} 5) $PY -m convmixer_kernels demo > "$OUT/demo.log" 2>&1 || status=1
  tail -12 "$OUT/demo.log"
fi
# Nsight Compute with what is left of the budget (GPU_CHECK_NCU=0: not at all): every kernel of one step of
# each block, the largest misses first (benchmarks/ncu_steps.py) -> $OUT/ncu/summary.md and a CSV a case.
# The 2026-11-27 gpu-check finished 130 s inside its budget; this stage takes no time from the others.
if [ "${GPU_CHECK_NCU:-1}" = 1 ] && [ "$(left)" -ge 40 ]; then
  echo "== ncu ($(left) s left)"
  nb=$(limit ${NCU_STAGE_TIMEOUT:-300} 10)  # (the kill below comes at most 5 s after nb: inside the deadline)
  timeout -k 5 $nb $PY -m benchmarks.ncu_steps --out "$OUT" --budget $(( nb - 5 )) ${GPU_CHECK_NCU_ARGS:-} \
    > "$OUT/ncu.log" 2>&1 || echo "ncu stage: exit status $? (see ncu.log)"
  grep -E "^### |ERR_|skipped" "$OUT/ncu.log" | head -20
fi
echo "gpu-check took $(( $(date +%s) - T0 )) s"
exit $status
