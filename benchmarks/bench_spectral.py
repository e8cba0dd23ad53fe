"""Eigenvalues (or the entropy) of many T x T Gram matrices on a GPU: which way is fastest?

    python benchmarks/bench_spectral.py --n 1024 --count 132 --device cuda

132 = 4 prompts x 33 hidden states of a 32-block model: one batch of `mcr-exit analyze`.
Rows: torch's eigvalsh (one call, or threads with a CUDA stream each), MAGMA, cuSOLVER's batched
eigensolver called directly (cusolverDnXsyevBatched, through ctypes: torch does not use it at this
size), and mcr-exit's estimate from matrix products, with its largest entropy error against float64
eigenvalues on matrices shaped like hidden states (massive first row, power-law spectra).
"""

from __future__ import annotations

import argparse
import ctypes
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


def syev_batched(G: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of each symmetric matrix in G (B, n, n) with cusolverDnXsyevBatched (benchmark only)."""
    path = next(line.split()[-1] for line in open("/proc/self/maps") if "libcusolver.so" in line)
    lib = ctypes.CDLL(path)
    h, p = ctypes.c_void_p(), ctypes.c_void_p()
    lib.cusolverDnCreate(ctypes.byref(h))
    lib.cusolverDnCreateParams(ctypes.byref(p))
    lib.cusolverDnSetStream(h, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    A = G.clone()
    b, n = A.shape[0], A.shape[-1]
    code = {torch.float32: 0, torch.float64: 1}[A.dtype]
    W = torch.empty(b, n, device=A.device, dtype=A.dtype)
    info = torch.zeros(b, device=A.device, dtype=torch.int32)
    dws, hws = ctypes.c_size_t(), ctypes.c_size_t()
    i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    common = (i32(0), i32(0), i64(n), i32(code), vp(A.data_ptr()), i64(n), i32(code), vp(W.data_ptr()), i32(code))
    assert lib.cusolverDnXsyevBatched_bufferSize(h, p, *common, ctypes.byref(dws), ctypes.byref(hws), i64(b)) == 0
    dbuf = torch.empty(max(dws.value, 1), dtype=torch.uint8, device=A.device)
    hbuf = ctypes.create_string_buffer(max(hws.value, 1))
    assert lib.cusolverDnXsyevBatched(h, p, *common, vp(dbuf.data_ptr()), ctypes.c_size_t(dws.value), hbuf,
                                      ctypes.c_size_t(hws.value), vp(info.data_ptr()), i64(b)) == 0
    torch.cuda.synchronize()
    lib.cusolverDnDestroy(h)
    return W


def structured(count, n, d, device):
    """Hidden-state-like matrices: a massive first row, power-law spectra of exponent 0.5, 1 and 1.5, noise."""
    g = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(count, n, d, generator=g).to(device, torch.bfloat16)
    X[: count // 4, 0] *= 300
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q.to(device)
    for i in range(count // 4, 3 * count // 4):
        e = (0.5, 1.0, 1.5)[i % 3]
        scale = torch.arange(1, n + 1, device=device, dtype=torch.float64) ** -e
        X[i] = ((U * scale) @ torch.randn(n, d, device=device, dtype=torch.float64)).to(torch.bfloat16)
    return X


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--count", type=int, default=132)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--degrees", default="32,48")
    ap.add_argument("--storages", default="float16", help="storage dtypes of the estimate, comma-separated")
    ap.add_argument("--estimate-only", action="store_true", help="skip the eigensolver rows")
    args = ap.parse_args()
    X = torch.randn(args.count, args.n, args.d, device=args.device, dtype=torch.bfloat16)
    grams = {dt: (X.to(dt) @ X.to(dt).transpose(1, 2)) for dt in (torch.float32, torch.float64)}
    rows = []
    for dt, g in ([] if args.estimate_only else grams.items()):
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
        if args.estimate_only:
            raise RuntimeError("skipped (--estimate-only)")
        torch.backends.cuda.preferred_linalg_library("magma")
        rows.append(bench("eigvalsh magma float32", lambda: torch.linalg.eigvalsh(grams[torch.float32]), args.device))
    except Exception as exc:  # noqa: BLE001
        rows.append((f"magma: {exc}", float("nan")))
    finally:
        torch.backends.cuda.preferred_linalg_library("default")
    if args.device == "cuda" and not args.estimate_only:
        for dt in (torch.float32, torch.float64):
            rows.append(bench(f"cusolverDnXsyevBatched {dt}", lambda g=grams[dt]: syev_batched(g), args.device))
    from mcr_exit.metrics.spectral_estimate import estimate_spectrum

    Xs = structured(args.count, args.n, args.d, args.device)
    g32 = Xs.float() @ Xs.float().transpose(1, 2)
    g64 = Xs.double() @ Xs.double().transpose(1, 2)
    ev = torch.linalg.eigvalsh(g64).clamp(min=0)
    p_ = ev / ev.sum(-1, keepdim=True)
    H = -torch.xlogy(p_, p_).sum(-1)
    for storage in [getattr(torch, name) for name in args.storages.split(",")]:
        for degree in [int(x) for x in args.degrees.split(",")]:
            for chunk in (33, args.count):
                def est(degree=degree, chunk=chunk, storage=storage):
                    return [estimate_spectrum(g32[i : i + chunk], degree=degree, storage=storage)
                            for i in range(0, args.count, chunk)]
                name = f"estimate D={degree} {str(storage)[6:]} chunks of {chunk}"
                rows.append(bench(name, est, args.device))
            err = (torch.cat([e.entropy for e in est()]) - H).abs()
            q = args.count // 4
            print(f"{name}: largest entropy error {float(err.max()):.2e} nats (massive first row "
                  f"{float(err[:q].max()):.1e}, power laws {float(err[q:3 * q].max()):.1e}, "
                  f"noise {float(err[3 * q:].max()):.1e})")
    Xf = X.float()
    if not args.estimate_only:
        rows.append(bench("svdvals gesvdj of X float32", lambda: torch.linalg.svdvals(Xf[:8], driver="gesvdj"), args.device))
        rows.append(bench("gram X X^T float64", lambda: X.double() @ X.double().transpose(1, 2), args.device))
    for name, t in rows:
        per = t / (8 if "gesvdj" in name else args.count)
        print(f"{name:<40} total {t * 1000:9.1f} ms   per matrix {per * 1000:7.2f} ms")


if __name__ == "__main__":
    main()
