"""End to end on the second real model, Qwen2.5-Coder-0.5B-Instruct (six PyPI chunk packages, assembled
into the model cache by its short name). Skipped where the chunks are not installed
(`bash scripts/bootstrap.sh models`)."""

from __future__ import annotations

import pytest

from mcr_exit.models import registry

QWEN = registry.MODELS["qwen2.5-coder-0.5b"]
AVAILABLE = registry.is_installed(QWEN) or (registry.model_cache_dir() / QWEN.cache_file_name).exists()
pytestmark = [
    pytest.mark.real_model_qwen,
    pytest.mark.skipif(not AVAILABLE, reason=f"Qwen2.5-Coder-0.5B-Instruct is not installed: {QWEN.pip_command}"),
]


@pytest.fixture(scope="module")
def qwen():
    from mcr_exit.models import load_model

    return load_model("qwen2.5-coder-0.5b")


def test_short_name_loads_the_assembled_and_checked_file(qwen):
    assert qwen.spec.name == "Qwen2.5-Coder-0.5B-Instruct" and qwen.spec.source == "gguf"
    assert qwen.n_layers == 24 and qwen.adapter.family == "llama"
    path = registry.model_cache_dir() / QWEN.cache_file_name
    assert path.stat().st_size == QWEN.size and registry._verified(path, QWEN)


def test_bos_auto_keeps_the_first_text_token_at_position_0(qwen):
    from mcr_exit.models.bos_choice import decide_bos

    d = decide_bos(qwen, "auto")
    assert qwen.tokenizer.bos_token == "<|endoftext|>"  # declared, not added
    assert not d.prepend and d.token is None
    assert d.evidence["peak_ratio_without_bos"] > 30 and d.evidence["peak_ratio_with_bos"] < 5


def test_default_analysis_finds_the_phases_with_the_spike_on_position_0(qwen, tmp_path):
    from mcr_exit.analysis.run import AnalyzeConfig, analyze

    res = analyze(AnalyzeConfig(max_prompts=8, max_length=128, output_dir=str(tmp_path / "out"), mlflow=False,
                                plots=False), loaded=qwen)
    p = res.phases
    assert p.found and p.peak_norm_ratio > 30
    assert 2 <= p.compress_start <= 6 and p.refine_start > p.compress_start + 8
    spikes = res.profile["massive_activations"]
    assert spikes["at_position0"] and spikes["shares_at_peak"]["position0"] == 1.0
    assert res.profile["bos"]["evidence"]["peak_ratio_with_bos"] < 5
