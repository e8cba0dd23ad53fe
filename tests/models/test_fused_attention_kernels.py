"""The Triton kernels of the fused attention statistics against the torch version, in Triton's
interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU; on a GPU
machine tests/gpu compares the compiled kernels instead)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mcr_exit.models.fused_attention import fused_attention_stats

if not sys.platform.startswith("linux"):
    pytest.importorskip("triton")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests/gpu checks the compiled kernels")


@pytest.mark.parametrize("H,Hkv,T,d,lengths,config", [
    (4, 2, 45, 16, [45, 30, 1], None),  # one tile of keys per row
    (3, 3, 33, 24, [33, 33, 2], None),  # a head size that is no power of 2
    (2, 1, 70, 16, [70, 37, 16], (32, 16, 4, 1)),  # several key blocks, and tiles below the diagonal
])
def test_kernels_equal_the_torch_operations(H, Hkv, T, d, lengths, config, monkeypatch):
    """The single sweep over the scores (column sums, row entropies, diagonal) against the torch path's
    extra attention calls and row-wise products."""
    from mcr_exit.models import fused_attention_kernels as fak

    assert os.environ.get("TRITON_INTERPRET") == "1"
    if config is not None:
        monkeypatch.setattr(fak, "CONFIGS", {b: config for b in fak.CONFIGS})
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(3, h, T, d, generator=g) for h in (H, Hkv, Hkv))
    k[:, :, 0] *= 3  # a key that attracts attention, as a BOS sink does
    lengths = torch.tensor(lengths)
    out_k, got = fused_attention_stats(q, k, v, d**-0.5, lengths, kernels=True)
    out_t, ref = fused_attention_stats(q, k, v, d**-0.5, lengths, kernels=False)
    torch.testing.assert_close(out_k, out_t)
    for key in ("sink_score", "mixing_score", "colsum_concentration", "diag_score"):
        a, b = getattr(got, key), getattr(ref, key)
        assert torch.equal(a.isnan(), b.isnan()), key  # a single-token row has no mixing or ColSum score
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=1e-5, rtol=1e-5, msg=key)


def test_kernels_that_fail_to_build_fall_back_to_torch(monkeypatch):
    from mcr_exit.models import fused_attention_kernels as fak

    def broken(*a, **k):
        raise RuntimeError("no kernel for this GPU")

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 20, 16, generator=g) for h in (4, 2, 2))
    lengths = torch.tensor([20, 12])
    monkeypatch.setattr(fak, "_FAILED", [])
    monkeypatch.setattr(fak, "attention_scores", broken)
    monkeypatch.setattr(fak, "usable", lambda q: not fak._FAILED)
    with pytest.warns(UserWarning, match="no kernel for this GPU"):
        _, got = fused_attention_stats(q, k, v, 0.25, lengths)
    _, ref = fused_attention_stats(q, k, v, 0.25, lengths, kernels=False)
    assert torch.equal(got.sink_score, ref.sink_score) and len(fak._FAILED) == 1
    with pytest.raises(RuntimeError, match="no kernel"):
        fused_attention_stats(q, k, v, 0.25, lengths, kernels=True)


def test_auto_leaves_heads_too_large_for_the_fused_kernels_to_the_chunked_path():
    from mcr_exit.models.attention_stats import fused_fits

    assert fused_fits(64) and fused_fits(128) and fused_fits(248)
    assert not fused_fits(256)  # Gemma's head size: the torch path's column-sum call would need 264
    assert fused_fits(256, kernels=True) and not fused_fits(512, kernels=True)  # the sweep takes 256


def test_tiles_too_large_for_the_gpu_shrink_once(monkeypatch):
    """A GPU with less shared memory than the tuned tiles need (Triton's OutOfResources) gets SMALL tiles
    from then on, with the same result; any other failure propagates."""
    from mcr_exit.models import fused_attention_kernels as fak

    class OutOfResources(Exception):
        pass

    sweep, fin = fak._kernels()
    calls = []

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(kw["BN"])
                if len(calls) == 1:
                    raise OutOfResources("shared memory")
                return sweep[grid](*args, **kw)
            return launch

    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, h, 70, 16, generator=g) for h in (2, 1))
    lse = torch.logsumexp((q @ k.transpose(-1, -2) * 0.25).masked_fill(torch.ones(70, 70).triu(1).bool(), -torch.inf), -1)
    lengths = torch.tensor([70, 50])
    want = fak.attention_scores(q, k, lse, lengths, 0.25)
    monkeypatch.setattr(fak, "_SHRUNK", {})
    monkeypatch.setattr(fak, "_kernels", lambda: (Launcher(), fin))
    got = fak.attention_scores(q, k, lse, lengths, 0.25)
    assert fak._SHRUNK == {16: fak.SMALL} and calls == [fak.CONFIGS[64][0], fak.SMALL[0]]
    torch.testing.assert_close(got, want, equal_nan=True)
