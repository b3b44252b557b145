"""The benchmark harness end to end (CI's smoke test: `--quick --device cpu`, tiny shapes; it never
asserts on time), and the arithmetic of its derived figures and target table on made-up rows."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.report import CSV_COLUMNS, derive, targets  # noqa: E402


def test_quick_cpu_run_writes_every_suite(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    csvs = list(tmp_path.glob("cpu-*-quick.csv"))
    assert len(csvs) == 1, os.listdir(tmp_path)
    with open(csvs[0], newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert {r["suite"] for r in rows} == {"dw", "pw", "stem", "residual", "model"}
    assert not [r for r in rows if r["error"]], [r["error"] for r in rows if r["error"]]
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert r["device"].startswith("CPU") and r["commit"] and r["torch"]
    provs = {(r["suite"], r["provider"]) for r in rows}
    # every kind of provider of the CPU run: the baselines, the fused backends, the bare GEMM line
    assert {("dw", "eager"), ("dw", "compile"), ("dw", "cpu"), ("dw", "torch"), ("pw", "bare_gemm"),
            ("model", "eager"), ("model", "auto")} <= provs
    assert {r["mode"] for r in rows if r["suite"] == "dw"} == {"eval", "train_fwd", "train"}
    dw = [r for r in rows if r["suite"] == "dw" and r["provider"] == "cpu"]
    assert all(r["vs_eager_same_layout"] and r["roofline_pct"] and r["gb_per_s"] for r in dw)
    assert all(float(r["images_per_s"]) > 0 for r in rows if r["suite"] == "model")
    md = csvs[0].with_suffix(".md").read_text()
    assert "## Targets" in md and "depthwise block eval >= 1.5x eager" in md and "Ceilings measured" in md
    pytest.importorskip("matplotlib")
    p = subprocess.run([sys.executable, "-m", "benchmarks.plot", str(csvs[0])], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for suffix in ("-speedup.png", "-models.png"):
        png = tmp_path / (csvs[0].stem + suffix)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [(["--suite", "dw,bogus"], "--suite: unknown ['bogus']"),
                                          (["--dtype", "fp8"], "--dtype: expected a comma list"),
                                          (["--providers", "eager,cuda_grpah"], "--providers: unknown ['cuda_grpah']"),
                                          (["--k", "7,nine"], "--k: expected a comma list of kernel sizes")])
def test_bad_arguments(args, message):
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cpu"] + args, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]


def test_kernel_size_filter(tmp_path):
    """--k keeps only those depthwise kernel sizes (gpu-check's first look times k=7 alone)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--suite", "dw", "--k",
                        "9", "--providers", "eager,cpu", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(next(tmp_path.glob("cpu-*-quick.csv")), newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["k"] for r in rows} == {"9"} and {r["provider"] for r in rows} == {"eager", "cpu"}


def _row(provider, ms, layout="nchw", mode="eval", suite="dw", **kw):
    r = dict(suite=suite, op=suite, N=64, C=768, H=32, k=9, dtype="bf16", mode=mode, layout=layout, provider=provider,
             shape="N=64 C=768 32x32 k=9", ms=ms, bytes=2e9, flops=1e12)
    r.update(kw)
    return r


def test_derived_figures():
    rows = [_row("eager", 4.0), _row("eager", 8.0, layout="channels_last"), _row("compile", 2.0),
            _row("cuda", 1.0), _row("cuda", 2.0, layout="channels_last")]
    derive(rows, {"bandwidth": 4e12, "fp32_fma": 5e13})
    cuda, cuda_cl = rows[3], rows[4]
    assert cuda["vs_eager_best"] == 4.0 and cuda_cl["vs_eager_best"] == 2.0
    assert cuda["vs_eager_same_layout"] == 4.0 and cuda_cl["vs_eager_same_layout"] == 4.0
    assert cuda["vs_compile_best"] == 2.0 and cuda["vs_baseline_best"] == 2.0
    assert cuda["gb_per_s"] == pytest.approx(2000.0) and cuda["tflop_per_s"] == pytest.approx(1000.0)
    # floor = max(2e9 B / 4e12 B/s, 1e12 / 5e13 FLOP/s) = 20 ms; the row took 1 ms
    assert cuda["roofline_pct"] == pytest.approx(2000.0)
    gem = [_row("bare_gemm", 1.0, suite="pw", layout="-"), _row("cuda", 1.1, suite="pw", layout="channels_last")]
    derive(gem, {})
    assert gem[1]["x_bare_gemm"] == pytest.approx(1.1) and gem[0]["vs_eager_best"] is None
    assert gem[1]["roofline_pct"] is None  # no ceilings measured: no roofline


def test_targets_table():
    rows = [_row("eager", 3.0), _row("cuda", 1.0), _row("cuda_ipb1", 0.1), _row("triton", 2.0),
            _row("eager", 3.0, k=7, shape="k7"), _row("cuda", 1.5, k=7, shape="k7")]
    derive(rows, {"bandwidth": 4e12, "fp32_fma": 5e13})
    t = [x for x in targets(rows, "cuda") if x[0] == "depthwise block eval >= 3x eager (best layout)"]
    # the best fused provider per case, never the diagnostic cuda_ipb1; k=7 at 2x misses the 3x target
    assert [(case.split()[0], prov, val, met) for _, case, prov, val, met in t] == \
        [("N=64", "cuda", "3.00x", True), ("k7", "cuda", "2.00x", False)]
    missing = [x for x in targets(rows, "cuda") if x[0].startswith("pointwise block eval <=")]
    assert missing == [("pointwise block eval <= 1.15x the bare GEMM", "-", "-", "not measured in this run", None)]
    assert all(x[0].endswith("(2-core CPU)") for x in targets(rows, "cpu"))


def test_provider_sets_every_variable_and_restores_them(monkeypatch):
    """A provider with two variables (cuda_cutlass_pp) sets both inside the block and leaves the
    environment as it was: a value that was there comes back, one that was not is removed."""
    from benchmarks import harness

    monkeypatch.setenv("CONVMIXER_KERNELS_PW_CUTLASS", "0")
    monkeypatch.delenv("CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE", raising=False)
    monkeypatch.setitem(harness.PROVIDERS, "two_vars", ("cpu", harness.PROVIDERS["cuda_cutlass_pp"][1]))
    with harness.as_provider("two_vars"):
        assert os.environ["CONVMIXER_KERNELS_PW_CUTLASS"] == "require"
        assert os.environ["CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE"] == "pingpong"
    assert os.environ["CONVMIXER_KERNELS_PW_CUTLASS"] == "0"
    assert "CONVMIXER_KERNELS_PW_CUTLASS_SCHEDULE" not in os.environ
