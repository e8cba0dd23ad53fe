"""Surgery on tiny random models of every family: right modules, other positions untouched, hooks removed."""

from __future__ import annotations

import pytest
import torch

from mcr_exit.errors import ConfigError
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.surgery import (
    ablate_bos_mlp,
    capture_mlp_residual,
    clip_bos_residual,
    parse_blocks,
)
from mcr_exit.models.tokens import collate, pad_id_of

PROMPTS = [[5, 17, 42, 9, 33, 21, 8], [5, 60, 12, 7]]  # right padding: row 1 is shorter


def _batch(loaded):
    return collate(PROMPTS, pad_id_of(loaded.tokenizer))


def _hidden_and_writes(loaded, ids, mask):
    hidden, writes = {}, {}
    with capture_mlp_residual(loaded.adapter, lambda j, o: writes.__setitem__(j, o.clone())):
        run_blocks(loaded.adapter, ids, mask, lambda i, h: hidden.__setitem__(i, h.clone()))
    return hidden, writes


def _n_hooks(module):
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_hooks_sit_on_the_residual_write(tiny_loaded):
    adapter = tiny_loaded.adapter
    with ablate_bos_mlp(adapter, [1]) as modules:
        assert modules == [adapter.mlp_residual(1)]
        assert _n_hooks(adapter.mlp_residual(1)) == 1
        assert _n_hooks(adapter.mlp_residual(0)) == 0
    if adapter.family == "gemma":
        assert modules[0] is adapter.blocks[1].post_feedforward_layernorm
    else:
        assert modules[0] is adapter.mlp(1)
    assert _n_hooks(adapter.mlp_residual(1)) == 0


def test_ablation_removes_exactly_the_bos_write(tiny_loaded):
    """hidden[j+1] at position 0 loses exactly what the MLP branch added; every other position is unchanged."""
    ids, mask = _batch(tiny_loaded)
    j = 1
    base_h, base_w = _hidden_and_writes(tiny_loaded, ids, mask)
    with ablate_bos_mlp(tiny_loaded.adapter, [j]):
        abl_h, abl_w = _hidden_and_writes(tiny_loaded, ids, mask)
    for i in range(j + 1):
        torch.testing.assert_close(abl_h[i], base_h[i])
    torch.testing.assert_close(abl_h[j + 1][:, 1:], base_h[j + 1][:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(abl_w[j][:, 1:], base_w[j][:, 1:])
    assert torch.count_nonzero(abl_w[j][:, 0]) == 0
    expected = base_h[j + 1][:, 0] - base_w[j][:, 0]
    torch.testing.assert_close(abl_h[j + 1][:, 0], expected, rtol=1e-4, atol=1e-4)


def test_clip_bounds_position0_only(tiny_loaded):
    ids, mask = _batch(tiny_loaded)
    # transformers may keep hooks of its own on the blocks (output recording): count ours only
    before = [_n_hooks(b) for b in tiny_loaded.adapter.blocks]
    base_h, _ = _hidden_and_writes(tiny_loaded, ids, mask)
    gamma = 0.5 * float(base_h[2][:, 0].abs().max())
    with clip_bos_residual(tiny_loaded.adapter, 2, gamma):
        clip_h, _ = _hidden_and_writes(tiny_loaded, ids, mask)
    assert float(clip_h[2][:, 0].abs().max()) <= gamma + 1e-6
    torch.testing.assert_close(clip_h[2][:, 1:], base_h[2][:, 1:])
    torch.testing.assert_close(clip_h[2][:, 0], base_h[2][:, 0].clamp(-gamma, gamma))
    assert [_n_hooks(b) for b in tiny_loaded.adapter.blocks] == before


def test_hooks_removed_on_error(tiny_loaded):
    adapter = tiny_loaded.adapter
    ids, mask = _batch(tiny_loaded)
    before = [(_n_hooks(adapter.mlp_residual(j)), _n_hooks(adapter.blocks[j])) for j in range(adapter.n_layers)]
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_bos_mlp(adapter, [0, 2]), clip_bos_residual(adapter, 1, 1.0):

            def explode(i, h):
                if i == 2:
                    raise RuntimeError("boom")

            run_blocks(adapter, ids, mask, explode)
    after = [(_n_hooks(adapter.mlp_residual(j)), _n_hooks(adapter.blocks[j])) for j in range(adapter.n_layers)]
    assert after == before


@pytest.mark.parametrize("family", ["llama"])
def test_bad_input(tiny_loaded):
    adapter = tiny_loaded.adapter
    with pytest.raises(ConfigError, match="block 3 is out of range: this model has blocks 0..2"):
        with ablate_bos_mlp(adapter, [3]):
            pass
    with pytest.raises(ConfigError, match="out of range"):
        parse_blocks("0,2-5", 3)
    with pytest.raises(ConfigError, match="must be > 0"):
        with clip_bos_residual(adapter, 1, 0.0):
            pass
    with pytest.raises(ConfigError, match="must be > 0"):
        with clip_bos_residual(adapter, 1, -2):
            pass
    assert parse_blocks("0, 1-2", 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="cannot read"):
        parse_blocks("x", 3)
