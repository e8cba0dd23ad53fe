"""Causal tests of the massive activation: variants (baseline, MLP ablation at BOS, BOS clipping),
the blocks that build the spike (``--blocks auto``), next-token loss, and per-variant summaries.

Index conventions: blocks are 0-based; hidden[i] is the output of block i-1 (hidden[0] = embeddings),
so ablating block j changes hidden[j+1] onwards.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from mcr_exit.analysis.collect import collect_statistics
from mcr_exit.analysis.phases import MIN_PEAK_RATIO, Phases, detect_phases
from mcr_exit.analysis.profile import layer_table
from mcr_exit.errors import ConfigError
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.loading import LoadedModel
from mcr_exit.models.surgery import ablate_bos_mlp, capture_mlp_residual, clip_bos_residual
from mcr_exit.models.tokens import collate, length_batches, pad_id_of

if TYPE_CHECKING:  # the command's config (analysis/ablate_run.py) imports this module
    from mcr_exit.analysis.ablate_run import AblateConfig

# A block is a stage of the spike when its MLP writes at least this share of the peak BOS norm into
# position 0, and this many times more than it writes into the other positions.
STAGE_SHARE = 0.1
STAGE_CONTRAST = 5.0
MAX_ROUNDS = 4


@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str
    kind: str  # "baseline", "ablate" or "clip"
    blocks: tuple[int, ...] = ()
    clip_layer: int | None = None  # hidden index whose position 0 is clipped
    gamma: float | None = None

    def __post_init__(self):
        if self.kind not in ("baseline", "ablate", "clip"):
            raise ConfigError(f"unknown variant kind '{self.kind}'")
        if self.kind == "clip" and (self.gamma is None or not self.gamma > 0):
            raise ConfigError(f"clipping value must be > 0, got {self.gamma}")

    def context(self, loaded: LoadedModel):
        if self.kind == "ablate":
            return ablate_bos_mlp(loaded.adapter, self.blocks)
        if self.kind == "clip":
            return clip_bos_residual(loaded.adapter, self.clip_layer, self.gamma)
        return nullcontext()


@dataclass(frozen=True, kw_only=True)
class SpikeScan:
    """Means over prompts. Hidden-indexed arrays have L+1 entries, block-indexed arrays L."""

    bos_norm: np.ndarray
    other_norm: np.ndarray
    bos_max_abs: np.ndarray  # largest |coordinate| of position 0
    mlp_bos: np.ndarray  # norm of block j's MLP residual write into position 0
    mlp_other: np.ndarray  # mean norm of that write into the other positions

    @property
    def norm_ratio(self) -> np.ndarray:
        return self.bos_norm / np.maximum(self.other_norm, 1e-12)


def _row_norms(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, d) -> per-row norm of position 0 and mean norm of the other real positions."""
    n = h.float().norm(dim=-1)
    rest = mask[:, 1:].float()
    return n[:, 0], (n[:, 1:] * rest).sum(1) / rest.sum(1).clamp(min=1)


def scan_spike(loaded: LoadedModel, ids: list[list[int]], variant: Variant | None = None,
               max_batch: int = 8) -> SpikeScan:
    """BOS norms and MLP writes per layer, under ``variant`` (no attention statistics: cheap)."""
    L = loaded.n_layers
    sums = {k: np.zeros(L + 1) for k in ("bos", "other", "maxabs")}
    sums.update({k: np.zeros(L) for k in ("mlp_bos", "mlp_other")})
    pad = pad_id_of(loaded.tokenizer)
    for batch in length_batches([len(x) for x in ids], 8192, max_batch):
        input_ids, mask = collate([ids[i] for i in batch], pad, loaded.input_device)

        def on_hidden(i: int, h: torch.Tensor) -> None:
            b, o = _row_norms(h, mask)
            sums["bos"][i] += b.sum().item()
            sums["other"][i] += o.sum().item()
            sums["maxabs"][i] += h[:, 0].float().abs().amax(-1).sum().item()

        def on_mlp(j: int, out: torch.Tensor) -> None:
            b, o = _row_norms(out, mask)
            sums["mlp_bos"][j] += b.sum().item()
            sums["mlp_other"][j] += o.sum().item()

        with (variant or Variant(name="baseline", kind="baseline")).context(loaded):
            with capture_mlp_residual(loaded.adapter, on_mlp):
                run_blocks(loaded.adapter, input_ids, mask, on_hidden)
    n = len(ids)
    return SpikeScan(bos_norm=sums["bos"] / n, other_norm=sums["other"] / n, bos_max_abs=sums["maxabs"] / n,
                     mlp_bos=sums["mlp_bos"] / n, mlp_other=sums["mlp_other"] / n)


