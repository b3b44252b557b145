"""Derived figures (speedups, GB/s, FLOP/s, % of roofline), the CSV and Markdown result files, and the
table of issue targets with their measured values."""

from __future__ import annotations

import csv
import re

from .harness import BASELINES, DTYPES, mm_ceiling

CSV_COLUMNS = ["device", "torch", "triton", "cuda", "commit", "date", "threads", "suite", "op", "provider", "mode",
               "dtype", "layout", "shape", "N", "C", "H", "W", "k", "median_ms", "p20_ms", "p80_ms", "gb_per_s",
               "tflop_per_s", "roofline_pct", "peak_mem_mb", "images_per_s", "vs_eager_best",
               "vs_eager_same_layout", "vs_compile_best", "vs_baseline_best", "x_bare_gemm", "error"]
# Diagnostic variants of a fused provider, kept out of the targets (cuda_ipb1 turns the pipeline off;
# cuda_bwd_regs is an opt-in kernel not yet measured: it counts once it is the default).
DIAGNOSTIC = ("cuda_ipb1", "cuda_bwd_copy", "cuda_bwd_nocopy", "cuda_bwd_staged", "cuda_bn_torch", "cuda_bwd_regs")


def _group_key(r):
    return tuple(r.get(k) for k in ("suite", "op", "N", "C", "H", "k", "dtype", "mode"))


def derive(rows, ceilings):
    """Fill each measured row's derived figures.  vs_eager_best: eager's best layout / this row (> 1 is
    faster); vs_eager_same_layout: eager in this row's layout; vs_compile_best: the best torch.compile
    mode and layout; vs_baseline_best: the best of eager (both layouts) and compile; x_bare_gemm: this row
    / the bare GEMM(s) of the same shape (< 1.15 is issue 4's eval target).  roofline_pct: the floor
    max(bytes / copy bandwidth, FLOPs / compute rate) over the time, with the compute rate the fp32 FMA
    rate for the depthwise block (its kernels compute in fp32 on the CUDA cores) and the dtype's matrix
    product rate for the GEMMs (ceilings: name -> value, measured in the same run; see harness.Ceilings)."""
    groups = {}
    for r in rows:
        if "ms" in r:
            groups.setdefault(_group_key(r), []).append(r)

    def best(rs, provs, layout=None):
        ts = [r["ms"] for r in rs if r["provider"] in provs and (layout is None or r["layout"] == layout)]
        return min(ts) if ts else None

    for rs in groups.values():
        eager = best(rs, ("eager",))
        comp = best(rs, ("compile", "compile_max"))
        base = best(rs, ("eager", "compile", "compile_max"))
        gemm = best(rs, ("bare_gemm",))
        for r in rs:
            ms = r["ms"]
            r["gb_per_s"] = r["bytes"] / (ms * 1e-3) / 1e9 if r.get("bytes") else None
            r["tflop_per_s"] = r["flops"] / (ms * 1e-3) / 1e12 if r.get("flops") else None
            r["roofline_pct"] = None
            rate = ceilings.get("fp32_fma" if r["suite"] == "dw" else
                                mm_ceiling(r["dtype"]) if r["dtype"] in DTYPES else "")
            if r.get("bytes") and r.get("flops") and rate and ceilings.get("bandwidth"):
                floor_s = max(r["bytes"] / ceilings["bandwidth"], r["flops"] / rate)
                r["roofline_pct"] = 100 * floor_s / (ms * 1e-3)
            if r["provider"] == "bare_gemm":  # a reference line, not compared with the others
                r.update(vs_eager_best=None, vs_eager_same_layout=None, vs_compile_best=None,
                         vs_baseline_best=None, x_bare_gemm=None)
                continue
            same = best(rs, ("eager",), r["layout"])
            r["vs_eager_best"] = eager / ms if eager else None
            r["vs_eager_same_layout"] = same / ms if same else None
            r["vs_compile_best"] = comp / ms if comp else None
            r["vs_baseline_best"] = base / ms if base else None
            r["x_bare_gemm"] = ms / gemm if gemm else None
    return rows


