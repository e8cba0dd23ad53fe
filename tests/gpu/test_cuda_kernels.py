"""The CUDA-only code paths against their references: flash-attention calls (grouped heads, the
anti-causal window), the fused attention statistics and the fused spectral-estimate step.

Skipped without a GPU (CI has none); the same algebra runs on the CPU through the reference paths
(tests/models, tests/metrics). Run on a GPU machine: ``python -m pytest tests/gpu``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(B=2, H=8, Hkv=2, T=300, d=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g, device="cuda") for h in (H, Hkv, Hkv))
    k[:, :, 0] *= 4  # a key the queries single out, as a BOS sink is
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


@pytest.mark.parametrize("reverse", [False, True])
def test_flash_lse_attention_equals_the_reference(reverse):
    """Causal calls go to cuDNN where it runs (flash attention otherwise), anti-causal ones to flash."""
    from mcr_exit.models.fused_attention import _reference_lse_attention, lse_attention

    q, k, v = _qkv()
    out, lse = lse_attention(q, k, v, 0.125, reverse=reverse)
    ref_out, ref_lse = _reference_lse_attention(q, k, v, 0.125, reverse)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=0)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("H,Hkv,T,d,lengths", [
    (8, 2, 257, 64, [257, 140]),
    (8, 2, 1024, 128, [1024, 700]),  # Llama-3's head size, every tile configuration of the sweep
    (4, 4, 300, 256, [300, 31]),  # Gemma's head size
])
def test_fused_statistics_on_the_gpu_equal_the_float32_cpu_path(H, Hkv, T, d, lengths):
    """The compiled sweep on bf16 inputs against the torch path in float32 on the CPU."""
    from mcr_exit.models.fused_attention import fused_attention_stats

    q, k, v = _qkv(H=H, Hkv=Hkv, T=T, d=d)
    lengths = torch.tensor(lengths, device="cuda")
    _, gpu = fused_attention_stats(q, k, v, d**-0.5, lengths, kernels=True)
    _, cpu = fused_attention_stats(q.cpu().float(), k.cpu().float(), v.cpu().float(), d**-0.5, lengths.cpu())
    for key in ("sink_score", "mixing_score", "colsum_concentration", "diag_score"):
        torch.testing.assert_close(getattr(gpu, key).cpu(), getattr(cpu, key), atol=1e-3, rtol=0, msg=key)


@pytest.mark.parametrize("n", [1024, 700])
def test_fused_step_kernel_equals_the_torch_step(n):
    from mcr_exit.metrics.cheb_step import cheb_step

    g = torch.Generator(device="cuda").manual_seed(n)
    M = torch.randn(4, n, n, generator=g, device="cuda", dtype=torch.float64)
    A = (M @ M.transpose(1, 2) / (4 * n)).half()
    X = torch.randn(4, n, n, generator=g, device="cuda").half()
    eye = torch.eye(n, dtype=torch.float16, device="cuda")[None]
    four = torch.full((4,), 4.0, device="cuda")
    Y, sq, dot = cheb_step(A, X, eye, four, -2.0, fused=True)
    Yr, sqr, dotr = cheb_step(A, X, eye, four, -2.0, fused=False)
    assert ((Y.float() - Yr.float()).abs() <= 1e-3 * Yr.float().abs() + 1e-5).all()
    torch.testing.assert_close(sq, sqr, rtol=1e-5, atol=0)
    torch.testing.assert_close(dot, dotr, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("n", [1024, 700])
def test_compiled_symmetric_step_and_deflation_kernels_equal_their_interpreted_checks(n):
    """The kernels tests/metrics/test_cheb_step.py runs in the interpreter, compiled, at the estimate's sizes."""
    from mcr_exit.metrics.cheb_step import cheb_step, deflated_half
    from tests.metrics.test_cheb_step import _commuting

    S, T = (t.cuda() for t in _commuting(3, n, seed=n))
    alpha = torch.tensor([4.0, 3.0, 2.0], device="cuda")
    Y, sq, dot = cheb_step(S, T, S, alpha, -2.0, gamma=alpha / -2, delta=1.0, symmetric=True, fused=True)
    Yr, sqr, dotr = cheb_step(S, T, S, alpha, -2.0, gamma=alpha / -2, delta=1.0, fused=False)
    assert torch.equal(Y, Y.transpose(1, 2))
    assert ((Y.float() - Yr.float()).abs() <= 2e-3 * Yr.float().abs() + 1e-4).all()
    torch.testing.assert_close(sq, (Y.double() ** 2).sum((1, 2)), rtol=1e-6, atol=0)
    torch.testing.assert_close(dot, (Y.double() * T.double()).sum((1, 2)), rtol=1e-5, atol=1e-2)
    stack = torch.stack([S, T, Y])  # the giant steps' epilogue inner products, Y written into a slice
    out = torch.empty(2, 3, n, n, dtype=S.dtype, device="cuda")
    Z, _, _, dots = cheb_step(T, S, None, 2.0, 0.0, delta=-1.0, symmetric=True, fused=True, dots=stack, out=out[1])
    assert Z.data_ptr() == out[1].data_ptr() and torch.equal(Z, Z.transpose(1, 2))
    ref = torch.stack([(Z.double() * D.double()).sum((1, 2)) for D in stack], -1)
    torch.testing.assert_close(dots, ref, rtol=1e-5, atol=1e-2)
    g = torch.Generator(device="cuda").manual_seed(n)
    X = torch.randn(2, n, 2 * n, generator=g, device="cuda")
    G = X @ X.transpose(1, 2)
    inv = 1.0 / G.diagonal(dim1=1, dim2=2).sum(-1, dtype=torch.float64)
    L = torch.randn(2, n, 64, generator=g, device="cuda") * 1e-3
    R = L.transpose(1, 2).contiguous()  # a symmetric low-rank update
    scale = torch.tensor([30.0, 60.0], device="cuda", dtype=torch.float64)
    Y, sq, tr = deflated_half(G, inv, L, R, scale, torch.float16, fused=True)
    Yr, sqr, trr = deflated_half(G, inv, L, R, scale, torch.float16, fused=False)
    assert torch.equal(Y, Y.transpose(1, 2))
    assert ((Y.float() - Yr.float()).abs() <= 2e-3 * Yr.float().abs() + 1e-4).all()
    torch.testing.assert_close(sq, sqr, rtol=1e-4, atol=0)
    torch.testing.assert_close(tr, trr, rtol=1e-4, atol=1e-4)


