#!/usr/bin/env bash
# Nsight Compute on the depthwise eval kernels of issue 3's missed case (k=7, C=768, B=64, 32x32, bf16,
# NCHW and channels_last), to see what bounds them: SM and memory throughput against peak, occupancy
# and its limiter, warp stall reasons, shared-memory traffic.  For a second device call after
# `make gpu-check` on the same warm machine (it reuses the extension built there; else it builds it).
# Writes $OUT/ncu_dw.txt.  Needs ncu (the CUDA toolkit's) and access to the GPU's performance counters;
# where the driver denies them, ncu says ERR_NVGPUCTRPERM and the file says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
NCU=${NCU:-$(command -v ncu || ls /usr/local/cuda/bin/ncu /usr/local/cuda-*/bin/ncu 2>/dev/null | head -1)}
[ -n "$NCU" ] || { echo "no ncu on this machine" | tee "$OUT/ncu_dw.txt"; exit 1; }
$PY -c "import convmixer_kernels._C" 2>/dev/null || \
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 150 \
  $PY setup.py build_ext --inplace > "$OUT/ncu_build.log" 2>&1
# One process per (layout, activation): 3 launches to warm up, then the 4th is profiled.
cat > /tmp/ncu_dw_run.py <<'PYEOF'
import sys, torch, convmixer_kernels  # noqa: F401
ops = torch.ops.convmixer_kernels
torch.manual_seed(0)
k, layout, act = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
N, C, H = 64, 768, 32
fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
x = torch.randn(N, C, H, H, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
w = torch.randn(C, 1, k, k, device="cuda") * 0.1
b, s, t = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
for _ in range(4):
    ops.dw_fwd(x, w, b, s, t, act, True, True)
torch.cuda.synchronize()
PYEOF
rc=0
: > "$OUT/ncu_dw.txt"
for layout in nchw cl; do
  for act in 2 0; do  # gelu (the benchmark's), identity (what the activation costs)
    echo "######## k=${NCU_K:-7} $layout act=$act (2 gelu, 0 identity), bf16, N=64 C=768 32x32" >> "$OUT/ncu_dw.txt"
    timeout -k 10 ${NCU_TIMEOUT:-60} "$NCU" --target-processes all --kernel-name regex:dw_fwd_tiled \
      --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
      $PY /tmp/ncu_dw_run.py ${NCU_K:-7} $layout $act >> "$OUT/ncu_dw.txt" 2>&1 || rc=1
  done
done
grep -E "########|Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|ERR_" "$OUT/ncu_dw.txt"
exit $rc
