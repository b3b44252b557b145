"""python -m convmixer_kernels {info,demo}"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _demo(args) -> int:
    import convmixer_kernels as ck
    from convmixer_kernels.reference import ConvMixer

    ck.info()
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    dim, depth, k, p, res, batch = (1536, 20, 9, 7, 224, 64) if cuda else (256, 8, 5, 2, 32, 8)
    torch.manual_seed(0)
    model = ConvMixer(dim, depth, kernel_size=k, patch_size=p, n_classes=10 if not cuda else 1000).to(device)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"\nreference ConvMixer-{dim}/{depth} (k={k}, p={p}) on {device}: {n_params:,} parameters")
    x = torch.randn(batch, 3, res, res, device=device)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    print(f"forward of a {tuple(x.shape)} batch -> logits {tuple(logits.shape)}")

    # The fused depthwise block, checked against the model's first depthwise block.
    ref_block = model[3][0]  # Residual(Sequential(conv, GELU, BN))
    fused = ck.FusedDepthwiseBlock(dim, k).to(device)
    fused.conv.load_state_dict(ref_block.fn[0].state_dict())
    fused.norm.load_state_dict(ref_block.fn[2].state_dict())
    fused.eval()
    with torch.no_grad():
        h = model[2](model[1](model[0](x)))
        want, got = ref_block(h), fused(h)
    err = (got - want).abs().max().item()
    print(f"fused depthwise block vs eager block (eval, fp32): max abs difference {err:.2e}")

    def timeit(fn, n=10):
        fn()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    with torch.no_grad():
        t_ref = timeit(lambda: ref_block(h))
        t_fused = timeit(lambda: fused(h))
    print(f"depthwise block, eval forward on {device}: eager {t_ref:.2f} ms, fused ({ck.backends.resolve('dw_block', h.device)}) "
          f"{t_fused:.2f} ms -> {t_ref / t_fused:.2f}x")
    return 0 if err < 1e-3 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convmixer_kernels")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, what was built, usable backends, the GPU")
    d = sub.add_parser("demo", help="build a ConvMixer, check and time the fused kernels against it")
    d.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        import convmixer_kernels as ck

        ck.info()
        return 0
    if args.cmd == "demo":
        return _demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