def test_compiled_block_product_has_float32_accuracy():
    """Three TF32 passes: the error of a float32 product, not of one TF32 pass (~1e-3 relative)."""
    from mcr_exit.metrics.subspace_kernels import times_block

    g = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(4, 1024, 1024, generator=g, device="cuda")
    Q = torch.randn(4, 1024, 64, generator=g, device="cuda", dtype=torch.float64)
    err = (times_block(G, Q, fused=True) - G.double() @ Q).abs().max() / (G.double().abs() @ Q.abs()).max()
    assert err < 1e-6


def test_compiled_cholesky_qr_equals_torch():
    from mcr_exit.metrics.subspace_kernels import cholqr

    g = torch.Generator(device="cuda").manual_seed(5)
    Y = torch.randn(64, 1024, 32, generator=g, device="cuda", dtype=torch.float64)
    Y = Y * torch.logspace(0, -3, 32, device="cuda", dtype=torch.float64)
    Q = cholqr(Y, fused=True)
    torch.testing.assert_close(Q, cholqr(Y, fused=False), rtol=1e-8, atol=1e-10)
    eye = torch.eye(32, device="cuda", dtype=torch.float64)
    assert (Q.transpose(1, 2) @ Q - eye).abs().max() < 1e-6


def test_the_estimate_replayed_as_cuda_graphs_equals_the_eager_estimate():
    """The second call of a shape captures the two synchronization-free phases; later calls replay them on
    new inputs: the same results as eager calls, to the last bit where the kernels are the same."""
    from mcr_exit.metrics import spectral_estimate as se
    from tests.metrics.test_spectral_estimate import _hidden_like

    X = _hidden_like(512, 1024).cuda().float()
    G = X @ X.transpose(1, 2)
    with torch.inference_mode():  # the analysis calls it in inference mode; later callers may not be
        runs = [se.estimate_spectrum(G * k, graphs=True) for k in (1.0, 2.0)]  # eager, capture
    runs.append(se.estimate_spectrum(G * 3.0, graphs=True))  # replay, outside inference mode
    runs[-1].entropy.add_(0.0)  # an ordinary tensor
    assert not se._GRAPHS_FAILED and len(se._GRAPHS) == 2  # one graph per phase
    for B in (2, 2, 3, 3, 4, 4):  # other shapes: each captured on its second call in a row
        se.estimate_spectrum(G[:B], graphs=True)
    assert sorted(key[1][0][0] for key in se._GRAPHS) == [3, 3, 4, 4]  # GRAPH_SHAPES (2) per phase kept
    for k, got in zip((1.0, 2.0, 3.0), runs):
        ref = se.estimate_spectrum(G * k, graphs=False)
        torch.testing.assert_close(got.entropy, ref.entropy, rtol=0, atol=1e-9)
        torch.testing.assert_close(got.top, ref.top, rtol=1e-12, atol=0)


