"""Tokenization with an explicit BOS policy, and right-padded batches.

Right padding keeps position 0 at each row's first real token and keeps padding out of every real
token's causal context, so batched results equal unbatched ones.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mcr_exit.errors import ConfigError, DataError
from mcr_exit.vocabulary import BOS_POLICIES


@dataclass(frozen=True, kw_only=True)
class BosDecision:
    """What sits at position 0 and why."""

    policy: str
    token: str | None  # the BOS token placed at position 0, None when there is none
    token_id: int | None
    prepend: bool  # whether this package prepends it (the tokenizer does not)
    special_tokens: bool  # add_special_tokens passed to the tokenizer
    reason: str
    evidence: dict | None = None  # --bos auto measured on the model: both choices' peaks (models/bos_choice.py)


def resolve_bos(tokenizer, policy: str = "auto") -> BosDecision:
    if policy not in BOS_POLICIES:
        raise ConfigError(f"unknown BOS policy '{policy}': use {', '.join(BOS_POLICIES)}")
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if policy == "none":
        return BosDecision(policy=policy, token=None, token_id=None, prepend=False, special_tokens=False,
                           reason="--bos none: no special tokens; position 0 is the first text token")
    probe = tokenizer("Hello world", add_special_tokens=True).input_ids
    adds = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
    if bos_id is None:
        if policy == "force":
            raise ConfigError("--bos force: this tokenizer declares no BOS token")
        return BosDecision(policy=policy, token=None, token_id=None, prepend=False, special_tokens=True,
                           reason="tokenizer declares no BOS token: position 0 is the first text token")
    if adds:
        return BosDecision(policy=policy, token=bos, token_id=bos_id, prepend=False, special_tokens=True,
                           reason=f"tokenizer adds its BOS {bos}")
    return BosDecision(policy=policy, token=bos, token_id=bos_id, prepend=True, special_tokens=True,
                       reason=f"tokenizer declares BOS {bos} but does not add it: prepended")


@dataclass(frozen=True, kw_only=True)
class EncodedPrompts:
    ids: list[list[int]]
    kept: list[int]  # indices into the original prompt list
    dropped_empty: int
    truncated: int
    position0: dict[str, int]  # token text at position 0 -> count


def encode_prompts(tokenizer, texts: Sequence[str], bos: BosDecision, max_length: int) -> EncodedPrompts:
    """Token ids per prompt, BOS placed per policy, truncated to ``max_length`` tokens.

    Prompts with no content token (nothing but the BOS) are dropped; if all are, DataError.
    """
    if max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, got {max_length}")
    out, kept, dropped, truncated = [], [], 0, 0
    pos0: Counter[str] = Counter()
    for i, text in enumerate(texts):
        ids = list(tokenizer(text, add_special_tokens=bos.special_tokens).input_ids)
        if bos.prepend and (not ids or ids[0] != bos.token_id):
            ids = [bos.token_id, *ids]
        n_bos = 1 if (bos.token_id is not None and ids and ids[0] == bos.token_id) else 0
        if len(ids) - n_bos < 1:
            dropped += 1
            continue
        if len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        if len(ids) < 2:
            dropped += 1
            continue
        out.append(ids)
        kept.append(i)
        pos0[tokenizer.convert_ids_to_tokens(ids[0])] += 1
    if not out:
        raise DataError(f"all {len(texts)} prompts are empty after tokenization")
    return EncodedPrompts(ids=out, kept=kept, dropped_empty=dropped, truncated=truncated, position0=dict(pos0))


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if tid is not None:
            return tid
    return 0


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``. To a GPU it goes through pinned memory and the host does not wait: a copy
    from pageable memory first waits for every kernel queued on the stream, which would stall a thread
    that queues work ahead of the GPU."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def collate(batch: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), each (B, T)."""
    lengths = np.fromiter((len(x) for x in batch), dtype=np.int64, count=len(batch))
    valid = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
    ids = np.full(valid.shape, pad_id, dtype=np.int64)
    ids[valid] = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum()))
    return to_device(torch.from_numpy(ids), device), to_device(torch.from_numpy(valid.astype(np.int64)), device)


def length_batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Group prompt indices of similar length into batches of at most max_tokens padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        if cur and (new_max * (len(cur) + 1) > max_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches
