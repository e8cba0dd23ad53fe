"""``--bos auto`` decided by the model, not by the tokenizer alone.

A tokenizer that declares a BOS but does not add it leaves two readings open: the model was trained
with that token first (SmolLM2's ``<|im_start|>``), or without it (Qwen2.5's ``<|endoftext|>``: its
first text token carries the massive activation, and a prepended ``<|endoftext|>`` carries none). Both
choices are measured on a few built-in prompts: for each, the peak over depth of position 0's norm over
the mean norm of the other tokens (the analysis's ``norm_ratio``, averaged over the prompts).

Rule: prepend the declared BOS unless position 0 carries no massive activation with it
(peak < MASSIVE_RATIO) and does without it (peak >= MASSIVE_RATIO). The decision records both peaks.
Every other case (the tokenizer adds its BOS, declares none, ``--bos force|none``) is the tokenizer's
own behaviour (``tokens.resolve_bos``), unmeasured.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from mcr_exit.data.corpus import BUILTIN_PROMPTS
from mcr_exit.metrics.massive import MASSIVE_RATIO
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.loading import LoadedModel
from mcr_exit.models.tokens import BosDecision, collate, pad_id_of, resolve_bos

EVIDENCE_PROMPTS = 6  # the first six built-in prompts: two each of math, prose and code
EVIDENCE_TOKENS = 64  # tokens per prompt (BOS included)
RULE = (f"prepend the declared BOS unless position 0 has no massive activation with it (peak position-0/other "
        f"norm ratio < {MASSIVE_RATIO:g}) and has one without it (>= {MASSIVE_RATIO:g})")

_decided: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {policy: BosDecision}


def position0_peak_ratio(loaded: LoadedModel, ids: list[list[int]]) -> tuple[float, int]:
    """(peak over hidden indices of the mean over prompts of ||x_0|| / mean_{i>=1} ||x_i||, its hidden index)."""
    input_ids, mask = collate(ids, pad_id_of(loaded.tokenizer), loaded.input_device)
    lengths = mask.sum(1)
    per_layer: dict[int, float] = {}

    def on_hidden(i: int, h: torch.Tensor) -> None:
        norms = h.float().norm(dim=-1)  # (B, T)
        real = mask.to(norms.device).bool()
        real[:, 0] = False
        other = (norms * real).sum(1) / (lengths.to(norms.device) - 1).clamp(min=1)
        per_layer[i] = float((norms[:, 0] / other.clamp_min(1e-12)).mean())

    run_blocks(loaded.adapter, input_ids, mask, on_hidden)
    layer = max(per_layer, key=per_layer.get)
    return per_layer[layer], layer


def _evidence_ids(tokenizer, bos_id: int | None) -> list[list[int]]:
    out = []
    for text in BUILTIN_PROMPTS[:EVIDENCE_PROMPTS]:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        ids = ([bos_id] if bos_id is not None else []) + ids
        out.append(ids[:EVIDENCE_TOKENS])
    return out


def measure_bos_choice(loaded: LoadedModel, token_id: int) -> dict:
    """Both choices measured: peak ratio and its hidden index with the BOS prepended and without."""
    with_bos, at_with = position0_peak_ratio(loaded, _evidence_ids(loaded.tokenizer, token_id))
    without, at_without = position0_peak_ratio(loaded, _evidence_ids(loaded.tokenizer, None))
    return {"peak_ratio_with_bos": with_bos, "peak_layer_with_bos": at_with,
            "peak_ratio_without_bos": without, "peak_layer_without_bos": at_without,
            "n_prompts": EVIDENCE_PROMPTS, "max_tokens": EVIDENCE_TOKENS, "rule": RULE}


def choose_from_evidence(declared: BosDecision, evidence: dict) -> BosDecision:
    """The rule applied to measured peaks (see the module docstring)."""
    w, wo = evidence["peak_ratio_with_bos"], evidence["peak_ratio_without_bos"]
    if w < MASSIVE_RATIO <= wo:
        return replace(declared, token=None, token_id=None, prepend=False, evidence=evidence,
                       reason=(f"tokenizer declares BOS {declared.token} but does not add it; position 0 carries "
                               f"the massive activation without it (peak ratio {wo:.3g}) and not with it "
                               f"({w:.3g}): not prepended, position 0 is the first text token"))
    return replace(declared, evidence=evidence,
                   reason=f"{declared.reason} (peak position-0 ratio {w:.3g} with it, {wo:.3g} without)")


def decide_bos(loaded: LoadedModel, policy: str = "auto") -> BosDecision:
    """The BOS decision for this model: ``resolve_bos``, and for ``auto`` with a declared-but-not-added
    BOS, the evidence of both choices. Measured once per model object and remembered."""
    declared = resolve_bos(loaded.tokenizer, policy)
    if policy != "auto" or not declared.prepend:
        return declared
    memo = _decided.setdefault(loaded.model, {})
    if policy not in memo:
        memo[policy] = choose_from_evidence(declared, measure_bos_choice(loaded, declared.token_id))
    return memo[policy]
