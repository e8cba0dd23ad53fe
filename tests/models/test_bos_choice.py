"""--bos auto decided by the model: both choices measured when the tokenizer declares a BOS it does not add.

Tiny GPT-2 models with a spike planted through the embeddings: hidden[0] = wte[token] + wpe[position],
and the residual stream carries a large vector through the few blocks.
"""

from __future__ import annotations

import torch

from mcr_exit.models import from_objects
from mcr_exit.models.bos_choice import choose_from_evidence, decide_bos
from mcr_exit.models.tokens import encode_prompts, resolve_bos
from tests.tiny import build_tiny_model


def _gpt2(tokenizer, *, bos_row=None, position0_row=None):
    model = build_tiny_model("gpt2", len(tokenizer))
    with torch.no_grad():
        if bos_row is not None:
            model.transformer.wte.weight[tokenizer.bos_token_id] = bos_row
        if position0_row is not None:
            model.transformer.wpe.weight[0] = position0_row
    return from_objects(model, tokenizer, name="tiny-gpt2-planted")


def _spike(scale=500.0):
    v = torch.zeros(64)
    v[7] = scale
    return v


def test_a_bos_that_carries_the_spike_is_prepended(tokenizer):
    loaded = _gpt2(tokenizer, bos_row=_spike())
    d = decide_bos(loaded, "auto")
    assert d.prepend and d.token == "<bos>"
    assert d.evidence["peak_ratio_with_bos"] > 10 > d.evidence["peak_ratio_without_bos"]
    ids = encode_prompts(tokenizer, ["the dog runs"], d, 64).ids[0]
    assert ids[0] == tokenizer.bos_token_id


def test_a_model_whose_first_text_token_carries_the_spike_gets_no_bos(tokenizer):
    # position 0 is pushed far out, unless the token there is the BOS, whose embedding cancels the push:
    # the model "was trained without" its declared BOS.
    v = _spike()
    loaded = _gpt2(tokenizer, bos_row=-v, position0_row=v)
    d = decide_bos(loaded, "auto")
    assert not d.prepend and d.token is None and d.token_id is None
    assert d.evidence["peak_ratio_without_bos"] > 10 > d.evidence["peak_ratio_with_bos"]
    assert "not prepended" in d.reason and "<bos>" in d.reason
    ids = encode_prompts(tokenizer, ["the dog runs"], d, 64).ids[0]
    assert ids[0] != tokenizer.bos_token_id
    assert decide_bos(loaded, "auto") is d  # measured once per model


def test_a_spike_at_position_0_either_way_keeps_the_declared_bos(tokenizer):
    loaded = _gpt2(tokenizer, position0_row=_spike())
    d = decide_bos(loaded, "auto")
    assert d.prepend and min(d.evidence["peak_ratio_with_bos"], d.evidence["peak_ratio_without_bos"]) > 10


def test_no_spike_either_way_keeps_the_declared_bos_and_other_policies_measure_nothing(tokenizer):
    loaded = _gpt2(tokenizer)
    d = decide_bos(loaded, "auto")
    assert d.prepend and max(d.evidence["peak_ratio_with_bos"], d.evidence["peak_ratio_without_bos"]) < 10
    assert decide_bos(loaded, "none").evidence is None
    assert decide_bos(loaded, "force").evidence is None and decide_bos(loaded, "force").prepend


def test_the_rule_on_measured_numbers(tokenizer):
    declared = resolve_bos(tokenizer, "auto")
    ev = {"peak_ratio_with_bos": 1.4, "peak_ratio_without_bos": 80.0}
    assert not choose_from_evidence(declared, ev).prepend  # Qwen2.5-Coder-0.5B-like
    assert choose_from_evidence(declared, {**ev, "peak_ratio_with_bos": 180.0}).prepend  # SmolLM2-like
    assert choose_from_evidence(declared, {**ev, "peak_ratio_without_bos": 9.0}).prepend  # nothing either way


def test_the_profile_records_the_choice_and_both_ratios(tokenizer, tmp_path):
    from mcr_exit.analysis.run import AnalyzeConfig, analyze

    v = _spike()
    loaded = _gpt2(tokenizer, bos_row=-v, position0_row=v)
    res = analyze(AnalyzeConfig(max_prompts=4, max_length=48, output_dir=str(tmp_path / "o"), mlflow=False,
                                plots=False), loaded=loaded)
    bos = res.profile["bos"]
    assert bos["prepend"] is False and bos["token"] is None
    assert bos["evidence"]["peak_ratio_without_bos"] > 10 > bos["evidence"]["peak_ratio_with_bos"]
    assert "rule" in bos["evidence"]
    # the analysis looks where the massive activation is: on position 0, the first text token
    assert max(row["norm_ratio"] for row in res.profile["layers"]) > 10
    assert res.profile["massive_activations"]["at_position0"]


def test_the_evidence_of_a_folder_model_is_read_back_from_the_cache(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    from mcr_exit.models import bos_choice, load_model

    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    first = decide_bos(load_model(str(folder), device="cpu"), "auto")
    assert first.evidence is not None and len(list((tmp_path / "cache" / "bos-evidence").glob("*.json"))) == 1

    def measured(*_):
        raise AssertionError("measured again")

    monkeypatch.setattr(bos_choice, "measure_bos_choice", measured)
    again = decide_bos(load_model(str(folder), device="cpu"), "auto")  # a new model object, same files
    assert again.evidence == first.evidence and again.prepend == first.prepend

    config = folder / "config.json"
    config.write_text(config.read_text() + "\n")  # the files changed: measured anew
    monkeypatch.undo()
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "cache"))
    decide_bos(load_model(str(folder), device="cpu"), "auto")
    assert len(list((tmp_path / "cache" / "bos-evidence").glob("*.json"))) == 2