def test_graphs_captured_in_a_worker_thread_while_the_main_thread_allocates_and_synchronizes():
    """The analysis captures on its side stream while the main thread runs the forward pass (new
    allocations, synchronizations): the capture must neither fail nor break the main thread's calls
    (it did, in the global capture mode, on runs of more than one batch)."""
    import threading

    from mcr_exit.metrics import spectral_estimate as se
    from tests.metrics.test_spectral_estimate import _hidden_like

    for name in ("_GRAPHS", "_LAST", "_STATIC"):
        getattr(se, name).clear()
    se._GRAPHS_FAILED.clear()
    X = _hidden_like(512, 1024).cuda().float()
    G = X @ X.transpose(1, 2)
    got, errors, done = [], [], threading.Event()

    def worker():
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.inference_mode():
                for k in (1.0, 2.0, 3.0, 4.0):  # eager, capture, replay, replay
                    got.append(se.estimate_spectrum(G * k, graphs=True).entropy)
            stream.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    n = 0
    try:
        while not done.is_set():  # what a forward pass does meanwhile: fresh allocations and host reads
            n += 1
            # (no random numbers: torch's CUDA generator refuses to advance while another thread captures)
            y = torch.full((1000 + n, 333), 0.5, device="cuda") @ torch.ones(333, 77, device="cuda")
            float(y.sum())  # a copy to the host: synchronizes the main thread's stream
    except Exception as exc:  # noqa: BLE001 - reported below
        errors.append(("main thread", exc))
    thread.join()
    assert not errors and not se._GRAPHS_FAILED, (n, errors, se._GRAPHS_FAILED)
    assert all(entry[0] is not None for entry in se._GRAPHS.values()) and len(se._GRAPHS) == 2
    for k, entropy in zip((1.0, 2.0, 3.0, 4.0), got):
        ref = se.estimate_spectrum(G * k, graphs=False).entropy
        torch.testing.assert_close(entropy, ref, rtol=0, atol=1e-9)


def test_the_gpu_estimate_matches_float64_eigenvalues():
    from mcr_exit.metrics.spectral_estimate import estimate_spectrum
    from tests.metrics.test_spectral_estimate import _hidden_like

    X = _hidden_like(1024, 2048).cuda().float()
    G = X @ X.transpose(1, 2)
    ev = torch.linalg.eigvalsh(G.double().cpu()).clamp(min=0)
    p = ev / ev.sum(-1, keepdim=True)
    exact = -torch.xlogy(p, p).sum(-1)
    est = estimate_spectrum(G)
    assert (est.entropy.cpu() - exact).abs().max() < 1e-3


