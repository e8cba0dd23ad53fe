import os
import subprocess
import sys

import pytest

from mcr_exit.errors import ConfigError
from mcr_exit.evaluation.lmeval_model import TASK_DIR, evaluate_layer, lens_lm_class, lmeval_sweep, task_manager


def test_bundled_tasks_from_any_directory(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tm = task_manager()
    for name in ("mcr_capitals", "mcr_opposites", "mcr_arithmetic"):
        assert name in tm.all_tasks
    scores = evaluate_layer(tiny_llama, 1, ["mcr_capitals"], tm=tm, limit=6)
    assert set(scores) == {"mcr_capitals/acc", "mcr_capitals/acc_norm"}


def test_lens_at_last_layer_equals_plain_hflm(tiny_llama):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    L = tiny_llama.adapter.n_layers
    lens = evaluate_layer(tiny_llama, L, ["mcr_capitals"], limit=8, bos="none")
    plain = HFLM(pretrained=tiny_llama.model, tokenizer=tiny_llama.tokenizer, backend="causal", device="cpu")
    out = lm_eval.simple_evaluate(model=plain, tasks=["mcr_capitals"], task_manager=task_manager(), limit=8,
                                  log_samples=False, bootstrap_iters=0)
    assert lens["mcr_capitals/acc"] == pytest.approx(out["results"]["mcr_capitals"]["acc,none"])


def test_sweep_with_user_file_and_errors(tiny_llama, mc_file):
    res = lmeval_sweep(tiny_llama, [], layers=[0, 3], task_files=[str(mc_file)], limit=4)
    assert res.layers == [0, 3] and res.tasks == ["mcr_user_doubles"]
    assert "mcr_user_doubles/acc" in res.rows()[1]
    with pytest.raises(ConfigError, match="out of range"):
        lens_lm_class()(loaded=tiny_llama, layer=9)
    with pytest.raises(ConfigError, match="does not know the task 'nope'"):
        lmeval_sweep(tiny_llama, ["nope"], layers=[0])


def test_lm_eval_own_cli(tiny_llama_dir, tmp_path):
    """lm-eval's own CLI runs the registered model on a bundled task, from another directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mcr_exit.evaluation.lmeval_cli", "run", "--model", "mcr-exit-lens",
           "--model_args", f"model={tiny_llama_dir},layer=1", "--tasks", "mcr_arithmetic",
           "--include_path", str(TASK_DIR), "--limit", "4", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mcr_arithmetic" in proc.stdout


def test_sweep_holds_back_lm_eval_output_per_layer(tiny_llama, capfd):
    res = lmeval_sweep(tiny_llama, ["mcr_capitals"], layers=[0, 1, 2], limit=2)
    assert len(res.scores) == 3
    err = capfd.readouterr().err
    for noise in ("Running loglikelihood requests", "Tokenizing inputs", "fatal: not a git repository",
                  "Passed an already-initialized model"):
        assert noise not in err


def test_held_back_output_is_shown_when_a_layer_fails(tiny_llama, capfd):
    from mcr_exit.evaluation.lmeval_model import quiet_stderr

    with pytest.raises(RuntimeError):
        with quiet_stderr():
            print("lm-eval says why", file=sys.stderr)
            os.system("echo from-a-subprocess >&2")
            raise RuntimeError("layer failed")
    err = capfd.readouterr().err
    assert "lm-eval says why" in err and "from-a-subprocess" in err
