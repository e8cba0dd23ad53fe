"""Each downstream command's config rejects a bad value in one line, before any input or model is read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mcr_exit.cli import main
from mcr_exit.errors import ConfigError
from mcr_exit.evaluation.configs import (
    ChooseLayerConfig,
    LensConfig,
    LmevalConfig,
    MtebConfig,
    ProbeConfig,
    parse_layers,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("make, message", [
    (lambda: LensConfig(window=1), "--window must be at least 2, got 1"),
    (lambda: LensConfig(max_windows=0), "--max-windows must be at least 1"),
    (lambda: LensConfig(chunk_tokens=0), "--chunk-tokens must be at least 1"),
    (lambda: LensConfig(batch_size=0), "--batch-size must be at least 1"),
    (lambda: LensConfig(layers="2:x"), "--layers must be"),
    (lambda: LensConfig(bos="always"), "--bos must be one of auto, force, none"),
    (lambda: ProbeConfig(train_file="t.tsv", c=0.0), "--C must be > 0"),
    (lambda: ProbeConfig(train_file="t.tsv", test_fraction=1.0), "--test-fraction must be in (0, 1)"),
    (lambda: ProbeConfig(train_file="t.tsv", max_examples=0), "--max-examples must be at least 1"),
    (lambda: ProbeConfig(train_file="t.tsv", pooling="max"), "--pooling must be one of"),
    (lambda: ProbeConfig(train_file="t.tsv", max_length=1), "--max-length must be at least 2"),
    (lambda: MtebConfig(), "no MTEB task"),
    (lambda: MtebConfig(custom=("sts",)), "--custom-task must be KIND:PATH"),
    (lambda: MtebConfig(custom=("images:x.jsonl",)), "--custom-task must be KIND:PATH"),
    (lambda: LmevalConfig(limit=0), "--limit must be at least 1"),
    (lambda: LmevalConfig(layers="0:4:0"), "--layers must be"),
    (lambda: ChooseLayerConfig(profile_path="p.json", figure="fig8.txt"), "--figure must end in one of"),
    (lambda: ChooseLayerConfig(profile_path=" "), "--profile must name"),
])
def test_config_rejects_a_bad_value_in_one_line(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_configs_are_frozen_and_keyword_only_and_normalize():
    cfg = MtebConfig(custom=["sts:a.jsonl"], pooling="mean_no_bos", layers="0:6:3")
    assert cfg.custom == ("sts:a.jsonl",) and cfg.custom_specs == [("sts", "a.jsonl")]
    assert cfg.pooling == "mean_no_first" and cfg.hidden_indices == [0, 3, 6]
    with pytest.raises(Exception):
        cfg.batch_size = 4  # frozen
    with pytest.raises(TypeError):
        LensConfig("model")  # keyword-only
    assert parse_layers("all") is None and parse_layers("1,3") == [1, 3]
    assert ChooseLayerConfig(profile_path="runs/a/phase_profile.json").figure_path == Path(
        "runs/a/figure8_downstream.png")


@pytest.mark.parametrize("args, message", [
    (["lens", "--window", "1"], "--window must be at least 2"),
    (["lens", "--max-windows", "0"], "--max-windows must be at least 1"),
    (["lens", "--chunk-tokens", "0"], "--chunk-tokens must be at least 1"),
    (["lens", "--layers", "0:x"], "--layers must be"),
    (["probe", "--train", "{missing}", "--C", "0"], "--C must be > 0"),
    (["probe", "--train", "{missing}", "--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
    (["probe", "--train", "{missing}", "--max-examples", "0"], "--max-examples must be at least 1"),
    (["mteb"], "no MTEB task"),
    (["mteb", "--custom-task", "images:{missing}"], "--custom-task must be KIND:PATH"),
    (["lmeval", "--limit", "0"], "--limit must be at least 1"),
    (["lmeval", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["choose-layer", "--profile", "{missing}", "--figure", "fig8.txt"], "--figure must end in one of"),
])
def test_cli_rejects_a_bad_value_before_reading_inputs_or_loading(args, message, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    for module in ("lens", "probe", "mteb_eval", "lmeval"):
        monkeypatch.setattr(f"mcr_exit.cli.{module}.load_for_eval", no_model)
    missing = str(tmp_path / "missing.tsv")  # a file that does not exist: the option error must come first
    args = [a.replace("{missing}", missing) for a in args]
    if args[0] != "choose-layer":
        args += ["--no-mlflow", "--output-dir", str(tmp_path / "out")]
    r = CliRunner().invoke(main, args)
    assert isinstance(r.exception, SystemExit) and r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], r.output
    assert not (tmp_path / "out").exists()


def test_cli_process_prints_one_line_and_exits_1(tmp_path):
    """The installed entry point: no traceback, one line on stderr, nothing on stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mcr_exit", "lens", "--window", "1", "--model",
                           str(tmp_path / "no-model"), "--no-mlflow"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["Error: --window must be at least 2, got 1"]
    assert proc.stdout == "" and not (tmp_path / "mcr-exit-runs").exists()
