"""StageTimer: stages in the order they started, parts under their stage, MLflow keys, the module-level
``stage`` that records only into an active timer."""

from __future__ import annotations

import threading
import time

from mcr_exit import timing
from mcr_exit.timing import StageTimer, process_age, stage


def test_module_stage_records_into_the_active_timer_only():
    with stage("nobody"):  # no active timer: a no-op
        pass
    timer = StageTimer()
    with timer.active():
        with stage("load_model"):
            with stage("load_model.tokenizer"):
                time.sleep(0.01)
        assert timing.current() is timer
    assert timing.current() is None
    with stage("after"):
        pass
    assert set(timer.stages) == {"load_model", "load_model.tokenizer"}
    assert timer.stages["load_model"] >= timer.stages["load_model.tokenizer"] >= 0.01


def test_a_thread_does_not_inherit_the_active_timer():
    timer = StageTimer()
    seen = []
    with timer.active():
        t = threading.Thread(target=lambda: seen.append(timing.current()))
        t.start()
        t.join()
    assert seen == [None]


def test_report_orders_by_start_with_parts_indented_under_their_stage():
    timer = StageTimer()
    with timer.stage("imports"):
        pass
    with timer.stage("load_model"):
        with timer.stage("load_model.cache_key"):
            pass
        with timer.stage("load_model.build"):
            pass
    with timer.stage("statistics"):
        time.sleep(0.02)
    timer.add("load_model.cache_key", 0.5)  # a stage seen twice adds up, keeping its first place
    timer.add("load_model.in_worker", 0.1, started=time.perf_counter())  # late: still under its stage
    lines = timer.report().splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["imports", "load_model", "cache_key", "build", "in_worker", "statistics", "(other)",
                     "total"]
    assert lines[2].startswith("  load_model") and lines[3].startswith("    cache_key")
    assert timer.stages["load_model.cache_key"] >= 0.5
    total = float(lines[-1].split()[-2])  # printed to 0.01 s
    assert total >= round(timer.stages["statistics"], 2) - 0.01 and timer.stages["statistics"] >= 0.02


def test_metrics_are_timing_keys_in_seconds_with_a_total():
    timer = StageTimer()
    timer.add("figures.in_worker", 1.25)
    with timer.stage("tables"):
        pass
    metrics = timer.as_metrics()
    assert set(metrics) == {"timing/figures.in_worker_s", "timing/tables_s", "timing/total_s"}
    assert metrics["timing/figures.in_worker_s"] == 1.25
    assert metrics["timing/total_s"] >= metrics["timing/tables_s"] >= 0


def test_since_process_start_counts_the_time_before_it_as_startup():
    age = process_age()
    timer = StageTimer.since_process_start()
    if age is None:  # not Linux: no startup stage, the total counts from now
        assert "startup" not in timer.stages
        return
    assert timer.stages["startup"] >= age - 0.05
    assert timer.total() >= timer.stages["startup"]
