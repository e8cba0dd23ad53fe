"""What every adapter must do on a tiny model of its family (each adapter's test file calls this)."""

from __future__ import annotations

import torch

from mcr_exit.models.adapters import adapter_for
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.tokens import collate

IDS = [[2, 10, 11, 12, 13], [2, 20, 21]]


def check_adapter(model, adapter_cls, family: str):
    """The registry picks ``adapter_cls``; every role resolves; the MLP-residual module writes into the
    residual stream; ``final_logits`` of the raw last block output equals the model's own logits."""
    adapter = adapter_for(model)
    assert type(adapter) is adapter_cls and adapter.family == family
    assert adapter.n_layers == len(adapter.blocks) > 0
    d = adapter.embed.weight.shape[1]
    for j in range(adapter.n_layers):
        assert adapter.attn(j) is not adapter.mlp(j)
    ids, mask = collate(IDS, pad_id=0)
    hidden, writes = {}, []
    handle = adapter.mlp_residual(0).register_forward_hook(lambda m, a, out: writes.append(out))
    try:
        with torch.no_grad():
            run_blocks(adapter, ids, mask, lambda i, h: hidden.__setitem__(i, h.clone()))
    finally:
        handle.remove()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        mine = adapter.final_logits(hidden[adapter.n_layers])
    assert len(writes) == 1 and writes[0].shape[-1] == d
    real = mask.bool()
    torch.testing.assert_close(mine[real], logits[real], rtol=1e-4, atol=1e-4)
    return adapter
