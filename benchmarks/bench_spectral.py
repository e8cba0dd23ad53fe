"""Eigenvalues of many T x T Gram matrices on a GPU: which way is fastest?

    python benchmarks/bench_spectral.py --n 1024 --count 132 --device cuda

132 = 4 prompts x 33 hidden states of a 32-block model: one batch of `mcr-exit analyze`.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch


def bench(name, fn, device):
    fn()
    torch.cuda.synchronize() if device == "cuda" else None
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize() if device == "cuda" else None
    return name, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--count", type=int, default=132)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    X = torch.randn(args.count, args.n, args.d, device=args.device, dtype=torch.bfloat16)
    grams = {dt: (X.to(dt) @ X.to(dt).transpose(1, 2)) for dt in (torch.float32, torch.float64)}
    rows = []
    for dt, g in grams.items():
        rows.append(bench(f"eigvalsh loop-batched {dt}", lambda g=g: torch.linalg.eigvalsh(g), args.device))

        def threads(g=g, k=8):
            def one(i):
                s = torch.cuda.Stream()
                with torch.cuda.stream(s):
                    r = torch.linalg.eigvalsh(g[i])
                s.synchronize()
                return r
            with ThreadPoolExecutor(k) as pool:
                list(pool.map(one, range(len(g))))

        rows.append(bench(f"eigvalsh 8 threads/streams {dt}", threads, args.device))
    try:
        torch.backends.cuda.preferred_linalg_library("magma")
        rows.append(bench("eigvalsh magma float32", lambda: torch.linalg.eigvalsh(grams[torch.float32]), args.device))
    except Exception as exc:  # noqa: BLE001
        rows.append((f"magma: {exc}", float("nan")))
    finally:
        torch.backends.cuda.preferred_linalg_library("default")
    Xf = X.float()
    rows.append(bench("svdvals gesvdj of X float32", lambda: torch.linalg.svdvals(Xf[:8], driver="gesvdj"), args.device))
    rows.append(bench("gram X X^T float64", lambda: X.double() @ X.double().transpose(1, 2), args.device))
    for name, t in rows:
        per = t / (8 if "gesvdj" in name else args.count)
        print(f"{name:<40} total {t * 1000:9.1f} ms   per matrix {per * 1000:7.2f} ms")


if __name__ == "__main__":
    main()
