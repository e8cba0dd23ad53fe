"""The figures drawn in worker processes are the figures drawn in-process, byte for byte; a worker that
dies leaves its figures to this process; a closed worker leaves no process behind."""

from __future__ import annotations

import pytest

from mcr_exit.analysis.figure_worker import FigureWorker, analysis_figures, render
from mcr_exit.analysis.run import AnalyzeConfig, analyze


@pytest.fixture(scope="module")
def result(tiny_models, tokenizer, tmp_path_factory):
    from mcr_exit.models import from_objects

    loaded = from_objects(tiny_models["llama"], tokenizer, name="tiny-llama")
    out = tmp_path_factory.mktemp("analysis") / "out"
    return analyze(AnalyzeConfig(output_dir=str(out), mlflow=False, max_prompts=6), loaded=loaded)


def test_the_analysis_writes_the_figures_a_process_of_its_own_drew(result):
    jobs = analysis_figures(result)
    assert {name for name, _, _ in jobs} == {"figure1_triptych.png", "bounds.png", "attention_maps.png"}
    for name, figure, args in jobs:
        written = (result.output_dir / name).read_bytes()
        assert written[:8] == b"\x89PNG\r\n\x1a\n"
        assert written == render(figure, args), name


@pytest.mark.parametrize("processes", [1, 2])
def test_workers_draw_what_this_process_draws(result, processes):
    jobs = analysis_figures(result)
    worker = FigureWorker(processes=processes)
    assert len(worker.children) == processes
    worker.submit(jobs[:2])
    worker.submit(jobs[2:])
    pngs = worker.collect()
    assert worker.background_s > 0 and not worker.children
    assert pngs == {name: render(figure, args) for name, figure, args in jobs}


def test_a_dead_worker_leaves_its_figures_to_this_process(result):
    jobs = analysis_figures(result)
    worker = FigureWorker(processes=1)
    worker.children[0].proc.kill()
    worker.submit(jobs)
    assert worker.collect() == {name: render(figure, args) for name, figure, args in jobs}


def test_close_ends_the_children():
    worker = FigureWorker(processes=2)
    procs = [c.proc for c in worker.children]
    worker.close()
    assert all(p.poll() is not None for p in procs)


@pytest.mark.parametrize("processes", [1, 2])
def test_in_a_warm_child_the_drawers_are_forked_and_draw_the_same(result, processes, monkeypatch):
    import threading

    from mcr_exit.analysis import figure_worker
    from mcr_exit.analysis.plots import _plt

    _plt()  # matplotlib imported, as in a warm process
    if threading.active_count() != 1:
        pytest.skip("this test process runs other threads: no fork")
    monkeypatch.setenv("MCR_EXIT_WARM_CHILD", "1")
    jobs = analysis_figures(result)
    worker = FigureWorker(processes=processes)
    assert [type(c.proc) for c in worker.children] == [figure_worker._Forked] * processes
    worker.submit(jobs[:2])
    worker.submit(jobs[2:])
    assert worker.collect() == {name: render(figure, args) for name, figure, args in jobs}

    worker = FigureWorker(processes=processes)
    procs = [c.proc for c in worker.children]
    worker.close()
    assert all(p.poll() is not None for p in procs)
