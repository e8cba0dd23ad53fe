"""The built-in SmolLM2 end to end (reuses the session's real_model fixture)."""

import pytest

from mcr_exit.data.corpus import BUILTIN_PROMPTS
from mcr_exit.evaluation.lens import logit_lens
from mcr_exit.evaluation.probes import LabelledTexts, probe_layers

pytestmark = pytest.mark.real_model

POS = ["I loved this film", "a wonderful warm story", "great acting and a fine plot", "truly delightful",
       "the best movie this year", "charming and funny", "a beautiful happy ending", "superb work"]
NEG = ["I hated this film", "a dull cold story", "bad acting and a weak plot", "truly awful",
       "the worst movie this year", "boring and sad", "an ugly miserable ending", "terrible work"]


def test_logit_lens_perplexity_falls_tenfold(real_model):
    L = real_model.adapter.n_layers
    early_layers = [1, 2, 3]  # the first 10 % of depth; the full curve is in analysis/downstream
    res = logit_lens(real_model, list(BUILTIN_PROMPTS), window=128, max_windows=4, batch_size=4,
                     layers=[*early_layers, L])
    assert res.layers == [*early_layers, L]
    early = min(res.perplexity[:-1])
    assert early >= 10 * res.perplexity[-1], (early, res.perplexity[-1])


def test_probe_accuracy_for_every_layer(real_model):
    texts = [f"{t}, said reviewer {i}." for i in range(3) for t in POS + NEG]
    labels = [lab for _ in range(3) for lab in ["pos"] * 8 + ["neg"] * 8]
    res = probe_layers(real_model, LabelledTexts(texts=texts, labels=labels, source="templated"), seed=0,
                       max_length=32)
    assert res.layers == list(range(real_model.adapter.n_layers + 1))
    assert all(0.0 <= a <= 1.0 for a in res.test_accuracy)
    assert max(res.test_accuracy) >= 0.8
