"""Early-exit embeddings inside vLLM's own worker: a worker extension, called through ``collective_rpc``.

vLLM loads this class into every worker process (``worker_extension_cls``), so its methods run where
the weights are, on every tensor-parallel rank at once. ``mcr_exit_embed`` runs the model's own
``forward`` (embeddings, then the decoder blocks) with two things changed for the duration of the call:

- the block loop stops after block k (``model.end_layer = k``): blocks k+1..L are never called, and a
  forward pre-hook on every block counts the calls to prove it;
- the final norm hands back ``hidden + residual`` (vLLM's blocks return the residual stream split in
  two), which is transformers' hidden[k];
- each of the first k blocks' ``Attention`` computes plain causal attention over the call's own
  sequences instead of reading and writing vLLM's paged KV cache, so an embedding neither needs KV
  blocks nor touches the cache of running generations.

The engine core runs utility calls between two scheduler steps (``EngineCore._process_input_queue``),
so the call never interleaves with a generation step. Pooling is the analysis' own ``pool_hidden``.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager


def _plain_attention(attn, seq_lens: list[int]):
    """A ``forward`` for one vLLM ``Attention`` module: causal attention within each sequence, no cache."""
    import torch
    import torch.nn.functional as F

    H, Hkv = attn.num_heads, attn.num_kv_heads
    D, Dv = attn.head_size, getattr(attn, "head_size_v", attn.head_size)
    scale = float(attn.impl.scale)
    window = attn.sliding_window
    if getattr(attn.impl, "logits_soft_cap", None):
        raise NotImplementedError("early exit inside vLLM does not handle attention logit soft-capping")

    def forward(query, key, value, output_shape=None, output_dtype=None):
        q, k, v = query.view(-1, H, D), key.view(-1, Hkv, D), value.view(-1, Hkv, Dv)
        outs, start = [], 0
        for n in seq_lens:
            qi, ki, vi = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
            if Hkv != H:
                ki, vi = ki.repeat_interleave(H // Hkv, 0), vi.repeat_interleave(H // Hkv, 0)
            i = torch.arange(n, device=q.device)
            mask = i[None, :] <= i[:, None]
            if window:
                mask &= i[:, None] - i[None, :] < window
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
            outs.append(o.transpose(0, 1).reshape(n, H * Dv))
            start += n
        out = torch.cat(outs)
        return out.to(output_dtype) if output_dtype is not None else out

    return forward


def _residual_sum(x, *rest, **_):
    """Stands in for the final norm: ``norm(h, residual)`` -> (h + residual, None); ``norm(h)`` -> h."""
    if not rest:
        return x
    residual = rest[0]
    return (x if residual is None else x + residual), None


@contextmanager
def _override_forward(module, forward):
    module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's
    try:
        yield
    finally:
        del module.forward


@contextmanager
def _stop_after(inner, k: int):
    end = inner.end_layer
    inner.end_layer = inner.start_layer + k
    try:
        yield
    finally:
        inner.end_layer = end


def _attention_modules(block):
    from vllm.model_executor.layers.attention import Attention

    return [m for m in block.modules() if isinstance(m, Attention)]


class EarlyExitWorkerExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); reached with ``collective_rpc``."""

    def _mcr_exit_inner(self):
        model = self.model_runner.get_model()
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "end_layer"):
            raise NotImplementedError(f"{type(model).__name__}: no decoder block list to stop early in")
        if inner.start_layer != 0 or inner.end_layer != len(inner.layers):
            raise NotImplementedError("early exit inside vLLM needs all blocks on each worker "
                                      "(pipeline parallelism is not supported)")
        return model, inner

    def mcr_exit_describe(self) -> dict:
        model, inner = self._mcr_exit_inner()
        cfg = self.model_runner.model_config.hf_config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return {"n_layers": len(inner.layers), "hidden_size": int(text_cfg.hidden_size),
                "model_class": type(model).__name__,
                "dtype": str(next(inner.parameters()).dtype).removeprefix("torch.")}

    def mcr_exit_embed(self, ids: list[list[int]], layer: int, poolings: list[tuple[str, bool]]) -> dict:
        """Pooled hidden[layer] of each sequence in ``ids`` for each (pooling, normalize) pair.

        Returns ``{"vectors": [float32 bytes of (N, d) per pooling], "shape": [N, d],
        "block_calls": [calls per block], "tokens": n}``.
        """
        import torch

        from mcr_exit.metrics.pooling import pool_hidden
        from vllm.forward_context import set_forward_context

        model, inner = self._mcr_exit_inner()
        n_blocks = len(inner.layers)
        if not 0 <= layer <= n_blocks:
            raise ValueError(f"layer {layer} outside hidden 0..{n_blocks}")
        device = next(inner.parameters()).device
        seq_lens = [len(x) for x in ids]
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])
        calls = [0] * n_blocks

        def counter(i):
            def pre_hook(_module, _args):
                calls[i] += 1
            return pre_hook

        with ExitStack() as stack, torch.inference_mode():
            for i, block in enumerate(inner.layers):
                stack.callback(block.register_forward_pre_hook(counter(i)).remove)
            for block in list(inner.layers)[:layer]:
                for attn in _attention_modules(block):
                    stack.enter_context(_override_forward(attn, _plain_attention(attn, seq_lens)))
            stack.enter_context(_override_forward(inner.norm, _residual_sum))
            stack.enter_context(_stop_after(inner, layer))
            stack.enter_context(set_forward_context(None, self.vllm_config))
            # The class's own forward, not __call__: vLLM's compiled __call__ would replay a graph that
            # runs every block against the paged cache.
            out = type(inner).forward(inner, flat, positions, None)
        hidden = out[0] if isinstance(out, tuple) else out  # (tokens, d): the residual stream at hidden[layer]
        B, T = len(seq_lens), max(seq_lens)
        padded = hidden.new_zeros((B, T, hidden.shape[-1]))
        mask = torch.zeros((B, T), dtype=torch.long, device=device)
        start = 0
        for b, n in enumerate(seq_lens):
            padded[b, :n] = hidden[start:start + n]
            mask[b, :n] = 1
            start += n
        vectors = [pool_hidden(padded, mask, p, normalize=bool(norm)).float().cpu().numpy().tobytes()
                   for p, norm in poolings]  # raw float32 bytes: they cross process boundaries unchanged
        return {"vectors": vectors, "shape": [B, int(hidden.shape[-1])], "block_calls": calls,
                "tokens": int(flat.numel())}
