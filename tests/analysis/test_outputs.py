"""The one output writer: folders appear whole, with the mode a plain mkdir gives them."""

from __future__ import annotations

import os
import stat

import pytest

from mcr_exit.outputs import staged_output_dir


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staged_folder_gets_the_mkdir_mode(tmp_path, umask_022):
    (tmp_path / "plain").mkdir()
    with staged_output_dir(tmp_path / "staged") as staging:
        (staging / "a.txt").write_text("x")
    assert _mode(tmp_path / "staged") == _mode(tmp_path / "plain") == 0o755
    assert (tmp_path / "staged" / "a.txt").read_text() == "x"


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with staged_output_dir(tmp_path / "private"):
            pass
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private") == 0o700


def test_a_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_output_dir(tmp_path / "out") as staging:
            (staging / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """The machine refusing a write is the user's to fix, not a bug: an OutputError naming the folder and
    the reason (the CLI prints it as one line), and no staging folder left behind. Other errors pass."""
    import errno

    from mcr_exit.errors import OutputError

    with pytest.raises(OutputError, match=rf"^cannot write the outputs to {tmp_path / 'out'}: No space left on device$"):
        with staged_output_dir(tmp_path / "out") as staging:
            (staging / "half.txt").write_text("x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):  # not the machine refusing: raised as it is
        with staged_output_dir(tmp_path / "out"):
            open(tmp_path / "missing.txt")
    assert list(tmp_path.iterdir()) == []