def spike_stages(scan: SpikeScan, exclude: tuple[int, ...] = ()) -> list[int]:
    """Blocks before the norm-ratio peak whose MLP writes a large share of the peak BOS norm into BOS."""
    ratio = scan.norm_ratio
    peak = int(np.nanargmax(ratio))
    if ratio[peak] < MIN_PEAK_RATIO:
        return []
    level = STAGE_SHARE * scan.bos_norm[peak]
    return [j for j in range(peak) if j not in exclude and scan.mlp_bos[j] >= level
            and scan.mlp_bos[j] >= STAGE_CONTRAST * scan.mlp_other[j]]


def find_spike_blocks(loaded: LoadedModel, ids: list[list[int]], max_batch: int = 8) -> tuple[list[int], list[dict]]:
    """Every block whose MLP builds the massive activation (``--blocks auto``).

    Ablate the stages found so far and look again, until no massive activation remains or no new
    stage appears: a model that builds the spike in several blocks (or rebuilds it later) is caught.
    Returns the blocks and one log entry per round.
    """
    blocks: list[int] = []
    log = []
    for _ in range(MAX_ROUNDS):
        variant = Variant(name="probe", kind="ablate", blocks=tuple(blocks)) if blocks else None
        scan = scan_spike(loaded, ids, variant, max_batch)
        ratio = scan.norm_ratio
        peak = int(np.nanargmax(ratio))
        new = spike_stages(scan, tuple(blocks))
        log.append({"ablated": list(blocks), "peak_hidden": peak, "peak_norm_ratio": float(ratio[peak]),
                    "new_stages": new, "mlp_bos": [float(v) for v in scan.mlp_bos]})
        if not new:
            break
        blocks = sorted(blocks + new)
    if not blocks:
        first = log[0]
        raise ConfigError(
            f"--blocks auto: no MLP builds a massive activation at position 0 (peak position-0/other norm ratio "
            f"{first['peak_norm_ratio']:.3g} at hidden {first['peak_hidden']}); pass --blocks explicitly")
    return blocks, log


