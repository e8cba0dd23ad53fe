"""Model loading, architecture adapters, hooks, and the one run-to-layer-k path.

The names below are imported on first use (PEP 562), so that a light submodule (``registry``) can be
imported before torch is."""

__all__ = ["LoadedModel", "ModelSpec", "default_model_file", "from_objects", "load_model"]


def __getattr__(name: str):
    if name in __all__:
        from mcr_exit.bytecode import keep_bytecode

        keep_bytecode()  # before torch loads, where the environment writes no bytecode (mcr_exit.bytecode)
        from mcr_exit.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
