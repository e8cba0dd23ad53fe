"""Phase-aware serving: early-exit embeddings at the profile's layer k, full-depth generation.

``engine`` owns the model and knows nothing about HTTP; ``app`` is the FastAPI layer over it.
fastapi, uvicorn and vllm are imported lazily (``pip install 'mcr-exit[serve]'``).
"""

from mcr_exit.serving.config import EngineConfig
from mcr_exit.serving.engine import Engine

__all__ = ["Engine", "EngineConfig"]
