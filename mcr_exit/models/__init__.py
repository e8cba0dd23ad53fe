"""Model loading, architecture adapters, hooks, and the one run-to-layer-k path."""

from mcr_exit.models.loading import LoadedModel, ModelSpec, default_model_file, from_objects, load_model

__all__ = ["LoadedModel", "ModelSpec", "default_model_file", "from_objects", "load_model"]
