"""An mteb encoder giving the model's embedding at hidden index k, and a layer sweep over mteb tasks.

All layers share one ``LayerFeatureStore``: the first time a text is seen, one forward pass computes
its pooled features at every requested hidden index; later layers read the store. Each layer gets
its own mteb revision (``layer-K-POOLING``) and the result cache is off, so no score is ever reused
across layers, models or poolings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mcr_exit.evaluation.features import check_layers, layer_features
from mcr_exit.evaluation.mteb_tasks import _mteb, load_task_data
from mcr_exit.metrics.pooling import canonical_pooling
from mcr_exit.vocabulary import DEFAULT_POOLING, EMBEDDING_MAX_LENGTH


class LayerFeatureStore:
    """text -> (n_layers, d) pooled features, filled lazily in batches."""

    def __init__(self, loaded, *, layers=None, pooling: str = DEFAULT_POOLING, bos: str = "auto",
                 max_length: int = EMBEDDING_MAX_LENGTH, batch_size: int = 32):
        self.loaded, self.pooling, self.bos, self.max_length = loaded, canonical_pooling(pooling), bos, max_length
        self.batch_size = batch_size
        self.layers = check_layers(layers, loaded.adapter.n_layers)
        self._rows: dict[str, np.ndarray] = {}
        self.forward_texts = 0  # how many texts went through the model (for tests and logs)

    def get(self, texts: list[str], layer: int) -> np.ndarray:
        """(len(texts), d) features at hidden index ``layer``."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            feats = layer_features(self.loaded, [t if t.strip() else " " for t in missing], pooling=self.pooling,
                                   layers=self.layers, bos=self.bos, max_length=self.max_length,
                                   max_batch=self.batch_size)
            d = feats.features.shape[-1]
            for j, t in enumerate(missing):
                self._rows[t] = np.zeros((len(self.layers), d), np.float32)
            for n, i in enumerate(feats.kept):
                self._rows[missing[i]] = feats.features[:, n]
            self.forward_texts += len(missing)
        j = self.layers.index(layer)
        return np.stack([self._rows[t][j] for t in texts])


def _encoder_class():
    _mteb()
    from mteb.models.abs_encoder import AbsEncoder

    class LayerEncoder(AbsEncoder):
        """Embeddings = pool(hidden[layer]) [L2-normalized]; similarity = cosine."""

        def __init__(self, store: LayerFeatureStore, layer: int, *, normalize: bool = True, name: str = "model"):
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            self.store, self.layer, self.normalize = store, layer, normalize
            d = store.loaded.adapter.embed.weight.shape[1]
            safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": f"mcr-exit/{safe}", "revision": f"layer-{layer}-{store.pooling}-{'l2' if normalize else 'raw'}",
                "embed_dim": d, "similarity_fn_name": ScoringFunction.COSINE, "framework": ["PyTorch"],
                "max_tokens": store.max_length, "languages": None, "open_weights": True,
            })

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            x = self.store.get(texts, self.layer)
            if self.normalize:
                x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
            return x

    return LayerEncoder


def layer_encoder(loaded, layer: int, *, pooling: str = DEFAULT_POOLING, normalize: bool = True, bos: str = "auto",
                  max_length: int = EMBEDDING_MAX_LENGTH, store: LayerFeatureStore | None = None):
    """An mteb encoder for hidden index ``layer`` (pass a shared store to sweep layers cheaply)."""
    store = store or LayerFeatureStore(loaded, layers=[layer], pooling=pooling, bos=bos, max_length=max_length)
    return _encoder_class()(store, layer, normalize=normalize, name=loaded.spec.name)


@dataclass(frozen=True, kw_only=True)
class MtebSweep:
    layers: list[int]
    tasks: list[str]
    main_score: dict[str, list[float]]  # task -> score per layer
    mean_score: list[float]
    config: dict = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        return self.layers[int(np.nanargmax(self.mean_score))]

    def rows(self) -> list[dict]:
        return [{"layer": k, "mean_main_score": m, **{t: self.main_score[t][j] for t in self.tasks}}
                for j, (k, m) in enumerate(zip(self.layers, self.mean_score))]


def _main_score(task_result) -> float:
    vals = [s["main_score"] for split in task_result.scores.values() for s in split]
    return float(np.mean(vals))


def mteb_sweep(loaded, tasks: list, *, layers=None, pooling: str = DEFAULT_POOLING, normalize: bool = True,
               bos: str = "auto", max_length: int = EMBEDDING_MAX_LENGTH, batch_size: int = 32,
               progress_factory=None) -> MtebSweep:
    """Run every task at every hidden index; features for all layers come from one forward per batch.

    progress_factory(total) -> update(n), if given, is told each time one task is scored at one layer.
    """
    mteb = _mteb()
    import datasets

    datasets.disable_progress_bars()  # one bar per layer and task otherwise
    load_task_data(tasks)  # once for every layer; fails in one line before any forward pass
    store = LayerFeatureStore(loaded, layers=layers, pooling=pooling, bos=bos, max_length=max_length,
                              batch_size=batch_size)
    names = [t.metadata.name for t in tasks]
    scores: dict[str, list[float]] = {n: [] for n in names}
    advance = progress_factory(len(store.layers) * len(tasks)) if progress_factory else None
    for k in store.layers:
        enc = layer_encoder(loaded, k, normalize=normalize, store=store)
        for task in tasks:
            result = mteb.evaluate(enc, [task], cache=None, overwrite_strategy="always", show_progress_bar=False)
            scores[task.metadata.name].append(_main_score(result.task_results[0]))
            if advance:
                advance(1)
    mean = [float(np.mean([scores[n][j] for n in names])) for j in range(len(store.layers))]
    return MtebSweep(layers=store.layers, tasks=names, main_score=scores, mean_score=mean,
                     config={"pooling": store.pooling, "normalize": normalize, "forward_texts": store.forward_texts,
                             "max_length": max_length, "batch_size": batch_size})