def write_csv(path, meta, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {k: meta.get(k) for k in ("device", "torch", "triton", "cuda", "commit", "date", "threads")}
            out.update({k: v for k, v in r.items() if k in CSV_COLUMNS})
            out.update(median_ms=r.get("ms"), p20_ms=r.get("p20"), p80_ms=r.get("p80"), peak_mem_mb=r.get("peak_mb"))
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in out.items()})


def read_csv(path):
    """Rows of a result CSV, numbers as floats, empty cells as None."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if v == "":
                    row[k] = None
                elif k in ("device", "torch", "triton", "cuda", "commit", "date", "suite", "op", "provider", "mode",
                           "dtype", "layout", "shape", "error"):
                    row[k] = v
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def slug(device_name: str) -> str:
    """File-name form of a device name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


# ----------------------------------------------------------------------------------------- targets
# (what, device, row filter, metric, ">=" or "<=", threshold).  The fused providers' best row per case
# (shape and layout) is checked; baselines and diagnostic variants are not candidates.
def _gpu_big(r, suite, Cs=(768, 1536)):
    return r["suite"] == suite and r["dtype"] == "bf16" and r.get("N") == 64 and r.get("C") in Cs


TARGETS = [
    ("depthwise block eval >= 3x eager (best layout)", "cuda",
     lambda r: _gpu_big(r, "dw") and r["k"] in (7, 9) and r["mode"] == "eval", "vs_eager_best", ">=", 3.0),
    ("depthwise block eval >= 70% of its roofline floor", "cuda",
     lambda r: _gpu_big(r, "dw") and r["k"] in (7, 9) and r["mode"] == "eval", "roofline_pct", ">=", 70.0),
    ("depthwise block training fwd+bwd >= 3x eager", "cuda",
     lambda r: _gpu_big(r, "dw") and r["k"] in (7, 9) and r["mode"] == "train", "vs_eager_best", ">=", 3.0),
    ("depthwise block training fwd+bwd >= 2x torch.compile", "cuda",
     lambda r: _gpu_big(r, "dw") and r["k"] in (7, 9) and r["mode"] == "train", "vs_compile_best", ">=", 2.0),
    ("pointwise block eval <= 1.15x the bare GEMM", "cuda",
     lambda r: _gpu_big(r, "pw") and r["layout"] == "channels_last" and r["mode"] == "eval", "x_bare_gemm", "<=", 1.15),
    ("pointwise block eval >= 1.5x eager", "cuda",
     lambda r: _gpu_big(r, "pw") and r["layout"] == "channels_last" and r["mode"] == "eval", "vs_eager_best", ">=", 1.5),
    ("pointwise block training <= 1.25x the three bare GEMMs", "cuda",
     lambda r: _gpu_big(r, "pw") and r["layout"] == "channels_last" and r["mode"] == "train", "x_bare_gemm", "<=", 1.25),
    ("stem (224x224, p=7) eval >= 1.5x eager", "cuda",
     lambda r: r["suite"] == "stem" and r["dtype"] == "bf16" and r.get("H") == 224 and r["k"] == 7
     and r["mode"] == "eval", "vs_eager_best", ">=", 1.5),
    ("ConvMixer training step >= 2x the best of eager NCHW, eager channels_last, torch.compile", "cuda",
     lambda r: r["suite"] == "model" and "convmixer" in r["op"] and r["dtype"] == "bf16" and r["mode"] == "train",
     "vs_baseline_best", ">=", 2.0),
    ("ConvMixer inference >= 3x the best of eager NCHW, eager channels_last, torch.compile", "cuda",
     lambda r: r["suite"] == "model" and "convmixer" in r["op"] and r["dtype"] == "bf16" and r["mode"] == "eval",
     "vs_baseline_best", ">=", 3.0),
    ("depthwise block eval >= 1.5x eager, same layout (2-core CPU)", "cpu",
     lambda r: r["suite"] == "dw" and r["mode"] == "eval" and r["dtype"] == "fp32" and r.get("C", 0) >= 64,
     "vs_eager_same_layout", ">=", 1.5),
]


