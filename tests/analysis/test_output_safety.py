"""--output-dir never costs a user a file: only an earlier mcr-exit output (or an empty folder) is
replaced, dangerous folders are refused, bad paths fail before any work, dead staging folders are swept."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mcr_exit.errors import ConfigError
from mcr_exit.outputs import MARKER, check_output_dir, staged_output_dir, sweep_stale_stages

REPO = Path(__file__).resolve().parents[2]


def _write(out: Path, name: str = "result.txt", text: str = "new") -> None:
    with staged_output_dir(out) as staging:
        (staging / name).write_text(text)
        (staging / "sub").mkdir()
        (staging / "sub" / "deep.txt").write_text(text)


def test_a_folder_mcr_exit_did_not_write_is_refused_and_kept(tmp_path):
    demo = tmp_path / "demo"
    (demo / "nested").mkdir(parents=True)
    (demo / "keep.txt").write_text("x")
    (demo / "nested" / "also.txt").write_text("y")
    with pytest.raises(ConfigError, match="did not write"):
        _write(demo)
    assert (demo / "keep.txt").read_text() == "x" and (demo / "nested" / "also.txt").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folder left beside it


def test_an_earlier_output_is_replaced_and_marked(tmp_path):
    out = tmp_path / "out"
    _write(out, "old.txt", "old")
    assert (out / MARKER).exists()
    _write(out, "result.txt", "new")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "result.txt", "sub"])
    assert (out / "result.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_added_to_an_earlier_output_keeps_it_from_being_replaced(tmp_path):
    out = tmp_path / "out"
    _write(out)
    (out / "sub" / "my_notes.md").write_text("mine")
    with pytest.raises(ConfigError, match="sub/my_notes.md"):
        _write(out)
    assert (out / "sub" / "my_notes.md").read_text() == "mine"


def test_an_empty_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty")
    assert (tmp_path / "empty" / "result.txt").read_text() == "new"


@pytest.mark.parametrize("target", [".", "..", "CWD", "~", "HOME"])
def test_the_working_directory_its_parents_home_and_root_are_refused(tmp_path, monkeypatch, target):
    home, work = tmp_path / "home", tmp_path / "work"  # home apart from the working directory
    home.mkdir()
    work.mkdir()
    (home / ".bashrc").write_text("x")
    (work / "code.py").write_text("print(1)")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = {"CWD": str(work), "HOME": str(home)}.get(target, target)
    with pytest.raises(ConfigError, match="output-dir"):
        _write(Path(target))
    assert sorted(p.name for p in work.iterdir()) == ["code.py"]
    assert sorted(p.name for p in home.iterdir()) == [".bashrc"]


def test_the_root_is_refused_by_the_check():
    with pytest.raises(ConfigError, match="refusing"):
        check_output_dir("/")


def test_a_path_under_a_file_fails_at_the_check(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        check_output_dir(tmp_path / "file.txt" / "deeper" / "out")
    with pytest.raises(ConfigError, match="not a folder"):
        check_output_dir(tmp_path / "file.txt")
    assert check_output_dir(tmp_path / "new" / "deeper" / "out") == tmp_path / "new" / "deeper" / "out"
    assert not (tmp_path / "new").exists()  # the check creates nothing


def _stage_and_die(parent: Path, signal_name: str) -> None:
    """A real process that stages ``parent/out`` and is killed mid-write."""
    code = ("import os, signal, sys; from pathlib import Path; from mcr_exit.outputs import staged_output_dir\n"
            f"with staged_output_dir(Path({str(parent / 'out')!r})) as s:\n"
            "    (s / 'half.txt').write_text('x'); os.kill(os.getpid(), signal." + signal_name + ")\n")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


def _stages(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".mcr-stage." in p.name]


def test_a_sigkilled_writer_leaves_a_stage_that_the_next_write_sweeps(tmp_path):
    _stage_and_die(tmp_path, "SIGKILL")
    assert len(_stages(tmp_path)) == 1  # SIGKILL cannot be cleaned up after
    _write(tmp_path / "other")
    assert _stages(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_sigtermed_writer_cleans_up_itself(tmp_path):
    _stage_and_die(tmp_path, "SIGTERM")
    assert list(tmp_path.iterdir()) == []


def test_a_live_writers_stage_is_not_swept(tmp_path):
    with staged_output_dir(tmp_path / "mine") as staging:
        assert sweep_stale_stages(tmp_path) == []
        assert staging.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fake = tmp_path / ".x.mcr-stage.abc"
        fake.mkdir()
        (fake / ".mcr-exit-stage.json").write_text('{"host": "%s", "pid": "%d", "start": "", "boot": ""}'
                                                   % (socket.gethostname(), sleeper.pid))
        assert sweep_stale_stages(tmp_path) == [] and fake.exists()
        (fake / ".mcr-exit-stage.json").write_text('{"host": "elsewhere", "pid": "1", "start": "", "boot": ""}')
        assert sweep_stale_stages(tmp_path) == [] and fake.exists()  # another host's: nothing proves it dead
    finally:
        sleeper.kill()
        sleeper.wait()
    (fake / ".mcr-exit-stage.json").write_text('{"host": "%s", "pid": "%d", "start": "", "boot": ""}'
                                               % (socket.gethostname(), sleeper.pid))
    assert sweep_stale_stages(tmp_path) == [fake] and not fake.exists()
