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


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("H,Hkv,T,d,lengths", [(4, 2, 45, 16, [45, 30, 1]), (3, 3, 33, 24, [33, 33, 2])])
def test_kernels_equal_the_torch_operations(H, Hkv, T, d, lengths, flipped):
    """``flipped``: the kernels write the column-sum inputs reversed and read its result back reversed
    (a causal call then, as cuDNN needs), instead of an anti-causal call."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(3, h, T, d, generator=g) for h in (H, Hkv, Hkv))
    k[:, :, 0] *= 3  # a key that attracts attention, as a BOS sink does
    lengths = torch.tensor(lengths)
    out_k, got = fused_attention_stats(q, k, v, d**-0.5, lengths, kernels=True, reversed_columns=flipped)
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
    monkeypatch.setattr(fak, "row_stats", broken)
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
    assert not fused_fits(256)  # Gemma's head size: the column-sum call would need 264