def targets(rows, device):
    """[(target, case, provider, measured, met)] for this device's targets, from the best fused row of
    each case; a target with no row measured in this run gets one line saying so."""
    out = []
    for what, dev, pick, metric, op, thr in TARGETS:
        if dev != device:
            continue
        cands = [r for r in rows if r.get(metric) is not None and r["provider"] not in BASELINES + DIAGNOSTIC
                 and r["provider"] != "bare_gemm" and pick(r)]
        cases = {}
        for r in cands:
            key = (r["shape"], r["layout"])
            better = (lambda a, b: a > b) if op == ">=" else (lambda a, b: a < b)
            if key not in cases or better(r[metric], cases[key][metric]):
                cases[key] = r
        if not cases:
            out.append((what, "-", "-", "not measured in this run", None))
        for (shape, layout), r in sorted(cases.items()):
            v = r[metric]
            met = v >= thr if op == ">=" else v <= thr
            val = f"{v:.0f}%" if metric == "roofline_pct" else f"{v:.2f}x"
            out.append((what, f"{shape} {layout} {r['dtype']}", r["provider"], val, met))
    return out


# ----------------------------------------------------------------------------------------- markdown
def _f(v, spec="{:.2f}x"):
    return spec.format(v) if v is not None else "-"


def write_markdown(path, meta, rows):
    with open(path, "w") as f:
        f.write(f"# Benchmarks on {meta['device']}\n\n")
        f.write(f"commit {meta['commit']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
                f"CUDA {meta['cuda']}" + (f", {meta['threads']} CPU threads" if meta.get("threads") else "") + "\n\n")
        c = meta.get("ceilings") or {}
        if c:
            parts = [f"copy bandwidth {c['bandwidth'] / 1e9:.0f} GB/s" if "bandwidth" in c else None,
                     f"fp32 FMA rate {c['fp32_fma'] / 1e12:.2f} TFLOP/s" if "fp32_fma" in c else None]
            parts += [f"{k[3:]} matmul {v / 1e12:.2f} TFLOP/s" for k, v in c.items() if k.startswith("mm_")]
            f.write("Ceilings measured in this run: " + ", ".join(p for p in parts if p) + "\n\n")
        tg = targets(rows, meta["device_kind"])
        if tg:
            f.write("## Targets\n\n| target | case | provider | measured | met |\n|---|---|---|---|---|\n")
            for what, case, prov, val, met in tg:
                f.write(f"| {what} | {case} | {prov} | {val} | {'-' if met is None else 'yes' if met else 'NO'} |\n")
            f.write("\n")
        for suite in ("dw", "pw", "stem", "residual", "model"):
            rs = [r for r in rows if r["suite"] == suite]
            if not rs:
                continue
            f.write(f"## {suite}\n\n| shape | layout | dtype | mode | provider | ms (p20-p80) | vs eager best | "
                    "vs eager same layout | vs compile | x bare GEMM(s) | GB/s | TFLOP/s | % roofline | "
                    "peak MB | images/s |\n" + "|---" * 15 + "|\n")
            for r in rs:
                if "error" in r and r.get("ms") is None:
                    f.write(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                            f"FAILED: {r['error'][:120].replace('|', '/')} |" + " |" * 9 + "\n")
                    continue
                f.write(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
                        f"{r['ms']:.3f} ({r['p20']:.3f}-{r['p80']:.3f}) | {_f(r['vs_eager_best'])} | "
                        f"{_f(r['vs_eager_same_layout'])} | {_f(r['vs_compile_best'])} | {_f(r['x_bare_gemm'])} | "
                        f"{_f(r['gb_per_s'], '{:.0f}')} | {_f(r['tflop_per_s'], '{:.2f}')} | "
                        f"{_f(r['roofline_pct'], '{:.0f}%')} | {_f(r.get('peak_mb'), '{:.0f}')} | "
                        f"{_f(r.get('images_per_s'), '{:.0f}')} |\n")
            f.write("\n")
