"""Every metric name that mcr-exit writes, defined once: name, kind, unit, description.

The profile, the CSVs, MLflow and the printed summaries read this table; writing a name that is not
here is an error, not a silent drop. Imports nothing heavy (no torch, no pandas).

Kinds and where they go:
* ``hidden``: one value per hidden state, hidden index 0..L (``layers.csv`` rows, profile ``layers``);
* ``attention``: one value per block, block index 0..L-1 (stored on the row of the hidden state it reads);
* ``head``: one value per (block, head) (``per_head.csv``);
* ``summary``: one value per run (MLflow ``summary/...``);
* ``checkpoint``: one value per training checkpoint of a sweep (MLflow step = training step).

MLflow keys are ``<kind>/<label>``; the label is the name, or a self-explaining one for the paper's
one-letter symbols (``M`` -> ``hidden/bos_sq_norm_M``).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("hidden", "attention", "head", "summary", "checkpoint")


@dataclass(frozen=True, kw_only=True)
class MetricName:
    name: str  # column name in the profile and the CSVs (the paper's symbol where it has one)
    kind: str
    unit: str
    description: str
    label: str | None = None  # MLflow name when the column name alone says too little

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"metric '{self.name}': kind must be one of {', '.join(KINDS)}, got '{self.kind}'")

    @property
    def key(self) -> str:
        """The MLflow metric key."""
        return f"{self.kind}/{self.label or self.name}"


def _m(kind: str, name: str, unit: str, description: str, label: str | None = None) -> MetricName:
    return MetricName(name=name, kind=kind, unit=unit, description=description, label=label)


_HIDDEN = [
    ("bos_norm", "norm", "||x_0||, norm of position 0 (BOS when present)"),
    ("other_norm", "norm", "mean over i >= 1 of ||x_i||"),
    ("norm_ratio", "ratio", "bos_norm / other_norm: the massive-activation ratio"),
    ("entropy", "nats", "matrix entropy H(X) = -sum_j p_j log p_j, p_j = sigma_j^2 / ||X||_F^2"),
    ("entropy_norm", "fraction", "H / log(min(T, d)), in [0, 1]"),
    ("anisotropy", "fraction", "p_1 = sigma_1^2 / ||X||_F^2"),
    ("sigma1_sq", "norm^2", "largest squared singular value of X"),
    ("sigma2_sq", "norm^2", "second squared singular value of X"),
    ("sigma3_sq", "norm^2", "third squared singular value of X"),
    ("frob_sq", "norm^2", "||X||_F^2 = M + R"),
    ("dominance", "ratio", "sigma_1^2 / sum_{j>=2} sigma_j^2"),
    ("M", "norm^2", "Theorem 1: M = ||x_0||^2, squared norm of position 0", "bos_sq_norm_M"),
    ("R", "norm^2", "Theorem 1: R = sum_{i != 0} ||x_i||^2, squared norm of the other positions",
     "rest_sq_norm_R"),
    ("alpha", "fraction", "Theorem 1: alpha = (1/R) sum_{i != 0} ||x_i||^2 cos^2(theta_i), how well the other "
                          "positions align with position 0", "alignment_alpha"),
    ("c", "ratio", "Theorem 1: c = M / R, position 0's squared norm against the rest", "bos_to_rest_c"),
    ("sigma1_sq_bound", "norm^2", "Theorem 1 lower bound M + alpha R on sigma_1^2"),
    ("sigma1_sq_bound_weak", "norm^2", "weak bound M on sigma_1^2 (alpha = 0)"),
    ("dominance_bound", "ratio", "Corollary 2.1 lower bound (c + alpha) / (1 - alpha) on dominance"),
    ("dominance_bound_weak", "ratio", "weak bound c on dominance"),
    ("anisotropy_bound", "fraction", "Corollary 2.2 lower bound p = (c + alpha) / (c + 1) on anisotropy"),
    ("anisotropy_bound_weak", "fraction", "weak bound c / (c + 1) on anisotropy"),
    ("entropy_bound", "nats", "Corollary 2.3 upper bound -p log p - (1-p) log(1-p) + (1-p) log(r-1) on entropy"),
    ("entropy_bound_weak", "nats", "the entropy bound with p = c / (c + 1)"),
    ("max_norm_ratio", "ratio", "largest token norm / median token norm, at any position (metrics/massive.py)"),
    ("max_at_position0", "fraction", "share of prompts whose largest-norm token is position 0"),
    ("max_at_delimiter", "fraction", "share of prompts whose largest-norm token is a delimiter (not position 0)"),
]
_ATTENTION = [
    ("sink_rate", "fraction", "share of heads whose sink score is >= tau"),
    ("sink_score", "fraction", "mean over heads of (1/T) sum_t A[t, 0], attention paid to position 0"),
    ("mixing_score", "fraction", "mean over heads and rows t >= 1 of H(A[t, :]) / log(t + 1)"),
    ("colsum_concentration", "fraction", "mean over heads of C = 1 - H(c) / log T, c the mean attention column"),
    ("colsum_rate", "fraction", "share of heads with ColSum concentration >= tau"),
    ("diag_score", "fraction", "mean over heads of D = (1/T) sum_{t>=1} A[t, t], attention to self"),
    ("svi", "fraction", "mean over heads of the sink-versus-identity index B / (B + D)"),
    ("b_plus_d", "fraction", "mean over heads of B + D (sink score plus diagonal score)"),
]
_HEAD = [
    ("sink_score", "fraction", "(1/T) sum_t A[t, 0] of one head"),
    ("mixing_score", "fraction", "mean over rows t >= 1 of H(A[t, :]) / log(t + 1) of one head"),
    ("colsum_concentration", "fraction", "C = 1 - H(c) / log T of one head"),
    ("diag_score", "fraction", "D = (1/T) sum_{t>=1} A[t, t] of one head"),
]
_SUMMARY = [
    ("compress_start", "hidden index", "first hidden state of the compress phase"),
    ("refine_start", "hidden index", "first hidden state of the refine phase"),
    ("compress_start_frac", "fraction", "compress_start / L"),
    ("refine_start_frac", "fraction", "refine_start / L"),
    ("peak_norm_ratio", "ratio", "largest bos_norm / other_norm over depth"),
    ("min_entropy", "nats", "smallest matrix entropy over depth"),
    ("corr_bos_entropy", "correlation", "Pearson r of layer-to-layer changes of BOS norm and entropy"),
    ("corr_bos_sink_lag1", "correlation", "Pearson r of changes of BOS norm after block l and sink rate of block l+1"),
    ("carrier_norm_share", "fraction", "median over compress layers of c / (c + alpha): 1 = norm carries it"),
    ("embedding_layer", "hidden index", "recommended embedding layer (midpoint of the compress phase)"),
    # ablate: one row per variant (child runs), and the parent's baseline/ablated pairs
    ("bos_norm_at_spike", "norm", "BOS norm at the spike layer"),
    ("norm_ratio_at_spike", "ratio", "BOS/other norm ratio at the spike layer"),
    ("entropy_at_spike", "nats", "matrix entropy at the spike layer"),
    ("mean_entropy_window", "nats", "mean entropy over the baseline compress phase"),
    ("mean_entropy_norm_window", "fraction", "mean normalized entropy over the baseline compress phase"),
    ("mean_sink_rate_window", "fraction", "mean sink rate of the blocks reading the baseline compress phase"),
    ("loss", "nats/token", "mean next-token cross-entropy"),
    ("delta_loss", "nats/token", "loss minus the baseline's loss"),
    ("spike_layer", "hidden index", "hidden state where the spike is clipped (after the last ablated block)"),
    ("gamma", "norm", "clipping value: position 0 clipped to [-gamma, gamma]"),
    # compare: Fisher-z pooled correlations across runs
    ("corr_bos_entropy_fisher_mean", "correlation", "Fisher-z mean of corr_bos_entropy over the compared runs"),
    ("corr_bos_entropy_sd", "correlation", "spread of corr_bos_entropy over the compared runs"),
    ("corr_bos_entropy_n", "count", "runs with a finite corr_bos_entropy"),
    ("corr_bos_sink_lag1_fisher_mean", "correlation", "Fisher-z mean of corr_bos_sink_lag1 over the compared runs"),
    ("corr_bos_sink_lag1_sd", "correlation", "spread of corr_bos_sink_lag1 over the compared runs"),
    ("corr_bos_sink_lag1_n", "count", "runs with a finite corr_bos_sink_lag1"),
]
_CHECKPOINT = [
    ("peak_norm_ratio", "ratio", "largest bos_norm / other_norm over depth, per checkpoint"),
    ("min_entropy", "nats", "smallest matrix entropy over depth, per checkpoint"),
    ("max_sink_rate", "fraction", "largest sink rate over blocks, per checkpoint"),
    ("peak_bos_norm", "norm", "largest BOS norm over depth, per checkpoint"),
]

REGISTRY: dict[str, dict[str, MetricName]] = {
    kind: {row[0]: _m(kind, *row) for row in rows}
    for kind, rows in (("hidden", _HIDDEN), ("attention", _ATTENTION), ("head", _HEAD),
                       ("summary", _SUMMARY), ("checkpoint", _CHECKPOINT))
}
HIDDEN_METRICS = tuple(REGISTRY["hidden"])
ATTENTION_METRICS = tuple(REGISTRY["attention"])
HEAD_METRICS = tuple(REGISTRY["head"])
SUMMARY_METRICS = tuple(REGISTRY["summary"])
CHECKPOINT_METRICS = tuple(REGISTRY["checkpoint"])


# Every per-layer series is logged twice: against the layer index (``hidden/entropy``, step = i) and
# against relative depth (``depth/hidden/entropy``, step = round(100 i / L)), so that models of
# different depth overlay on one chart in the MLflow UI.
DEPTH_PREFIX = "depth"


def depth_step(index: int, n_layers: int) -> int:
    """Relative depth in percent: round(100 * index / L) (hidden index i, or block index j, over L)."""
    return round(100 * index / n_layers)


def depth_key(key: str) -> str:
    """``hidden/entropy`` -> ``depth/hidden/entropy``."""
    return f"{DEPTH_PREFIX}/{key}"


def metric(kind: str, name: str) -> MetricName:
    """The registered metric; an unregistered name is an error (never dropped without a word)."""
    try:
        return REGISTRY[kind][name]
    except KeyError:
        raise KeyError(f"'{name}' is not a registered {kind} metric (mcr_exit/metrics/registry.py)") from None


def mlflow_key(kind: str, name: str, scope: str | None = None) -> str:
    """``<kind>/<label>``, or ``<kind>/<scope>/<label>`` for one of several variants in a run
    (``summary/baseline/peak_norm_ratio`` beside ``summary/ablated/peak_norm_ratio``)."""
    m = metric(kind, name)
    return m.key if scope is None else f"{kind}/{scope}/{m.label or m.name}"


def keyed(kind: str, values: dict, scope: str | None = None) -> dict[str, object]:
    """{name: value} -> {MLflow key: value}; raises on a name the registry does not know."""
    return {mlflow_key(kind, k, scope): v for k, v in values.items()}


def describe(kinds: tuple[str, ...] = KINDS, *, depth: bool = True) -> dict[str, dict[str, str]]:
    """MLflow key -> column name, unit, description (logged with every run as ``metrics.json``); with
    ``depth``, the per-layer kinds also under their relative-depth key."""
    out = {}
    for kind in kinds:
        for m in REGISTRY[kind].values():
            out[m.key] = {"column": m.name, "unit": m.unit, "description": m.description}
            if depth and kind in ("hidden", "attention"):
                out[depth_key(m.key)] = {"column": m.name, "unit": m.unit,
                                         "description": f"{m.description}; step = round(100 * layer / L)"}
    return out


def legend(kinds: tuple[str, ...] = KINDS) -> str:
    """A Markdown table of the metric keys (the run description in the MLflow UI)."""
    lines = ["| metric | unit | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {v['unit']} | {v['description']} |" for k, v in describe(kinds, depth=False).items()]
    if any(kind in ("hidden", "attention") for kind in kinds):
        lines.append(f"\nEach `hidden/...` and `attention/...` series is also logged as `{DEPTH_PREFIX}/hidden/...`, "
                     f"`{DEPTH_PREFIX}/attention/...` with step = round(100 * layer / L) (relative depth, percent).")
    return "\n".join(lines)
