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

The evidence of a model read from a file or a local folder is kept in the cache folder
(``cache_dir.cache_root()/bos-evidence``), keyed by the weights (a GGUF's sha256; a folder's files'
names, sizes and times), dtype, device type, BOS id, the evidence prompts and torch's version: a second
run reads the numbers the first measured instead of two forward passes.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import replace
from pathlib import Path

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


EVIDENCE_FORMAT = 1  # bump when what is measured changes


def _evidence_file(loaded: LoadedModel, token_id: int) -> Path | None:
    """Where this model's evidence is kept, or None (a hub model, an object built in code, no cache)."""
    from mcr_exit.cache_dir import cache_root, file_identity, file_sha256

    spec, root = loaded.spec, cache_root()
    if root is None or spec.source not in ("gguf", "folder"):
        return None
    path = Path(spec.location)
    try:
        if path.is_file():
            weights = file_sha256(path, root)
        elif path.is_dir():
            weights = sorted([f.name, *(file_identity(f)[k] for k in ("size", "mtime_ns"))]
                             for f in path.iterdir() if f.is_file())
        else:
            return None
    except OSError:
        return None
    doc = {"format": EVIDENCE_FORMAT, "weights": weights, "dtype": spec.dtype,
           "device": torch.device(spec.device).type, "bos": token_id, "torch": torch.__version__,
           "prompts": BUILTIN_PROMPTS[:EVIDENCE_PROMPTS], "tokens": EVIDENCE_TOKENS}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
    return root / "bos-evidence" / f"{key}.json"


def cached_bos_choice(loaded: LoadedModel, token_id: int) -> dict:
    """``measure_bos_choice``, read from the cache folder where this model's evidence was measured before."""
    from mcr_exit.cache_dir import read_json, write_json_atomic

    where = _evidence_file(loaded, token_id)
    known = read_json(where) if where is not None else {}
    if known.get("rule") == RULE:
        return known
    evidence = measure_bos_choice(loaded, token_id)
    if where is not None:
        try:
            write_json_atomic(where, evidence)
        except OSError:
            pass  # a read-only cache: measured again next time
    return evidence


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
        memo[policy] = choose_from_evidence(declared, cached_bos_choice(loaded, declared.token_id))
    return memo[policy]
