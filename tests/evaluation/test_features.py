import numpy as np
import pytest
import torch

from mcr_exit.errors import ConfigError
from mcr_exit.evaluation.features import cached_layer_features, layer_features, pool_hidden
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate, encode_prompts, pad_id_of, resolve_bos


def test_pooling_invariants():
    h = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert pool_hidden(h, mask, "mean_no_first")[:, 0].tolist() == [1.5, 4.0]  # row 2: one token -> position 0
    assert pool_hidden(h, mask, "mean_no_bos")[:, 0].tolist() == [1.5, 4.0]  # the older name, still accepted
    assert pool_hidden(h, mask, "mean")[:, 0].tolist() == [1.0, 4.0]
    assert pool_hidden(h, mask, "last")[:, 0].tolist() == [2.0, 4.0]
    with pytest.raises(ConfigError):
        pool_hidden(h, mask, "max")


def test_all_layers_in_one_pass_match_hidden_at(tiny_loaded):
    texts = ["The quick brown fox", "A bee lives in a hive with thousands of others.", "def add(a, b):"]
    feats = layer_features(tiny_loaded, texts, pooling="mean_no_first", max_batch=2)
    L = tiny_loaded.adapter.n_layers
    assert feats.features.shape[:2] == (L + 1, 3) and feats.layers == list(range(L + 1))
    enc = encode_prompts(tiny_loaded.tokenizer, texts, resolve_bos(tiny_loaded.tokenizer), 64)
    for i, ids in enumerate(enc.ids):
        x, m = collate([ids], pad_id_of(tiny_loaded.tokenizer))
        for k in (0, 1, L):
            ref = pool_hidden(hidden_at(tiny_loaded.adapter, x, m, k), m, "mean_no_first")[0].numpy()
            np.testing.assert_allclose(feats.at(k)[i], ref, rtol=1e-4, atol=1e-5)


def test_layer_out_of_range(tiny_llama):
    with pytest.raises(ConfigError, match="out of range"):
        layer_features(tiny_llama, ["hello"], layers=[99])


def test_features_are_cached(tiny_llama, tmp_path, monkeypatch):
    a = cached_layer_features(tiny_llama, ["one text", "two texts"], cache_dir=tmp_path, pooling="last")
    import mcr_exit.evaluation.features as features

    monkeypatch.setattr(features, "layer_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    b = cached_layer_features(tiny_llama, ["one text", "two texts"], cache_dir=tmp_path, pooling="last")
    np.testing.assert_array_equal(a.features, b.features)
    assert len(list(tmp_path.glob("features-*.npz"))) == 1


def test_legacy_pooling_name_is_recorded_under_the_new_one(tiny_llama):
    feats = layer_features(tiny_llama, ["one text"], pooling="mean_no_bos", layers=[1])
    assert feats.pooling == "mean_no_first"
