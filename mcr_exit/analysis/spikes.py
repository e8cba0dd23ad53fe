"""Where the massive activations sit: per hidden index, the tokens with the largest norms (position, text,
ratio to the median norm) and the share of prompts whose top token is position 0, a delimiter or another
token (the tabulation of the massive-activations literature).

Built from ``LayerStatistics.tokens`` (reduced during the forward pass: k tokens per prompt and layer,
never the hidden states themselves) and the prompts' token ids.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mcr_exit.metrics.massive import CATEGORIES, MASSIVE_RATIO, token_category

if TYPE_CHECKING:
    from mcr_exit.analysis.collect import LayerStatistics

TOKENS_PER_LAYER = 3  # rows of spike_tokens.csv per hidden index: the most frequent top tokens


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def spike_tokens_table(stats: LayerStatistics, ids: list[list[int]], tokenizer) -> pd.DataFrame:
    """One row per (hidden index, token that is some prompt's largest-norm token there), the most frequent
    first (at most TOKENS_PER_LAYER per index): token text, its most common position, category, how many
    prompts have it on top, median ratio to the median norm. Position 0 counts as one token whatever its
    text (without a BOS it is each prompt's own first word): ``token`` is then its most common text and
    ``distinct_texts`` says how many there were."""
    pos, ratio = stats.tokens["top_position"][:, :, 0], stats.tokens["top_ratio"][:, :, 0]
    N, n_idx = pos.shape
    rows = []
    for i in range(n_idx):
        groups: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
        for n in range(N):
            if not np.isfinite(pos[n, i]) or not ratio[n, i] > 0:
                continue
            p = int(pos[n, i])
            text = _text(tokenizer, ids[n][p])
            groups["\0position0" if p == 0 else text].append((p, float(ratio[n, i]), text))
        # massive ones first (how many prompts have it on top as a massive activation), then how often on top
        ranked = sorted(groups.values(), key=lambda hits: (-sum(r >= MASSIVE_RATIO for _, r, _ in hits), -len(hits),
                                                           -np.median([r for _, r, _ in hits])))
        for rank, hits in enumerate(ranked[:TOKENS_PER_LAYER], start=1):
            position = Counter(p for p, _, _ in hits).most_common(1)[0][0]
            texts = Counter(t for _, _, t in hits)
            text = texts.most_common(1)[0][0]
            rows.append({"index": i, "rank": rank, "token": text, "distinct_texts": len(texts),
                         "position": position, "category": token_category(position, text),
                         "n_prompts": len(hits), "n_massive": sum(r >= MASSIVE_RATIO for _, r, _ in hits),
                         "share": len(hits) / N,
                         "median_ratio": float(np.median([r for _, r, _ in hits]))})
    return pd.DataFrame(rows, columns=["index", "rank", "token", "distinct_texts", "position", "category",
                                       "n_prompts", "n_massive", "share", "median_ratio"])


def category_shares(stats: LayerStatistics, i: int) -> dict[str, float]:
    """Share of prompts whose largest-norm token at hidden ``i`` is position 0, a delimiter or other."""
    at0 = stats.hidden["max_at_position0"][:, i]
    delim = stats.hidden["max_at_delimiter"][:, i]
    ok = np.isfinite(at0)
    n = max(int(ok.sum()), 1)
    s0, sd = float(at0[ok].sum() / n), float(delim[ok].sum() / n)
    return dict(zip(CATEGORIES, (s0, sd, max(0.0, 1.0 - s0 - sd))))


def spike_summary(stats: LayerStatistics, tokens: pd.DataFrame) -> dict:
    """The profile's ``massive_activations``: the rule, the hidden index where the largest-norm token
    stands out most (geometric mean over prompts of its ratio), the share of prompts with a massive
    activation there, the category shares and top tokens there, and per hidden index the top token."""
    top_ratio = stats.hidden["max_norm_ratio"]
    with np.errstate(all="ignore"):
        geo = np.exp(np.nanmean(np.log(np.clip(top_ratio, 1e-12, None)), axis=0))
        massive = np.nanmean(top_ratio >= MASSIVE_RATIO, axis=0)
    med = np.nanmedian(top_ratio, axis=0)
    peak = int(np.nanargmax(geo))
    at_peak = tokens[tokens["index"] == peak].to_dict(orient="records")
    top = at_peak[0] if at_peak else None
    per_layer = []
    for i in range(len(med)):
        first = tokens[(tokens["index"] == i) & (tokens["rank"] == 1)]
        row = first.iloc[0] if len(first) else None
        per_layer.append({"index": i, "median_max_ratio": float(med[i]), "massive_share": float(massive[i]),
                          **category_shares(stats, i),
                          "top_token": None if row is None else row["token"],
                          "top_position": None if row is None else int(row["position"]),
                          "top_share": None if row is None else float(row["share"])})
    return {
        "rule": {"statistic": "token L2 norm / lower median of the row's token norms", "threshold": MASSIVE_RATIO,
                 "massive_when": f"ratio >= {MASSIVE_RATIO:g}"},
        "peak_layer": peak,
        "peak_median_ratio": float(med[peak]),
        "massive_share_at_peak": float(massive[peak]),
        "found": bool(massive[peak] > 0),
        "shares_at_peak": category_shares(stats, peak),
        "top_tokens_at_peak": [{k: r[k] for k in ("token", "distinct_texts", "position", "category", "share",
                                                  "n_massive", "median_ratio")}
                               for r in at_peak],
        "at_position0": bool(top is not None and top["category"] == "position0"),
        "per_layer": per_layer,
    }
