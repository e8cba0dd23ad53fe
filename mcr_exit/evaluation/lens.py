"""LogitLens: every hidden state through the model's own final norm and unembedding.

Per hidden index i we report the next-token cross-entropy (nats), perplexity exp(CE) and the mean
entropy (nats) of the lens distribution softmax(unembed(ln_final(hidden[i]))). Logits exist only for
``chunk_tokens`` positions at a time, so memory is O(chunk_tokens x vocab), not tokens x vocab x layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mcr_exit.errors import ConfigError, DataError
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.bos_choice import decide_bos
from mcr_exit.models.tokens import collate, pad_id_of


def lens_logits(adapter, hidden: torch.Tensor) -> torch.Tensor:
    """(..., d) hidden -> (..., V) logits via the adapter's final norm + unembedding (+ its family's post-processing)."""
    return adapter.final_logits(hidden)


def ce_and_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """Sums over rows of (cross-entropy, entropy) in nats; logits (N, V), targets (N,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    ce = -logp.gather(1, targets[:, None]).sum()
    ent = -(logp.exp() * logp).sum()
    return float(ce), float(ent)


def make_windows(token_ids: list[int], window: int, max_windows: int | None, bos_id: int | None) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``window`` tokens (BOS prepended to each when given)."""
    body = window - (1 if bos_id is not None else 0)
    if body < 2:
        raise ConfigError(f"--window must be at least {2 + (bos_id is not None)}, got {window}")
    n = len(token_ids) // body
    if n == 0:
        raise DataError(f"corpus too short for one window: {len(token_ids)} tokens < {body} (--window {window})")
    if max_windows is not None:
        n = min(n, max_windows)
    prefix = [bos_id] if bos_id is not None else []
    return [prefix + token_ids[j * body : (j + 1) * body] for j in range(n)]


@dataclass(frozen=True, kw_only=True)
class LensResult:
    layers: list[int]
    cross_entropy: list[float]  # nats per predicted token
    perplexity: list[float]
    entropy: list[float]  # nats
    n_tokens: int  # predicted tokens per layer
    n_windows: int
    window: int
    config: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [{"layer": k, "cross_entropy": c, "perplexity": p, "entropy": e}
                for k, c, p, e in zip(self.layers, self.cross_entropy, self.perplexity, self.entropy)]


def corpus_token_ids(tokenizer, texts: list[str]) -> list[int]:
    """The corpus as one token stream (documents joined by newlines, no special tokens)."""
    return list(tokenizer("\n".join(t for t in texts if t.strip()), add_special_tokens=False).input_ids)


def logit_lens(
    loaded, texts: list[str], *, window: int = 256, max_windows: int | None = 32, batch_size: int = 4,
    bos: str = "auto", chunk_tokens: int = 512, layers=None, progress_factory=None,
) -> LensResult:
    """Per-layer LogitLens cross-entropy, perplexity and entropy on ``texts`` cut into windows.

    progress_factory(total) -> update(n), if given, is told how many windows each batch finished.
    """
    from mcr_exit.evaluation.features import check_layers

    adapter = loaded.adapter
    wanted = check_layers(layers, adapter.n_layers)
    decision = decide_bos(loaded, bos)
    windows = make_windows(corpus_token_ids(loaded.tokenizer, texts), window, max_windows, decision.token_id)
    first_target = 1  # position 0 (BOS or first token) is never a target
    sums = {k: [0.0, 0.0] for k in wanted}
    n_tok = 0
    pad, device = pad_id_of(loaded.tokenizer), adapter.embed.weight.device
    advance = progress_factory(len(windows)) if progress_factory else None
    for start in range(0, len(windows), batch_size):
        ids, mask = collate(windows[start : start + batch_size], pad, device)
        targets = ids[:, first_target:].reshape(-1)
        n_tok += targets.numel()

        def score(i: int, h: torch.Tensor) -> None:
            if i not in sums:
                return
            flat = h[:, first_target - 1 : -1].reshape(-1, h.shape[-1])
            for s in range(0, flat.shape[0], chunk_tokens):
                ce, ent = ce_and_entropy(lens_logits(adapter, flat[s : s + chunk_tokens]),
                                         targets[s : s + chunk_tokens])
                sums[i][0] += ce
                sums[i][1] += ent

        with torch.inference_mode():
            run_blocks(adapter, ids, mask, score, stop_at=max(wanted))
        if advance:
            advance(ids.shape[0])
    ce = [sums[k][0] / n_tok for k in wanted]
    return LensResult(
        layers=wanted, cross_entropy=ce, perplexity=[math.exp(min(c, 700.0)) for c in ce],
        entropy=[sums[k][1] / n_tok for k in wanted], n_tokens=n_tok, n_windows=len(windows), window=window,
        config={"window": window, "max_windows": max_windows, "bos": decision.reason, "chunk_tokens": chunk_tokens},
    )
