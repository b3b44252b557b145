"""Charts from a result CSV of benchmarks/run.py: speedup over eager per shape, and model images/s.

    python -m benchmarks.plot benchmarks/results/nvidia-h200-2026-11-26.csv
writes <csv stem>-speedup.png (the fused providers' speedup over eager's best layout, per shape and
mode, one panel per suite) and <csv stem>-models.png (images/s per provider, when the CSV has models).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.harness import BASELINES  # noqa: E402
from benchmarks.report import DIAGNOSTIC, read_csv  # noqa: E402

MODE_ORDER = {"eval": 0, "train_fwd": 1, "train": 2}
SUITE_TITLES = {"dw": "depthwise block", "pw": "pointwise block", "stem": "stem"}


def _bars(ax, labels, series, ylabel, ref=None):
    """Grouped bars: labels along x, one bar per series name (dict name -> list of values or None)."""
    import numpy as np

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, [v if v is not None else 0 for v in vals], width, label=name)
    if ref is not None:
        ax.axhline(ref, color="black", lw=0.8, ls="--")
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot(csv_path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_csv(csv_path) if r.get("median_ms") is not None]
    if not rows:
        raise SystemExit(f"{csv_path}: no measured rows")
    device, date = rows[0]["device"], f"{(rows[0]['date'] or '')[:10]}, commit {rows[0]['commit']}"
    stem = os.path.splitext(csv_path)[0]
    written = []
    suites = [s for s in SUITE_TITLES if any(r["suite"] == s for r in rows)]
    if suites:
        fig, axes = plt.subplots(len(suites), 1, figsize=(12, 3.6 * len(suites)), squeeze=False)
        for ax, suite in zip(axes[:, 0], suites):
            rs = [r for r in rows if r["suite"] == suite and r["provider"] not in BASELINES + DIAGNOSTIC + ("bare_gemm",)
                  and r.get("vs_eager_best") is not None]
            cases = sorted({(r["shape"], r["layout"], r["dtype"], r["mode"]) for r in rs},
                           key=lambda c: (MODE_ORDER.get(c[3], 9), c[0], c[1], c[2]))
            provs = sorted({r["provider"] for r in rs})
            val = {(r["shape"], r["layout"], r["dtype"], r["mode"], r["provider"]): r["vs_eager_best"] for r in rs}
            labels = [f"{s} {'CL' if lay == 'channels_last' else lay.upper()} {dt} {m}" for s, lay, dt, m in cases]
            _bars(ax, labels, {p: [val.get(c + (p,)) for c in cases] for p in provs},
                  "speedup over eager (best layout)", ref=1.0)
            ax.set_title(f"{SUITE_TITLES[suite]}: {device}, {date}", fontsize=9)
        fig.tight_layout()
        written.append(stem + "-speedup.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    models = [r for r in rows if r["suite"] == "model" and r.get("images_per_s")]
    if models:  # one panel per model and dtype (their images/s differ by orders of magnitude)
        panels = sorted({(r["shape"], r["dtype"]) for r in models})
        cols = min(3, len(panels))
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
        for ax, (shape, dt) in zip(axes.flat, panels):
            rs = [r for r in models if r["shape"] == shape and r["dtype"] == dt]
            modes = sorted({r["mode"] for r in rs}, key=lambda m: MODE_ORDER.get(m, 9))
            provs = sorted({(r["provider"], r["layout"]) for r in rs})
            val = {(r["mode"], r["provider"], r["layout"]): r["images_per_s"] for r in rs}
            _bars(ax, modes, {f"{p} ({'CL' if lay == 'channels_last' else lay})": [val.get((m, p, lay)) for m in modes]
                              for p, lay in provs}, "images/s")
            ax.set_title(f"{shape} {dt}", fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"whole models: {device}, {date}", fontsize=9)
        fig.tight_layout()
        written.append(stem + "-models.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="result CSV files of benchmarks/run.py")
    args = ap.parse_args(argv)
    for path in args.csv:
        for out in plot(path):
            print("wrote", out)


if __name__ == "__main__":
    main()
