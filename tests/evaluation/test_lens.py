import math

import pytest
import torch

from mcr_exit.errors import ConfigError, DataError
from mcr_exit.evaluation.lens import corpus_token_ids, logit_lens, make_windows
from mcr_exit.models.tokens import collate, pad_id_of, resolve_bos

TEXT = ["The quick brown fox jumps over the lazy dog. A bee lives in a hive with thousands of others."] * 6


def test_last_layer_equals_the_model_loss(tiny_loaded):
    """The lens at hidden L is the model itself: same final norm, same unembedding (tied or not)."""
    res = logit_lens(tiny_loaded, TEXT, window=24, max_windows=3, batch_size=2)
    L = tiny_loaded.adapter.n_layers
    assert res.layers == list(range(L + 1)) and len(res.perplexity) == L + 1
    bos = resolve_bos(tiny_loaded.tokenizer)
    wins = make_windows(corpus_token_ids(tiny_loaded.tokenizer, TEXT), 24, 3, bos.token_id)
    ids, mask = collate(wins, pad_id_of(tiny_loaded.tokenizer))
    with torch.no_grad():
        loss = tiny_loaded.model(input_ids=ids, attention_mask=mask, labels=ids).loss.item()
    assert res.cross_entropy[-1] == pytest.approx(loss, rel=1e-4)
    assert res.perplexity[-1] == pytest.approx(math.exp(loss), rel=1e-3)
    V = tiny_loaded.model.config.vocab_size
    assert all(0 <= e <= math.log(V) + 1e-6 for e in res.entropy)


def test_chunking_does_not_change_results(tiny_llama):
    a = logit_lens(tiny_llama, TEXT, window=24, max_windows=3, chunk_tokens=7)
    b = logit_lens(tiny_llama, TEXT, window=24, max_windows=3, chunk_tokens=4096)
    assert a.cross_entropy == pytest.approx(b.cross_entropy, rel=1e-5)
    assert a.entropy == pytest.approx(b.entropy, rel=1e-5)


def test_bad_inputs(tiny_llama):
    with pytest.raises(DataError, match="too short for one window"):
        logit_lens(tiny_llama, ["tiny"], window=256)
    with pytest.raises(ConfigError, match="out of range"):
        logit_lens(tiny_llama, TEXT, window=24, layers=[0, 42])
