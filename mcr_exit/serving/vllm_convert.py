"""``python -m mcr_exit.serving.vllm_convert FILE.gguf OUT_DIR``: a GGUF as a float32 safetensors folder.

Run in a child process by ``vllm_generator.resolve_model`` so that the serving process never holds this
transformers copy. The weights are dequantized exactly as ``mcr-exit analyze`` loads them, so vLLM
serves the same values the analysis measured.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m mcr_exit.serving.vllm_convert FILE.gguf OUT_DIR", file=sys.stderr)
        return 2
    from mcr_exit.models import load_model

    src, out = argv[0], Path(argv[1])
    loaded = load_model(src, dtype="float32", device="cpu")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = loaded.model
    # transformers will not save a model loaded from a GGUF (it keeps the GGUF "quantization" config),
    # but the weights are plain float32 tensors by now: write them and a config without that entry.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):  # stored once, under the input embedding's name,
        state.pop("lm_head.weight", None)  # which is the one vLLM loads for a tied output layer
    save_file({name: t.contiguous() for name, t in state.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    loaded.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a folder with config.json is a finished conversion
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
