import numpy as np
import pytest

from mcr_exit.errors import ConfigError, DataError
from mcr_exit.evaluation.features import pool_hidden
from mcr_exit.evaluation.mteb_encoder import LayerFeatureStore, layer_encoder, mteb_sweep
from mcr_exit.evaluation.mteb_tasks import custom_task, named_tasks, parse_custom_spec
from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate, encode_prompts, pad_id_of, resolve_bos


def test_custom_tasks_sweep_one_forward_per_text(tiny_llama, mteb_files):
    tasks = [custom_task(kind, path) for kind, path in mteb_files.items()]
    res = mteb_sweep(tiny_llama, tasks, layers=[0, 1, 3])
    assert res.layers == [0, 1, 3] and len(res.tasks) == 4
    for t in res.tasks:
        assert len(res.main_score[t]) == 3 and all(np.isfinite(res.main_score[t]))
    assert res.best_layer in res.layers
    # every distinct text went through the model once, for all three layers together
    import json

    distinct = set()
    for path in mteb_files.values():
        for line in open(path):
            r = json.loads(line)
            distinct |= {str(r[k]) for k in ("text", "sentence1", "sentence2", "query", "document") if k in r}
    assert res.config["forward_texts"] == len(distinct)


def test_encoder_is_pooled_hidden_state(tiny_llama):
    texts = ["a wonderful warm story", "def f(x): return x"]
    store = LayerFeatureStore(tiny_llama, layers=[2])
    enc = layer_encoder(tiny_llama, 2, normalize=False, store=store)
    got = enc.encode([{"text": texts}], task_metadata=None, hf_split="test", hf_subset="default")
    ids = encode_prompts(tiny_llama.tokenizer, texts, resolve_bos(tiny_llama.tokenizer), 64).ids
    for i, x in enumerate(ids):
        x, m = collate([x], pad_id_of(tiny_llama.tokenizer))
        ref = pool_hidden(hidden_at(tiny_llama.adapter, x, m, 2), m, "mean_no_first")[0].numpy()
        np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-5)
    assert enc.mteb_model_meta.revision == "layer-2-mean_no_first-raw"


def test_bad_tasks(tmp_path, mteb_files):
    with pytest.raises(ConfigError, match="mteb does not know the task 'NoSuchTaskXyz'"):
        named_tasks(["NoSuchTaskXyz"])
    with pytest.raises(ConfigError, match="KIND:PATH"):
        parse_custom_spec("regression:foo.jsonl")
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
    with pytest.raises(DataError, match="single class"):
        custom_task("classification", one)
    with pytest.raises(DataError, match="sts column 'sentence1' not found"):
        custom_task("sts", mteb_files["classification"])
