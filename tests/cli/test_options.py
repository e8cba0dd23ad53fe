"""Shared options mean the same thing in every command: defaults, the model from the environment."""

from __future__ import annotations

import inspect

from click.testing import CliRunner

from mcr_exit.cli import main
from mcr_exit.vocabulary import ANALYSIS_MAX_LENGTH, DEFAULT_POOLING, EMBEDDING_MAX_LENGTH


def _option(command: str, name: str):
    return next(p for p in main.commands[command].params if p.name == name)


def test_max_length_defaults_are_the_two_documented_ones():
    from mcr_exit.evaluation.features import layer_features
    from mcr_exit.evaluation.mteb_encoder import LayerFeatureStore, layer_encoder

    for command in ("analyze", "ablate", "sweep"):
        assert _option(command, "max_length").default == ANALYSIS_MAX_LENGTH
    for command in ("probe", "mteb"):
        opt = _option(command, "max_length")
        assert opt.default == EMBEDDING_MAX_LENGTH and "analyze uses 1024" in opt.help
    for fn in (layer_features, layer_encoder, LayerFeatureStore.__init__):
        params = inspect.signature(fn).parameters
        assert params["max_length"].default == EMBEDDING_MAX_LENGTH
        assert params["pooling"].default == DEFAULT_POOLING


def test_bos_option_is_the_same_everywhere():
    helps = {c: _option(c, "bos").help for c in ("analyze", "ablate", "sweep", "lens", "lmeval", "probe", "mteb")}
    assert len(set(helps.values())) == 1 and "first text token" in next(iter(helps.values()))


def test_model_comes_from_the_environment(tmp_path, tiny_llama_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    r = CliRunner().invoke(main, ["lens", "--data", str(corpus), "--window", "16", "--max-windows", "2",
                                  "--layers", "0,3", "--no-mlflow", "--output-dir", str(tmp_path / "o")],
                           env={"MCR_EXIT_MODEL": str(tiny_llama_dir)})
    assert r.exit_code == 0, r.output
    assert "hidden   3 (100%)" in r.output  # the 3-block tiny model, not the built-in 30-block one
    assert "lens: 100%" in r.stderr and "2/2" in r.stderr  # a progress bar over the windows
