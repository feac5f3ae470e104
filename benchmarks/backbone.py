"""Backbone benchmark: params, MACs and latency of Res2Net-50/101 vs ResNet-50/101, eager vs optimised.

    python benchmarks/backbone.py [--json OUT] [--repeats 15] [--threads 2] [--device cpu|cuda] [--amp] [--markdown]
                                  [--models NAME ...] [--settings b1_224 ...] [--profile]

Latency is the median over ``--repeats`` timed calls after warm-up, in eval mode (on CUDA with
``torch.cuda.synchronize`` around each call; defaults 3 + 15 calls on CPU, 10 + 50 on CUDA). All variants of
one input setting are timed interleaved (round-robin), so machine noise hits them alike and the ratios are
fair. 'optimised' is ``res2det.optimize.optimize_for_inference`` (BN folding, fused ReLU, grouped stage-block
convs, and on CPU in fp32 the per-layer kernel and layout selection measured on this machine; the selection
time is reported). On CUDA and with ``--amp`` it is the fusion alone: the selection's candidate kernels are
CPU fp32 ones. ``--amp`` runs every variant under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU).
Every optimised model's output is checked against eager in fp32 (max abs diff printed; must stay <= 1e-4).
``--markdown`` prints the table in the format of docs/inference.md's backbone table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import res2det  # noqa: E402
from res2det.checkpoint import atomic_write  # noqa: E402
from res2det.optimize import optimize_for_inference  # noqa: E402
from res2det.utils.complexity import count_macs, count_params  # noqa: E402

MODELS = ["res2net50_26w_4s", "resnet50", "res2net101_26w_4s", "resnet101"]
SETTINGS = {"b1_224": (1, 224, 224), "b8_224": (8, 224, 224), "b1_800x1333": (1, 800, 1333)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, x: torch.Tensor, *, warmup: int, repeats: int, device: str) -> dict[str, float]:
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        _sync(device)
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def parse_run_options(ap: argparse.ArgumentParser, argv, *, warmup: tuple[int, int], repeats: tuple[int, int],
                      repeats_note: str = "") -> argparse.Namespace:
    """The options every benchmark script shares, parsed and applied (threads, CUDA check, the per-device
    defaults of ``warmup``/``repeats`` given as (CPU, CUDA))."""
    ap.add_argument("--repeats", type=int, help=f"timed calls per variant (default {repeats[0]} on CPU, "
                    f"{repeats[1]} on CUDA{repeats_note})")
    ap.add_argument("--warmup", type=int, help=f"untimed calls per variant first (default {warmup[0]} on CPU, "
                    f"{warmup[1]} on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", action="store_true", help="autocast to fp16 (cuda) / bf16 (cpu) for every variant")
    ap.add_argument("--amp-dtype", choices=["fp16", "bf16"], help="the autocast dtype of --amp (default: fp16 on "
                    "cuda, bf16 on cpu)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--profile", action="store_true", help="also print each optimised model's top ops")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    cuda = args.device == "cuda"
    args.warmup = warmup[cuda] if args.warmup is None else args.warmup
    args.repeats = repeats[cuda] if args.repeats is None else args.repeats
    args.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.amp_dtype or ("fp16" if cuda else "bf16")]
    return args


def print_profile(label: str, fn, x: torch.Tensor, calls: int = 3) -> None:
    """Where the time goes: torch.profiler's ops by self time over ``calls`` calls (``--profile``)."""
    from torch.profiler import profile

    with torch.inference_mode(), profile() as prof:
        for _ in range(calls):
            fn(x)
    print(f"\n{label}: {calls} calls")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def write_json(path: Path | None, result: dict) -> None:
    if path:
        text = json.dumps(result, indent=2)
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def markdown_table(rows: list[dict]) -> str:
    """The backbone table of docs/inference.md."""
    lines = ["| setting | model | params (M) | GMACs | eager ms | optimised ms | speed-up | vs ResNet (both optimised) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        vs = f"{r['vs_resnet_optimised']:.2f}x" if "vs_resnet_optimised" in r else "-"
        lines.append(f"| {r['setting']} | {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {r['eager_ms']:.1f} | "
                     f"{r['optimised_ms']:.1f} | {r['speedup']:.2f}x | {vs} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--markdown", action="store_true", help="also print the table as markdown (docs/inference.md)")
    args = parse_run_options(ap, argv, warmup=(3, 10), repeats=(15, 50), repeats_note="; 800x1333 on CPU: at most 7")
    cuda = args.device == "cuda"
    select = not cuda and not args.amp

    rows = []
    for setting in args.settings:
        b, h, w = SETTINGS[setting]
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0)).to(args.device)
        fns, info = {}, {}
        for name in args.models:
            model = res2det.create_model(name).eval()
            torch.manual_seed(0)
            for m in model.modules():  # non-trivial BN statistics so that folding is really tested
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 2.0)
            model = model.to(args.device)
            start = time.perf_counter()
            opt = optimize_for_inference(model, x, select=select)
            tune_s = time.perf_counter() - start
            with torch.inference_mode():
                diff = (opt(x) - model(x)).abs().max().item()
            info[name] = dict(params_m=count_params(model) / 1e6, gmacs=count_macs(model, x[:1]) / 1e9, max_abs_diff=diff,
                              selection_s=tune_s, stage_layouts=getattr(opt, 'stage_layouts', None))
            autocast = torch.autocast(args.device, dtype=args.amp_dtype, enabled=args.amp)

            def wrap(f, autocast=autocast):
                def run(inp):
                    with autocast:
                        return f(inp)
                return run

            fns[f"{name}|eager"] = wrap(model)
            fns[f"{name}|optimised"] = wrap(opt)
            if args.profile:
                print_profile(f"{setting} {name} optimised", fns[f"{name}|optimised"], x)
        repeats = min(args.repeats, 7) if h * w > 500_000 and not cuda else args.repeats
        ms = time_interleaved(fns, x, warmup=args.warmup, repeats=repeats, device=args.device)
        for name in args.models:
            eager, opt = ms[f"{name}|eager"], ms[f"{name}|optimised"]
            rows.append(dict(setting=setting, model=name, eager_ms=eager, optimised_ms=opt, speedup=eager / opt,
                             images_per_s=b * 1000 / opt, **info[name]))
        for row in rows:
            if row["setting"] == setting and row["model"].startswith("res2net"):
                base = "resnet" + row["model"][len("res2net"):].split("_")[0]
                ref = next((r for r in rows if r["setting"] == setting and r["model"] == base), None)
                if ref:
                    row["vs_resnet_optimised"] = ref["optimised_ms"] / row["optimised_ms"]
                    row["vs_resnet_eager"] = ref["eager_ms"] / row["eager_ms"]

    header = f"{'setting':12s} {'model':18s} {'params(M)':>9s} {'GMACs':>6s} {'eager ms':>9s} {'opt ms':>8s} " \
             f"{'speedup':>7s} {'vs ResNet (opt)':>15s} {'max|d|':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        vs = f"{r['vs_resnet_optimised']:.2f}x" if "vs_resnet_optimised" in r else "-"
        print(f"{r['setting']:12s} {r['model']:18s} {r['params_m']:9.2f} {r['gmacs']:6.2f} {r['eager_ms']:9.1f} "
              f"{r['optimised_ms']:8.1f} {r['speedup']:6.2f}x {vs:>15s} {r['max_abs_diff']:8.1e}")
    if args.markdown:
        print()
        print(markdown_table(rows))
    result = dict(
        rows=rows,
        options=dict(device=args.device, amp=args.amp and str(args.amp_dtype), threads=torch.get_num_threads(),
                     repeats=args.repeats, warmup=args.warmup, kernel_selection=select),
        machine=dict(torch=torch.__version__, python=platform.python_version(), cpu=platform.processor() or platform.machine(),
                     cuda=torch.cuda.get_device_name() if args.device == "cuda" else None),
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
