"""python -m convmixer_kernels {info,demo,verify}"""

from __future__ import annotations

import argparse
import sys

import torch


def _progress(total, desc):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()


def _print_checks(result, verbose=False):
    bad = [c for c in result["checks"] if not c[-1]]
    worst = max(result["checks"], key=lambda c: c[1] / c[3] if c[3] else 0.0)
    print(f"verified {len(result['checks'])} tensors (eval output and loss; training loss, every gradient, "
          f"running statistics): {'OK' if result['ok'] else f'{len(bad)} FAILED'}")
    print(f"  tightest: {worst[0]}: fused error {worst[1]:.2e}, original's own {worst[2]:.2e}, bound {worst[3]:.2e}")
    for c in (result["checks"] if verbose else bad):
        print(f"  {'ok  ' if c[-1] else 'FAIL'} {c[0]}: fused {c[1]:.2e}, original {c[2]:.2e}, bound {c[3]:.2e}")


def _demo(args) -> int:
    import copy

    import convmixer_kernels as ck
    from convmixer_kernels.reference import ConvMixer
    from convmixer_kernels.verify import time_model, verify_model

    ck.info()
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    if cuda:
        dim, depth, k, p, res, batch, classes = 1536, 20, 9, 7, 224, 64, 1000
    else:
        dim, depth, k, p, res, batch, classes = 256, 8, 5, 2, 32, 32, 10
    torch.manual_seed(0)
    model = ConvMixer(dim, depth, kernel_size=k, patch_size=p, n_classes=classes)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"\nConvMixer-{dim}/{depth} (k={k}, p={p}, {n_params:,} parameters) on {device}")
    vshape = (2, 3, res, res) if not cuda else (2, 3, 112, 112)
    bar = _progress(2 * (2 + 2 * len(list(model.parameters())) + 3 * len(list(model.buffers()))), "verifying")
    result = verify_model(model, vshape, device=device, progress=bar)
    bar.close()
    print(result["report"].__str__().split("\n")[0])
    _print_checks(result)
    fused = result["fused"]
    model = model.to(device)
    dtypes = [torch.float32] + ([torch.bfloat16] if cuda else [])
    rows = []
    bar = _progress(len(dtypes) * 4, "timing")
    for dt in dtypes:
        fmt = torch.channels_last
        x = torch.randn(batch, 3, res, res, device=device, dtype=dt).contiguous(memory_format=fmt)
        for training in (False, True):
            times = {}
            for name, m in (("eager", model), ("fused", fused)):
                mm = copy.deepcopy(m).to(dtype=dt, memory_format=fmt)
                times[name] = time_model(mm, x, training)
                bar.update(1)
            rows.append((str(dt).replace("torch.", ""), "train" if training else "eval", times["eager"],
                         times["fused"]))
    bar.close()
    print(f"\nspeed on {torch.cuda.get_device_name(0) if cuda else 'this CPU'} (batch {batch}, {res}x{res}, "
          "channels_last; ms per step):")
    print(f"  {'dtype':9s} {'mode':6s} {'eager':>10s} {'fused':>10s} {'speedup':>8s}")
    for dt, mode, te, tf in rows:
        print(f"  {dt:9s} {mode:6s} {te:10.2f} {tf:10.2f} {te / tf:7.2f}x")
    return 0 if result["ok"] else 1


def _verify(args) -> int:
    from convmixer_kernels.verify import load_model, verify_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model)
    shape = (args.batch, 3, args.size, args.size)
    bar = _progress(2 * (2 + 2 * len(list(model.parameters())) + 3 * len(list(model.buffers()))), "verifying")
    result = verify_model(model, shape, device=device, progress=bar)
    bar.close()
    print(result["report"])
    if result["deterministic"]:
        print(f"{len(result['deterministic'])} random layer(s) (dropout, drop path) ran as in eval in the training "
              "checks, so that every run sees the same network")
    if result["random_forward"]:
        print("WARNING: a forward drew random numbers all the same (functional dropout?): the training checks "
              "compared different draws and do not hold")
    _print_checks(result, args.verbose)
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convmixer_kernels")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, what was built, usable backends, the GPU")
    d = sub.add_parser("demo", help="build a ConvMixer, fuse it, verify it against the original, time both")
    d.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    v = sub.add_parser("verify", help="fuse a model and verify it against the original")
    v.add_argument("--model", required=True, help="timm:<name> or package.module:factory")
    v.add_argument("--device", default=None)
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--size", type=int, default=64, help="input height and width")
    v.add_argument("--verbose", action="store_true", help="print every check")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        import convmixer_kernels as ck

        ck.info()
        return 0
    if args.cmd == "demo":
        return _demo(args)
    return _verify(args)


if __name__ == "__main__":
    sys.exit(main())
