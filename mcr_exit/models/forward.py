"""The one "run to layer k" path, shared by analysis, lenses, probes, MTEB and the server.

Hooks on the blocks hand each hidden state to a callback as soon as it exists; when a stop layer
is given, the forward pass is aborted right after that block, so later blocks never execute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from mcr_exit.errors import ConfigError
from mcr_exit.models.adapters import ArchitectureAdapter

HiddenCallback = Callable[[int, torch.Tensor], None]


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass early (caught in run_blocks)."""


def _hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("block 0 was called without hidden states")


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def hidden_hooks(adapter: ArchitectureAdapter, on_hidden: HiddenCallback, stop_at: int | None) -> Iterator[None]:
    """Register hooks that report hidden[i] (i = 0..L, raw, pre final norm); remove them in ``finally``."""
    handles = []

    def embed_hook(_module, args, kwargs):
        on_hidden(0, _hidden_from_args(args, kwargs))
        if stop_at == 0:
            raise _StopForward

    handles.append(adapter.blocks[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
    last = adapter.n_layers if stop_at is None else stop_at
    for j in range(last):

        def block_hook(_module, _args, output, i=j + 1):
            on_hidden(i, _block_output(output))
            if i == stop_at:
                raise _StopForward

        handles.append(adapter.blocks[j].register_forward_hook(block_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_blocks(
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    on_hidden: HiddenCallback,
    *,
    stop_at: int | None = None,
) -> torch.Tensor | None:
    """Run the backbone, reporting hidden states; stop after block ``stop_at`` when given.

    Args:
        input_ids, attention_mask: (B, T), right-padded.
        on_hidden: called as on_hidden(i, hidden[i]) with hidden[i] of shape (B, T, d).
        stop_at: hidden index k in 0..L; blocks k+1.. are not executed. None runs all blocks.

    Returns:
        The backbone's final *normed* hidden state (B, T, d) when all blocks ran, else None.
    """
    L = adapter.n_layers
    if stop_at is not None and not 0 <= stop_at <= L:
        raise ConfigError(f"layer {stop_at} is out of range: this model has hidden states 0..{L}")
    with hidden_hooks(adapter, on_hidden, stop_at), torch.inference_mode():
        try:
            out = adapter.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            return None
    return out.last_hidden_state  # only reached when no stop was requested


def hidden_at(
    adapter: ArchitectureAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """hidden[layer] (B, T, d), running only the first ``layer`` blocks."""
    captured: dict[int, torch.Tensor] = {}

    def keep(i: int, h: torch.Tensor) -> None:
        if i == layer:
            captured[i] = h

    run_blocks(adapter, input_ids, attention_mask, keep, stop_at=layer)
    return captured[layer]
