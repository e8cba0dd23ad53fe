"""One adapter per architecture family, one file each. Every module of this package is imported here,
so adding an architecture means adding one file that registers its adapter (nothing to list)."""

import importlib
import pkgutil

from mcr_exit.models.adapters.base import ArchitectureAdapter, adapter_for, supported_model_types

ADAPTER_MODULES = tuple(
    info.name for info in pkgutil.iter_modules(__path__) if info.name != "base" and not info.name.startswith("_")
)
for _name in ADAPTER_MODULES:
    importlib.import_module(f"{__name__}.{_name}")  # registration happens on import

__all__ = ["ADAPTER_MODULES", "ArchitectureAdapter", "adapter_for", "supported_model_types"]
