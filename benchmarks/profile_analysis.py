"""Where the analysis's time goes on a GPU: kernels, launches, host syncs, and time per stage.

    python benchmarks/profile_analysis.py --config llama-3-8b --seq-len 1024 --batch 4

Runs one batch of the bare forward, the attention statistics alone and the whole analysis under
torch.profiler and prints, for each: wall time, summed kernel time, kernel launches, host syncs, the
device time of each stage (attention statistics, Gram and terms, spectra estimate, host copy) and the
costliest kernels. Then times ``estimate_spectrum`` alone on one batch's Gram matrices for a few
settings. The stage labels are added here by wrapping functions; the package has no profiling code.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from bench_analysis import build  # noqa: E402

LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
ACTIVITIES = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def label(module, name, tag):
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with record_function(tag):
            return fn(*a, **k)

    setattr(module, name, wrapped)


def add_labels():
    import mcr_exit.analysis.collect as collect
    import mcr_exit.models.attention_stats as att

    label(att, "fused_attention_stats", "stage: attention statistics")
    label(collect, "spectral_terms", "stage: gram + terms")
    label(collect, "estimate_spectrum", "stage: spectra estimate")
    label(collect, "finish_spectral", "stage: finish spectral")
    label(collect, "summarize_heads", "stage: summarize heads")
    label(collect._BatchBuffer, "flush", "stage: host copy")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats=3):
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return 1000 * statistics.median(out)


def report(name, fn, top, ms):
    with profile(activities=ACTIVITIES) as prof:
        fn()
        sync()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_ms = sum(e.self_device_time_total for e in kernels) / 1000
    launches = sum(e.count for e in events if e.key in LAUNCH)
    syncs = {e.key: (e.count, e.cpu_time_total / 1000) for e in events if e.key.startswith(SYNC)}
    print(f"\n== {name}: {ms:.1f} ms wall (median of 3, unprofiled); kernels {gpu_ms:.1f} ms; "
          f"{launches} launches; syncs {syncs}")
    for e in events:
        if e.key.startswith("stage:"):
            print(f"   {e.key:<34} calls {e.count:>4}  device {e.device_time_total / 1000:8.1f} ms  "
                  f"cpu {e.cpu_time_total / 1000:8.1f} ms")
    if top:
        print(f"   {'kernel':<90} {'calls':>6} {'ms':>8}")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
            print(f"   {e.key[:90]:<90} {e.count:>6} {e.self_device_time_total / 1000:8.2f}")
    return {e.key: (e.count, e.self_device_time_total / 1000) for e in kernels if not e.key.startswith("stage:")}


def print_difference(base, other, top):
    """Kernels by the device time they add over the base run (stage ranges left out)."""
    rows = []
    for key in set(base) | set(other):
        (n0, t0), (n1, t1) = base.get(key, (0, 0.0)), other.get(key, (0, 0.0))
        rows.append((t1 - t0, n1 - n0, key))
    total = sum(r[0] for r in rows)
    print(f"\n== kernel time the analysis adds to the bare forward: {total:.1f} ms per batch")
    for dt, dn, key in sorted(rows, reverse=True)[:top]:
        print(f"   {key[:90]:<90} {dn:>+6} {dt:+8.2f}")


def time_steps(configs, B=64, n=1024):
    """One Chebyshev step on B matrices n x n: the fused kernel per tile setting, and the torch version."""
    import re

    from mcr_exit.metrics.cheb_step import cheb_step

    A = torch.rand(B, n, n, device="cuda") / n
    A = (A + A.transpose(1, 2)).half()  # symmetric operands, as the estimate's are
    X, P = A @ A, A
    four = torch.full((B,), 4.0, device="cuda")
    flop = 2 * B * n**3
    print(f"\n== one Chebyshev step on {B} matrices {n} x {n} (float16, float32 accumulation)")
    runs = [("torch (bmm + elementwise)", dict(fused=False))]
    for c in configs:
        bm, bn, bk, w, st = map(int, re.match(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)$", c).groups())
        kw = dict(fused=True, blocks=(bm, bn, bk), warps=w, stages=st)
        runs.append((f"fused {c}", kw))
        if bm == bn:  # upper tiles only, mirrored (what the estimate runs); TFLOP/s of the full product
            runs.append((f"fused {c} sym", dict(kw, symmetric=True)))
    for name, kw in runs:
        try:
            ms = timed(lambda: cheb_step(A, X, P, four, -2.0, **kw), repeats=10)
            print(f"   {name:<28} {ms:7.3f} ms  {flop / ms / 1e9:6.0f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"   {name:<28} failed: {type(exc).__name__}: {str(exc)[:150]}")


def grams_of(loaded, ids, mask):
    from mcr_exit.metrics.spectral import spectral_terms
    from mcr_exit.models.forward import run_blocks

    grams = []
    run_blocks(loaded.adapter, ids, mask, lambda i, h: grams.append(
        spectral_terms(h, mask.sum(1), gram_dtype=torch.float32)[1]))
    return torch.cat(grams)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-3-8b")
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--step-configs", default="128x128x64w8s4,64x128x64w4s4,128x256x64w8s3,128x128x32w4s4",
                    help="tile settings of the fused step kernel to time (BMxBNxBK, warps, stages)")
    ap.add_argument("--estimates", default="D32,D48,i12",
                    help="estimate_spectrum settings to time alone (D degree, i iterations, w width)")
    args = ap.parse_args()

    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.metrics.spectral_estimate import estimate_spectrum
    from mcr_exit.models.attention_stats import collect_attention_stats
    from mcr_exit.models.forward import run_blocks

    loaded = build(args)
    add_labels()
    vocab = loaded.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (args.batch, args.seq_len), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    ids, mask = ids.to(args.device), mask.to(args.device)
    lists = [r.tolist() for r in ids.cpu()]

    def bare():
        with torch.inference_mode():
            loaded.adapter.backbone(input_ids=ids, attention_mask=mask, use_cache=False)

    def attention_only():
        with torch.inference_mode(), collect_attention_stats(loaded.adapter, mask.sum(1), lambda j, a: None,
                                                             method="fused"):
            run_blocks(loaded.adapter, ids, mask, lambda i, h: None)

    def analysis():
        collect_statistics(loaded, lists, max_batch=args.batch, max_tokens=args.batch * args.seq_len,
                           spectral_backend="estimate", attention_method="fused")

    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch.__version__)
    if torch.cuda.is_available() and args.step_configs:
        time_steps(args.step_configs.split(","))
    # wall times first: a profiler session leaves the process slower at launching kernels afterwards
    walls = {name: timed(fn) for name, fn in (("bare", bare), ("attention", attention_only), ("analysis", analysis))}
    k_bare = report("bare forward", bare, 8, walls["bare"])
    k_att = report("attention statistics only", attention_only, args.top, walls["attention"])
    k_all = report("analysis (GPU default)", analysis, args.top, walls["analysis"])
    print_difference(k_bare, k_att, args.top)
    print_difference(k_bare, k_all, 2 * args.top)

    with torch.inference_mode():
        grams = grams_of(loaded, ids, mask)
    print(f"\n== estimate_spectrum alone on {grams.shape[0]} Gram matrices {tuple(grams.shape[1:])}, chunks of 64")
    for spec in args.estimates.split(","):
        opts = {}
        for part in spec.split("-"):
            opts[{"D": "degree", "i": "iterations", "w": "width"}[part[0]]] = int(part[1:])

        def run(opts=opts):
            for c in range(0, grams.shape[0], 64):
                estimate_spectrum(grams[c : c + 64], **opts)

        ms = timed(run)
        ref = estimate_spectrum(grams[:64], degree=64, iterations=24).entropy
        err = (estimate_spectrum(grams[:64], **opts).entropy - ref).abs().max().item()
        print(f"   {spec:<10} {ms:8.1f} ms   max |dH| vs D64-i24 {err:.1e}")
    with profile(activities=ACTIVITIES) as prof:
        for c in range(0, grams.shape[0], 64):
            estimate_spectrum(grams[c : c + 64])
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"   {e.key[:90]:<90} {e.count:>6} {e.self_device_time_total / 1000:8.2f}")


if __name__ == "__main__":
    main()
