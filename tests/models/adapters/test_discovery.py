"""Adapters are discovered, not listed: every file of the package registers, and each has its own test."""

import pathlib

from mcr_exit.models import adapters
from mcr_exit.models.adapters.base import _REGISTRY

HERE = pathlib.Path(__file__).parent


def test_every_adapter_file_is_imported_and_tested():
    files = {p.stem for p in pathlib.Path(adapters.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert set(adapters.ADAPTER_MODULES) == files
    registered_modules = {cls.__module__.rsplit(".", 1)[1] for cls in _REGISTRY.values()}
    assert registered_modules == files
    assert {p.stem.removeprefix("test_") for p in HERE.glob("test_*.py")} >= files


def test_a_new_adapter_file_is_picked_up(tmp_path, monkeypatch):
    import importlib
    import sys

    pkg_dir = pathlib.Path(adapters.__file__).parent
    new = pkg_dir / "zz_tmp_family.py"
    new.write_text("from mcr_exit.models.adapters.base import ArchitectureAdapter, register\n\n\n"
                   "@register\nclass ZzAdapter(ArchitectureAdapter):\n    model_types = ('zz_tmp',)\n")
    try:
        importlib.reload(adapters)
        assert "zz_tmp" in adapters.supported_model_types()
    finally:
        new.unlink()
        _REGISTRY.pop("zz_tmp", None)
        sys.modules.pop("mcr_exit.models.adapters.zz_tmp_family", None)
        importlib.reload(adapters)