def test_gpu_analysis_with_threaded_estimates_equals_the_exact_chunked_path():
    """collect_statistics on a GPU (fused attention kernels, spectra estimated in a worker thread on a side
    stream) against exact float64 eigenvalues and the chunked softmax, on a bf16 model with Gram
    matrices above the estimate's size threshold."""
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.models import from_objects
    from tests.tiny import build_tokenizer

    tok = build_tokenizer(bos="<bos>", add_bos=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=320, intermediate_size=640, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    loaded = from_objects(model, tok)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (300, 290, 300, 270)]
    fast = collect_statistics(loaded, ids, max_batch=4, spectral_backend="estimate", attention_method="fused",
                              spectral_options={"chunk": 5})  # several flushes per batch
    exact = collect_statistics(loaded, ids, max_batch=4, spectral_backend="device", attention_method="chunked")
    assert np.abs(fast.hidden["entropy"] - exact.hidden["entropy"]).max() < 1e-3
    for key in ("sink_score", "mixing_score", "colsum_concentration", "diag_score"):
        assert np.abs(fast.attention[key] - exact.attention[key]).max() < 1e-3, key


def _small_llama(device):
    """A bf16 Llama with Gram matrices large enough for the estimate (T ~ 300 > 256 = hidden size), and prompts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    ids = [[1] + torch.randint(3, 512, (n - 1,), generator=g).tolist() for n in (300, 300, 290, 300, 300, 280)]
    return model, ids


def _assert_same_statistics(got, want, rtol=1e-4, atol=1e-5):
    for group in ("hidden", "attention", "heads", "final_normed"):
        a, b = getattr(want, group), getattr(got, group)
        assert a.keys() == b.keys() and a, group
        for key in a:
            assert np.isfinite(b[key]).any(), (group, key)
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=atol, equal_nan=True, err_msg=f"{group}.{key}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_analysis_of_a_model_spread_over_two_gpus_equals_one_gpu():
    """device_map-style placement (accelerate's dispatch, as from_pretrained(device_map="auto") does):
    later layers, their attention kernels and their spectra estimates run on the second GPU."""
    from accelerate import dispatch_model

    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.models import from_objects
    from tests.tiny import build_tokenizer

    model, ids = _small_llama("cuda:0")
    tok = build_tokenizer()
    opts = dict(spectral_backend="estimate", max_batch=2)
    one = collect_statistics(from_objects(model, tok), ids, **opts)
    placement = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
                 "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}
    model = dispatch_model(model, device_map=placement)
    assert model.model.layers[3].self_attn.q_proj.weight.device == torch.device("cuda:1")
    _assert_same_statistics(collect_statistics(from_objects(model, tok), ids, **opts), one)


def _nccl_worker(rank: int, port: int, out: str) -> None:
    import os
    import pickle

    import torch.distributed as dist

    from mcr_exit.analysis.distributed import collect_statistics_distributed, init_from_env
    from mcr_exit.models import from_objects
    from tests.tiny import build_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    device = init_from_env("cuda")  # what `mcr-exit analyze` does under torchrun
    try:
        assert device == f"cuda:{rank}" and dist.get_backend() == "nccl"
        model, ids = _small_llama(device)
        stats = collect_statistics_distributed(from_objects(model, build_tokenizer()), ids,
                                               spectral_backend="estimate", max_batch=2)
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(stats, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_ranks_equal_one_process(tmp_path):
    import pickle
    import socket

    import torch.multiprocessing as mp

    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.models import from_objects
    from tests.tiny import build_tokenizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stats")
    mp.start_processes(_nccl_worker, args=(port, out), nprocs=2, join=True, start_method="spawn")
    model, ids = _small_llama("cuda:0")
    single = collect_statistics(from_objects(model, build_tokenizer()), ids, spectral_backend="estimate", max_batch=2)
    for r in range(2):
        with open(f"{out}.{r}", "rb") as f:
            _assert_same_statistics(pickle.load(f), single, rtol=1e-3, atol=1e-4)
