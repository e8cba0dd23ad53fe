"""BOS policies, right-padded batches, and model loading errors."""

from __future__ import annotations

import pytest
import torch

from mcr_exit.errors import ConfigError, DataError, ModelLoadError
from mcr_exit.models import load_model
from mcr_exit.models.tokens import collate, encode_prompts, length_batches, resolve_bos
from tests.tiny import build_tokenizer


@pytest.fixture(scope="module")
def adding_tokenizer():
    return build_tokenizer(bos="<bos>", add_bos=True)


@pytest.fixture(scope="module")
def no_bos_tokenizer():
    return build_tokenizer(bos=None)


def test_auto_prepends_a_declared_bos_the_tokenizer_does_not_add(tokenizer):
    bos = resolve_bos(tokenizer, "auto")
    assert bos.prepend and bos.token == "<bos>" and "does not add" in bos.reason
    enc = encode_prompts(tokenizer, ["hello world", "the fox"], bos, 64)
    assert all(ids[0] == tokenizer.bos_token_id for ids in enc.ids)
    assert enc.position0 == {"<bos>": 2}


def test_auto_keeps_a_tokenizer_that_adds_bos(adding_tokenizer):
    bos = resolve_bos(adding_tokenizer, "auto")
    assert not bos.prepend and "adds" in bos.reason
    enc = encode_prompts(adding_tokenizer, ["hello world"], bos, 64)
    assert enc.ids[0][0] == adding_tokenizer.bos_token_id and enc.ids[0][1] != adding_tokenizer.bos_token_id


def test_no_declared_bos(no_bos_tokenizer):
    bos = resolve_bos(no_bos_tokenizer, "auto")
    assert bos.token is None and "no BOS" in bos.reason
    with pytest.raises(ConfigError, match="declares no BOS"):
        resolve_bos(no_bos_tokenizer, "force")


def test_none_policy_and_truncation(tokenizer):
    bos = resolve_bos(tokenizer, "none")
    enc = encode_prompts(tokenizer, ["hello world " * 50], bos, 16)
    assert enc.ids[0][0] != tokenizer.bos_token_id and len(enc.ids[0]) == 16 and enc.truncated == 1


def test_prompts_all_empty_after_tokenization(tokenizer):
    with pytest.raises(DataError, match="all 2 prompts are empty"):
        encode_prompts(tokenizer, ["", ""], resolve_bos(tokenizer, "auto"), 64)
    enc = encode_prompts(tokenizer, ["", "hi there"], resolve_bos(tokenizer, "auto"), 64)
    assert enc.kept == [1] and enc.dropped_empty == 1


def test_right_padding_and_length_batches():
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    batches = length_batches([5, 100, 6, 99, 7], max_tokens=300, max_batch=8)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert all(max([5, 100, 6, 99, 7][i] for i in b) * len(b) <= 300 for b in batches)


def test_local_folder_loads(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.spec.source == "folder" and loaded.n_layers == 3 and loaded.adapter.family == "llama"


def test_the_cycle_collector_is_paused_during_a_load_and_restored_after(tiny_llama_dir, tmp_path, monkeypatch):
    """The cycle collector is off while transformers builds the model (its automatic collections would
    walk the just-imported modules again and free nothing), on again afterwards, also after a load that
    failed, and left off for a caller that had turned it off."""
    import gc

    from transformers import AutoModelForCausalLM

    enabled_in_build = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        enabled_in_build.append(gc.isenabled())
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    assert gc.isenabled()
    loaded = load_model(str(tiny_llama_dir))
    assert enabled_in_build == [False] and gc.isenabled() and loaded.n_layers == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        load_model(str(tmp_path / "empty"))  # fails inside the load, in transformers
    assert gc.isenabled()
    gc.disable()
    try:
        load_model(str(tiny_llama_dir))
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert enabled_in_build[-1] is False


def test_loading_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("./missing-model.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="corrupt GGUF"):
        load_model(str(bad))
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="corrupt GGUF"):
        load_model(str(truncated))
    import mcr_exit.models.loading as loading

    def no_memory(path, model_kwargs):
        raise MemoryError("cannot allocate 2147483648 bytes")

    with pytest.MonkeyPatch.context() as mp:  # the machine failing, not the file: not called corrupt
        mp.setattr(loading, "load_gguf", no_memory)
        with pytest.raises(ModelLoadError, match=r"^cannot load GGUF file .*trunc\.gguf: cannot allocate"):
            load_model(str(truncated))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            load_model(str(tmp_path / "nope"), device="cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        load_model(None, device="tpu")
