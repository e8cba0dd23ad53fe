"""Massive activations wherever they sit: the spike table on a tiny model with a spike planted at a
delimiter, and the pure functions under it."""

from __future__ import annotations

import torch

from mcr_exit.analysis.collect import collect_statistics
from mcr_exit.analysis.spikes import spike_summary, spike_tokens_table
from mcr_exit.cli.phase_text import spike_line
from mcr_exit.metrics.massive import is_delimiter, token_category, token_norm_ratios, top_tokens
from mcr_exit.models import from_objects
from mcr_exit.models.tokens import encode_prompts, resolve_bos
from tests.tiny import build_tiny_model

TEXTS = ["the dog runs. the cat sleeps", "a bee lives in a hive. it makes honey", "rivers flow. seas are deep",
         "tom has 3 apples. he buys 5 more"]


def _planted(tokenizer, token: str, scale: float = 300.0):
    """A tiny Llama whose embedding of ``token`` is huge: every occurrence carries a massive activation."""
    model = build_tiny_model("llama", len(tokenizer))
    tid = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        model.model.embed_tokens.weight[tid] = 0.0
        model.model.embed_tokens.weight[tid, 5] = scale
    return from_objects(model, tokenizer, name="tiny-llama-delimiter-spike"), tid


def test_spike_table_names_a_delimiter_spike_that_is_not_at_position_0(tokenizer):
    loaded, dot = _planted(tokenizer, ".")
    enc = encode_prompts(tokenizer, TEXTS, resolve_bos(tokenizer, "auto"), 64)
    assert all(dot in ids[1:] for ids in enc.ids)
    stats = collect_statistics(loaded, enc.ids, max_batch=3)
    L = loaded.n_layers
    assert stats.tokens["top_position"].shape == (len(TEXTS), L + 1, 3)
    table = spike_tokens_table(stats, enc.ids, tokenizer)
    top = table[table["rank"] == 1].set_index("index")
    for i in range(L + 1):
        assert top.loc[i, "token"] == "." and top.loc[i, "category"] == "delimiter"
        assert top.loc[i, "n_prompts"] == len(TEXTS) and top.loc[i, "median_ratio"] > 10
    # positions are each prompt's own "." (the first one, where it is the largest)
    firsts = {ids.index(dot) for ids in enc.ids}
    assert top.loc[0, "position"] in firsts
    assert (stats.hidden["max_at_delimiter"] == 1).all() and (stats.hidden["max_at_position0"] == 0).all()
    summary = spike_summary(stats, table)
    assert summary["found"] and not summary["at_position0"]
    assert summary["shares_at_peak"] == {"position0": 0.0, "delimiter": 1.0, "other": 0.0}
    line = spike_line(summary)
    assert "NOT at position 0" in line and "'.'" in line and "delimiter" in line


def test_the_analysis_reports_the_spike_and_writes_the_table(tokenizer, tmp_path):
    from mcr_exit.analysis.run import AnalyzeConfig, analyze
    from mcr_exit.cli.phase_text import phase_summary

    loaded, _ = _planted(tokenizer, ".")
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    res = analyze(AnalyzeConfig(data=str(data), max_length=64, output_dir=str(tmp_path / "o"), mlflow=False,
                                plots=False), loaded=loaded)
    doc = res.profile["massive_activations"]
    assert doc["rule"]["threshold"] == 10.0 and not doc["at_position0"]
    assert doc["top_tokens_at_peak"][0]["token"] == "."
    assert len(doc["per_layer"]) == loaded.n_layers + 1
    assert "NOT at position 0: on '.'" in phase_summary(res)
    csv = (tmp_path / "o" / "spike_tokens.csv").read_text().splitlines()
    assert csv[0].startswith("index,rank,token,distinct_texts,position,category")
    layers = (tmp_path / "o" / "layers.csv").read_text().splitlines()[0].split(",")
    assert {"max_norm_ratio", "max_at_position0", "max_at_delimiter"} <= set(layers)


def test_position_0_counts_as_one_token_whatever_its_text(tokenizer):
    model = build_tiny_model("gpt2", len(tokenizer))
    with torch.no_grad():
        model.transformer.wpe.weight[0] = 0.0
        model.transformer.wpe.weight[0, 3] = 400.0
    loaded = from_objects(model, tokenizer)
    enc = encode_prompts(tokenizer, TEXTS, resolve_bos(tokenizer, "none"), 64)
    stats = collect_statistics(loaded, enc.ids)
    table = spike_tokens_table(stats, enc.ids, tokenizer)
    first = table[(table["index"] == 0) & (table["rank"] == 1)].iloc[0]
    assert first["position"] == 0 and first["category"] == "position0" and first["n_prompts"] == len(TEXTS)
    assert first["distinct_texts"] == len({ids[0] for ids in enc.ids})
    summary = spike_summary(stats, table)
    assert summary["at_position0"] and "different first tokens" in spike_line(summary)


def test_ratios_use_the_lower_median_of_real_tokens_and_ignore_padding():
    h = torch.zeros(2, 4, 3)
    h[0, :, 0] = torch.tensor([1.0, 2.0, 100.0, 3.0])  # median (lower) of 1, 2, 3, 100 = 2
    h[1, :2, 0] = torch.tensor([50.0, 1.0])  # two real tokens: lower median 1, padding after
    h[1, 2:, 0] = 1e6  # padding, never counted
    r = token_norm_ratios(h, torch.tensor([4, 2]))
    assert torch.allclose(r[0], torch.tensor([0.5, 1.0, 50.0, 1.5]))
    assert torch.allclose(r[1], torch.tensor([50.0, 1.0, 0.0, 0.0]))
    pos, val = top_tokens(r, 3)
    assert pos[0].tolist() == [2, 3, 1] and pos[1, :2].tolist() == [0, 1] and val[1, 2] == 0
    one = token_norm_ratios(h[1:, :2], torch.tensor([2]))  # the same row unpadded: same ratios
    assert torch.allclose(one[0], r[1, :2])


def test_delimiters_and_categories():
    for text in (".", ",", "\n", " .", "Ġ.", "Ċ", ":", " ", "?!"):
        assert is_delimiter(text), text
    for text in ("the", " cat", "Ġthe", "3", "<|endoftext|>", ""):
        assert not is_delimiter(text), text
    assert token_category(0, ".") == "position0"
    assert token_category(4, ".") == "delimiter" and token_category(4, "dog") == "other"
