import pytest

from mcr_exit.errors import DataError
from mcr_exit.evaluation.probes import LabelledTexts, probe_layers, read_labelled


def test_probe_every_layer_seeded_and_given_split(tiny_llama, sentiment_tsv):
    data = read_labelled(sentiment_tsv)
    res = probe_layers(tiny_llama, data, seed=1)
    L = tiny_llama.adapter.n_layers
    assert res.layers == list(range(L + 1)) and len(res.test_accuracy) == L + 1
    assert res.n_train + res.n_test == len(data.texts) and res.classes == ["0", "1"]
    assert all(0.0 <= a <= 1.0 for a in res.test_accuracy)
    assert res == probe_layers(tiny_llama, data, seed=1)  # seeded: reproducible
    train = LabelledTexts(texts=data.texts[::2], labels=data.labels[::2], source="train")
    test = LabelledTexts(texts=data.texts[1::2], labels=data.labels[1::2], source="test")
    given = probe_layers(tiny_llama, train, test, pooling="last", layers=[0, L])
    assert given.layers == [0, L] and given.n_test == len(test.texts) and given.config["split"] == "given"


def test_bad_labels(tiny_llama, sentiment_tsv, tmp_path):
    with pytest.raises(DataError, match="labels column 'polarity' not found"):
        read_labelled(sentiment_tsv, label_field="polarity")
    one = LabelledTexts(texts=["a", "b", "c"], labels=["1", "1", "1"], source="x.tsv")
    with pytest.raises(DataError, match="single class"):
        probe_layers(tiny_llama, one)
