"""Pooled frozen features at every hidden index, one forward pass per batch (through run_blocks).

Pooling (over the real tokens of each row; right padding, position 0 = first real token), the
vocabulary of ``mcr_exit.vocabulary.POOLINGS``:
  mean_no_first  mean over positions 1..n-1 (position 0 carries the massive activation); a one-token
                 row falls back to position 0;
  mean           mean over all real tokens, position 0 included;
  last           the last real token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcr_exit.errors import ConfigError
from mcr_exit.metrics.pooling import POOLINGS, canonical_pooling, pool_hidden  # noqa: F401  (re-exported)
from mcr_exit.models.forward import run_blocks
from mcr_exit.models.bos_choice import decide_bos
from mcr_exit.models.tokens import collate, encode_prompts, length_batches, pad_id_of
from mcr_exit.vocabulary import DEFAULT_POOLING, EMBEDDING_MAX_LENGTH


def check_layers(layers, n_layers: int) -> list[int]:
    """Validate hidden indices (None = all 0..L)."""
    if layers is None:
        return list(range(n_layers + 1))
    out = sorted(set(int(k) for k in layers))
    bad = [k for k in out if not 0 <= k <= n_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]} is out of range: this model has hidden states 0..{n_layers}")
    return out


@dataclass(frozen=True, kw_only=True)
class LayerFeatures:
    """features[j] is (N, d) for hidden index layers[j]; kept = indices of the texts that were encoded."""

    features: np.ndarray  # (n_layers_kept, N, d) float32
    layers: list[int]
    kept: list[int]
    pooling: str

    def at(self, layer: int) -> np.ndarray:
        return self.features[self.layers.index(layer)]


def layer_features(
    loaded, texts: list[str], *, pooling: str = DEFAULT_POOLING, layers=None, bos: str = "auto",
    max_length: int = EMBEDDING_MAX_LENGTH, max_tokens: int = 8192, max_batch: int = 32,
) -> LayerFeatures:
    """Pooled features of every text at every requested hidden index (one forward per batch)."""
    pooling = canonical_pooling(pooling)
    adapter = loaded.adapter
    wanted = check_layers(layers, adapter.n_layers)
    enc = encode_prompts(loaded.tokenizer, texts, decide_bos(loaded, bos), max_length)
    pad, device = pad_id_of(loaded.tokenizer), adapter.embed.weight.device
    out = None
    index = {k: j for j, k in enumerate(wanted)}
    stop = max(wanted)
    for batch in length_batches([len(x) for x in enc.ids], max_tokens, max_batch):
        ids, mask = collate([enc.ids[i] for i in batch], pad, device)
        rows = torch.tensor(batch)

        def keep(i: int, h: torch.Tensor) -> None:
            nonlocal out
            if i not in index:
                return
            pooled = pool_hidden(h, mask, pooling).cpu()
            if out is None:
                out = torch.zeros(len(wanted), len(enc.ids), pooled.shape[-1])
            out[index[i], rows] = pooled

        run_blocks(adapter, ids, mask, keep, stop_at=stop)
    return LayerFeatures(features=out.numpy(), layers=wanted, kept=enc.kept, pooling=pooling)


def feature_key(model_name: str, texts: list[str], **settings) -> str:
    """A digest naming exactly which model, texts and settings produced a feature array."""
    h = hashlib.sha256(model_name.encode())
    for k in sorted(settings):
        h.update(f"{k}={settings[k]}".encode())
    for t in texts:
        h.update(t.encode("utf-8") + b"\x00")
    return h.hexdigest()[:24]


def cached_layer_features(loaded, texts: list[str], *, cache_dir: str | Path | None, **kwargs) -> LayerFeatures:
    """layer_features, stored as .npz under cache_dir and reused when the same key comes again."""
    if cache_dir is None:
        return layer_features(loaded, texts, **kwargs)
    key = feature_key(f"{loaded.spec.name}@{loaded.spec.location}@{loaded.spec.revision}", texts, **kwargs)
    path = Path(cache_dir) / f"features-{key}.npz"
    if path.exists():
        z = np.load(path)
        return LayerFeatures(features=z["features"], layers=z["layers"].tolist(), kept=z["kept"].tolist(),
                             pooling=str(z["pooling"]))
    feats = layer_features(loaded, texts, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=feats.features, layers=np.array(feats.layers), kept=np.array(feats.kept),
             pooling=np.array(feats.pooling))
    return feats
