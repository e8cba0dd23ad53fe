"""Model surgery on position 0 (the BOS token): context managers that always remove their hooks.

Inputs are right-padded, so position 0 is each row's first real token. Nothing here touches any
other position, and every hook is removed in ``finally`` (also when the forward pass raises).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from mcr_exit.errors import ConfigError
from mcr_exit.models.adapters import ArchitectureAdapter


def parse_blocks(spec: str, n_layers: int) -> list[int]:
    """'0,5-7' -> [0, 5, 6, 7] (0-based block indices); each must lie in 0..n_layers-1."""
    blocks: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ConfigError(f"--blocks: cannot read '{part}' (use e.g. 0,5-7 or auto)") from None
        if last < first:
            raise ConfigError(f"--blocks: empty range '{part}'")
        for j in range(first, last + 1):
            check_block(j, n_layers)
            blocks.add(j)
    if not blocks:
        raise ConfigError("--blocks: no block given (use e.g. 0,5-7 or auto)")
    return sorted(blocks)


def check_block(j: int, n_layers: int) -> int:
    if not 0 <= j < n_layers:
        raise ConfigError(f"block {j} is out of range: this model has blocks 0..{n_layers - 1}")
    return j


def _edit_first(output, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Apply ``edit`` to the hidden-state tensor of a module output (a tensor or a tuple led by one)."""
    if isinstance(output, torch.Tensor):
        return edit(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)((edit(output[0]), *output[1:]))
    raise TypeError(f"cannot edit a module output of type {type(output).__name__}")


def zero_position0(h: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> copy with row position 0 set to zero."""
    out = h.clone()
    out[:, 0] = 0
    return out


def clip_position0(h: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B, T, d) -> copy with every coordinate of position 0 clipped to [-gamma, gamma]."""
    out = h.clone()
    out[:, 0] = out[:, 0].clamp(-gamma, gamma)
    return out


@contextmanager
def _forward_hooks(modules: Sequence[torch.nn.Module], hook) -> Iterator[list]:
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(hook))
        yield handles
    finally:
        for h in handles:
            h.remove()


@contextmanager
def ablate_bos_mlp(adapter: ArchitectureAdapter, blocks: Sequence[int]) -> Iterator[list[torch.nn.Module]]:
    """Remove the MLP branch's contribution to position 0 in the given blocks (0-based).

    The hook sits on ``adapter.mlp_residual(j)``, the module whose output the block adds to the
    residual stream (Gemma 2/3: after ``post_feedforward_layernorm``), so afterwards
    x_BOS(j+1) = x_BOS(j) + Attn_j(x)_BOS exactly. Yields the hooked modules.
    """
    blocks = [check_block(int(j), adapter.n_layers) for j in blocks]
    modules = [adapter.mlp_residual(j) for j in blocks]

    def hook(_module, _args, output):
        return _edit_first(output, zero_position0)

    with _forward_hooks(modules, hook):
        yield modules


@contextmanager
def clip_bos_residual(adapter: ArchitectureAdapter, hidden_index: int, gamma: float) -> Iterator[torch.nn.Module]:
    """Clip the residual stream at position 0 to [-gamma, gamma] right after block ``hidden_index - 1``.

    ``hidden_index`` is a hidden-state index in 1..L (hidden[i] = output of block i-1, 0-based); later
    blocks read the clipped state. Yields the hooked block.
    """
    if not gamma > 0:
        raise ConfigError(f"clipping value must be > 0, got {gamma}")
    if not 1 <= hidden_index <= adapter.n_layers:
        raise ConfigError(f"clip layer {hidden_index} is out of range: hidden indices 1..{adapter.n_layers}")
    block = adapter.blocks[hidden_index - 1]

    def hook(_module, _args, output):
        return _edit_first(output, lambda h: clip_position0(h, gamma))

    with _forward_hooks([block], hook):
        yield block


@contextmanager
def capture_mlp_residual(
    adapter: ArchitectureAdapter, on_output: Callable[[int, torch.Tensor], None]
) -> Iterator[None]:
    """Report every block's MLP-branch residual write as on_output(j, (B, T, d)); read-only.

    Register it after any ablation context, so it sees what the block really adds.
    """
    handles = []
    try:
        for j in range(adapter.n_layers):

            def hook(_module, _args, output, j=j):
                on_output(j, output[0] if isinstance(output, (tuple, list)) else output)

            handles.append(adapter.mlp_residual(j).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
