"""Linear probes: a logistic-regression classifier per hidden index on pooled frozen features."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcr_exit.data.sources import _records_from_file
from mcr_exit.errors import DataError
from mcr_exit.vocabulary import DEFAULT_POOLING


@dataclass(frozen=True, kw_only=True)
class LabelledTexts:
    texts: list[str]
    labels: list[str]
    source: str


def read_labelled(path: str | Path, *, text_field: str = "sentence", label_field: str = "label") -> LabelledTexts:
    """Texts and labels from a .jsonl/.json/.csv/.tsv/.parquet file of records."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file does not exist: {path}")
    records = _records_from_file(p)
    if not records or not isinstance(records[0], dict):
        raise DataError(f"{p}: needs records with a text and a label field")
    available = list(records[0].keys())
    for what, name in (("text", text_field), ("labels", label_field)):
        if name not in available:
            raise DataError(f"{p}: {what} column '{name}' not found; available: {', '.join(map(str, available))}")
    texts = ["" if r.get(text_field) is None else str(r[text_field]) for r in records]
    labels = [str(r[label_field]) for r in records]
    return LabelledTexts(texts=texts, labels=labels, source=str(p.resolve()))


def check_classes(labels, where: str) -> None:
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"{where}: a single class ({classes[0] if classes else 'none'}); a probe needs at least two")


def seeded_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) of a seeded random split."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 2:
        raise DataError(f"{n} examples are too few to split")
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def fit_probe(x_train: np.ndarray, y_train, x_test: np.ndarray, y_test, *, c: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Standardize, fit logistic regression, return (train accuracy, test accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    clf.fit(x_train, y_train)
    return float(clf.score(x_train, y_train)), float(clf.score(x_test, y_test))


@dataclass(frozen=True, kw_only=True)
class ProbeResult:
    layers: list[int]
    train_accuracy: list[float]
    test_accuracy: list[float]
    n_train: int
    n_test: int
    classes: list[str]
    majority_baseline: float
    config: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [{"layer": k, "train_accuracy": a, "test_accuracy": b}
                for k, a, b in zip(self.layers, self.train_accuracy, self.test_accuracy)]

    @property
    def best_layer(self) -> int:
        return self.layers[int(np.argmax(self.test_accuracy))]


def probe_layers(
    loaded, train: LabelledTexts, test: LabelledTexts | None = None, *, test_fraction: float = 0.3, seed: int = 123,
    pooling: str = DEFAULT_POOLING, layers=None, c: float = 1.0, cache_dir=None, **feature_kwargs,
) -> ProbeResult:
    """Fit one probe per hidden index. Without ``test`` a seeded split of ``train`` is used."""
    from mcr_exit.evaluation.features import cached_layer_features
    from mcr_exit.metrics.pooling import canonical_pooling

    pooling = canonical_pooling(pooling)
    check_classes(train.labels, train.source)
    texts = train.texts + (test.texts if test else [])
    feats = cached_layer_features(loaded, texts, cache_dir=cache_dir, pooling=pooling, layers=layers, **feature_kwargs)
    labels = np.array(train.labels + (test.labels if test else []))[feats.kept]
    is_test = (np.array(feats.kept) >= len(train.texts)) if test else None
    if test is None:
        tr, te = seeded_split(len(feats.kept), test_fraction, seed)
    else:
        tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    check_classes(labels[tr], f"{train.source} (training part)")
    train_acc, test_acc = [], []
    for j, _k in enumerate(feats.layers):
        x = feats.features[j]
        a, b = fit_probe(x[tr], labels[tr], x[te], labels[te], c=c, seed=seed)
        train_acc.append(a)
        test_acc.append(b)
    values, counts = np.unique(labels[te], return_counts=True)
    return ProbeResult(
        layers=feats.layers, train_accuracy=train_acc, test_accuracy=test_acc, n_train=len(tr), n_test=len(te),
        classes=sorted(set(labels.tolist())), majority_baseline=float(counts.max() / counts.sum()),
        config={"pooling": pooling, "seed": seed, "C": c, "split": "given" if test else f"seeded {test_fraction}"},
    )
