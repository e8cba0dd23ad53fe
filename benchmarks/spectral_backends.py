"""Benchmark-only ways of running the exact eigensolver, compared against the package's own backends
("device", "estimate") by bench_analysis.py. Importing this module registers them with
``mcr_exit.analysis.collect`` under the names "device-threads" and "cpu-pool".

"device-threads" computes the Gram matrix and its eigenvalues where the hidden state lives, from several
host threads, each on its own CUDA stream, so that the latency-bound eigensolver calls overlap one
another and the forward pass. "cpu-pool" computes the Gram matrix on the device and its eigenvalues in
CPU threads, overlapped with the next layers of the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from mcr_exit.analysis.collect import SpectralReducer, register_reducer
from mcr_exit.metrics.spectral import SpectralStats, finish_spectral, gram_eigenvalues


@register_reducer
class PooledReducer(SpectralReducer):
    BACKENDS = ("device-threads", "cpu-pool")

    def __init__(self, backend: str = "cpu-pool", dtype: torch.dtype = torch.float64, chunk: int = 64,
                 estimate_options: dict | None = None, workers: int = 8):
        super().__init__(backend, dtype, chunk, estimate_options)
        self.pool = ThreadPoolExecutor(workers)

    def exact(self, terms: dict, gram: torch.Tensor, store: Callable[[SpectralStats], None], unit: int) -> None:
        if self.backend == "device-threads":
            ready = torch.cuda.Event() if gram.is_cuda else None
            if ready is not None:
                ready.record()

            def on_stream():
                if ready is None:
                    store(finish_spectral(terms, gram_eigenvalues(gram)))
                    return
                stream = torch.cuda.Stream(device=gram.device)
                stream.wait_event(ready)
                with torch.cuda.stream(stream):
                    gram.record_stream(stream)
                    for v in terms.values():
                        v.record_stream(stream)
                    result = finish_spectral(terms, gram_eigenvalues(gram))
                stream.synchronize()
                store(result)

            self.pending.append((unit, unit + 1, self.pool.submit(on_stream)))
            return
        terms = {k: v.cpu() for k, v in terms.items()}
        host_gram = gram.cpu().numpy()

        def work():
            eig = torch.from_numpy(np.linalg.eigvalsh(host_gram)[..., ::-1].clip(min=0).copy())
            store(finish_spectral(terms, eig))

        self.pending.append((unit, unit + 1, self.pool.submit(work)))

    def close(self) -> None:
        super().close()
        self.pool.shutdown()
