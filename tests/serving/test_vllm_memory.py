"""One copy of the weights: the server with early-exit embeddings in use takes no more memory than vLLM
alone on the same model (within 10 %), measured as the resident memory of each process tree."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.serving.conftest import make_profile
from tests.serving.vllm_server import needs_vllm, save_tiny_llama, tree_rss, vllm_env, vllm_server

pytestmark = needs_vllm

# vLLM alone: the same engine arguments as the server (no worker extension), one generation, then the
# resident memory of this process and its engine core and worker.
ALONE = """
import asyncio, sys
if __name__ == "__main__":
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    sys.path.insert(0, sys.argv[2])
    from tests.serving.vllm_server import tree_rss
    import os
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=sys.argv[1], dtype="float32", enforce_eager=True,
                                                    max_model_len=4096, max_num_seqs=64))
    async def go():
        async for _ in llm.generate({"prompt_token_ids": [2, 50, 60, 70]}, SamplingParams(max_tokens=16),
                                    request_id="r"):
            pass
    asyncio.run(go())
    print("RSS", tree_rss(os.getpid()), flush=True)
    llm.shutdown()
"""


@pytest.fixture(scope="module")
def big_mlp_dir(tmp_path_factory, tokenizer):
    """Few blocks, wide MLPs: ~500 MB of float32 weights, large next to vLLM's own footprint."""
    return save_tiny_llama(tmp_path_factory.mktemp("vllm-mem") / "wide-llama", tokenizer, n_layers=4,
                           hidden=256, intermediate=40960)


def test_embeddings_add_no_second_copy_of_the_weights(big_mlp_dir, tmp_path):
    import openai

    from tests.serving.vllm_server import ROOT

    weight_bytes = sum(p.stat().st_size for p in big_mlp_dir.glob("*.safetensors"))
    r = subprocess.run([sys.executable, "-c", ALONE, str(big_mlp_dir), str(ROOT)], env=vllm_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    alone = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("RSS ")))
    profile = make_profile(tmp_path / "phase_profile.json", name="wide-llama", model_type="llama", n_layers=4,
                           hidden_size=256, k=2)
    with vllm_server(big_mlp_dir, profile) as (base, proc):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        for layer in (2, 4):
            client.embeddings.create(model="wide-llama", input=["The quick brown fox."] * 16,
                                     extra_body={"layer": layer})
        client.completions.create(model="wide-llama", prompt="The quick", max_tokens=16)
        served = tree_rss(proc.pid)
    print(f"weights {weight_bytes / 2**20:.0f} MiB; vLLM alone {alone / 2**20:.0f} MiB; "
          f"server with embeddings {served / 2**20:.0f} MiB ({served / alone - 1:+.1%})")
    assert weight_bytes > 0.1 * alone  # a second copy of the weights could not hide in the 10 %
    assert served <= 1.1 * alone