def next_token_loss(loaded: LoadedModel, ids: list[list[int]], max_batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over all real tokens."""
    total, count = 0.0, 0
    pad = pad_id_of(loaded.tokenizer)
    for batch in length_batches([len(x) for x in ids], 4096, max_batch):
        input_ids, mask = collate([ids[i] for i in batch], pad, loaded.input_device)
        with torch.inference_mode():
            logits = loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        keep = mask[:, 1:].bool()
        total += nll[keep].sum().item()
        count += int(keep.sum())
    return total / max(count, 1)


def phases_of(table: pd.DataFrame) -> Phases:
    return detect_phases(
        **{k: table[k].to_numpy() for k in ("bos_norm", "norm_ratio", "entropy", "entropy_norm", "c", "alpha")},
        sink_rate=table["sink_rate"].to_numpy()[:-1],
    )


@dataclass(frozen=True, kw_only=True)
class VariantResult:
    variant: Variant
    table: pd.DataFrame
    phases: Phases
    loss: float


def run_variant(loaded: LoadedModel, ids: list[list[int]], variant: Variant, *, tau: float = 0.3,
                max_batch: int = 8) -> VariantResult:
    """Full per-layer statistics and next-token loss with the variant's surgery active."""
    with variant.context(loaded):
        stats = collect_statistics(loaded, ids, tau=tau, max_batch=max_batch)
        loss = next_token_loss(loaded, ids, max_batch)
    table = layer_table(stats)
    return VariantResult(variant=variant, table=table, phases=phases_of(table), loss=loss)


def clip_gammas(max_abs: float, n: int = 7) -> list[float]:
    """A geometric sweep from half the spike's largest coordinate down to 1/1000 of it."""
    return [float(g) for g in np.geomspace(max_abs / 2, max_abs / 1000, n)]


def summarize(result: VariantResult, *, spike_layer: int, window: tuple[int, int], baseline_loss: float) -> dict:
    """One row per variant. ``window`` = [start, end) hidden indices of the baseline compress phase;
    sink rate is averaged over the blocks reading those hidden states."""
    t, (a, b) = result.table, window
    v = result.variant
    return {
        "variant": v.name, "kind": v.kind, "blocks": ",".join(map(str, v.blocks)),
        "clip_layer": v.clip_layer, "gamma": v.gamma,
        "spike_layer": spike_layer,
        "bos_norm_at_spike": float(t["bos_norm"].iloc[spike_layer]),
        "norm_ratio_at_spike": float(t["norm_ratio"].iloc[spike_layer]),
        "entropy_at_spike": float(t["entropy"].iloc[spike_layer]),
        "peak_norm_ratio": result.phases.peak_norm_ratio,
        "min_entropy": result.phases.min_entropy,
        "mean_entropy_window": float(np.nanmean(t["entropy"].iloc[a:b])),
        "mean_entropy_norm_window": float(np.nanmean(t["entropy_norm"].iloc[a:b])),
        "mean_sink_rate_window": float(np.nanmean(t["sink_rate"].iloc[a:min(b, len(t) - 1)])),
        "phases_found": result.phases.found,
        "loss": result.loss,
        "delta_loss": result.loss - baseline_loss if math.isfinite(baseline_loss) else float("nan"),
    }


SIDE_BY_SIDE = ("bos_norm", "other_norm", "norm_ratio", "entropy", "entropy_norm", "anisotropy",
                "sink_rate", "mixing_score")  # a selection of registered metrics (metrics/registry.py)


def side_by_side(results: list[VariantResult]) -> pd.DataFrame:
    """Per-layer table: one column per (metric, variant), e.g. ``entropy[baseline]``."""
    frame = {"index": results[0].table["index"].to_numpy(), "fraction": results[0].table["fraction"].to_numpy()}
    for key in SIDE_BY_SIDE:
        for r in results:
            frame[f"{key}[{r.variant.name}]"] = r.table[key].to_numpy()
    return pd.DataFrame(frame)


@dataclass(frozen=True, kw_only=True)
class AblationOutcome:
    blocks: tuple[int, ...]
    auto_log: list[dict]
    spike_layer: int
    results: list[VariantResult]  # baseline first, then the ablation, then clip variants
    summary: pd.DataFrame
    side_by_side: pd.DataFrame
    spike_max_abs: float


def plan_variants(loaded: LoadedModel, ids: list[list[int]], cfg: AblateConfig) -> tuple[list[Variant], list[dict], float]:
    """Which blocks to ablate and which clipping values to try (the latter need the spike's size)."""
    from mcr_exit.models.surgery import check_block, parse_blocks

    if cfg.layers.strip().lower() == "auto":
        blocks, log = find_spike_blocks(loaded, ids[: cfg.auto_prompts], cfg.batch_size)
    else:
        blocks, log = parse_blocks(cfg.layers, loaded.n_layers), []
    spike_layer = cfg.clip_layer if cfg.clip_layer is not None else max(blocks) + 1
    if not 1 <= spike_layer <= loaded.n_layers:
        raise ConfigError(f"clip layer {spike_layer} is out of range: hidden indices 1..{loaded.n_layers}")
    check_block(spike_layer - 1, loaded.n_layers)
    variants = [Variant(name="baseline", kind="baseline"),
                Variant(name="ablate " + ",".join(map(str, blocks)), kind="ablate", blocks=tuple(blocks))]
    max_abs = float("nan")
    if cfg.clip is not None:
        max_abs = float(scan_spike(loaded, ids[: cfg.auto_prompts], None, cfg.batch_size).bos_max_abs[spike_layer])
        gammas = list(cfg.clip) or clip_gammas(max_abs)
        variants += [Variant(name=f"clip {g:.4g}", kind="clip", clip_layer=spike_layer, gamma=g) for g in gammas]
    return variants, [{"spike_layer": spike_layer}, *log], max_abs


def run_ablation(loaded: LoadedModel, ids: list[list[int]], cfg: AblateConfig, on_result=None) -> AblationOutcome:
    """Baseline, the ablation and the clipping sweep; ``on_result(VariantResult)`` after each variant."""
    variants, log, max_abs = plan_variants(loaded, ids, cfg)
    spike_layer = log[0]["spike_layer"]
    results = []
    for v in variants:
        r = run_variant(loaded, ids, v, tau=cfg.tau, max_batch=cfg.batch_size)
        results.append(r)
        if on_result is not None:
            on_result(r)
    base = results[0]
    p = base.phases
    window = (p.compress_start, p.refine_start) if p.found else (spike_layer, loaded.n_layers)
    summary = pd.DataFrame([summarize(r, spike_layer=spike_layer, window=window, baseline_loss=base.loss)
                            for r in results])
    return AblationOutcome(blocks=results[1].variant.blocks, auto_log=log[1:], spike_layer=spike_layer,
                           results=results, summary=summary, side_by_side=side_by_side(results[:2]),
                           spike_max_abs=max_abs)
