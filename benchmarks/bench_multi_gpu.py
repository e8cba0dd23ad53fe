"""Several GPUs: data-parallel analysis under torchrun, and a model too big for one GPU split over several.

    # data parallel: each rank analyzes every world-th prompt, then the ranks exchange their statistics;
    # rank 0 then analyzes all prompts alone and compares
    torchrun --nproc-per-node 2 benchmarks/bench_multi_gpu.py dp --config llama-3-8b --prompts 32
    # one model over all visible GPUs, placed as from_pretrained(device_map="auto") places it
    # (accelerate's infer_auto_device_map + dispatch_model; weights random, made on their devices)
    python benchmarks/bench_multi_gpu.py split --config llama-84b --prompts 8
    # mcr-exit's own loader, load_model(folder, device="auto"), on a checkpoint written first, with GPU 0
    # filled up to --gpu0-free GiB so that "auto" must split; compared with the same weights on one GPU
    python benchmarks/bench_multi_gpu.py load-auto --config llama-3-8b --prompts 8

Random weights (speed does not depend on them); prompts of random tokens with lengths spread over
[T/2, T], so that batches are padded. ``dp`` also runs on CPUs with gloo (``--device cpu``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_analysis import CONFIGS  # noqa: E402

CONFIGS = {
    **CONFIGS,
    # Llama-3-70B's layer, 96 of them: 84e9 parameters, 156 GiB in bf16 (one H200 holds 139)
    "llama-84b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=96, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, max_position_embeddings=512),
}
GROUPS = ("hidden", "final_normed", "attention", "heads")


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<bos>": 1}, "<pad>")),
                                   bos_token="<bos>", pad_token="<pad>")


def prompts(n: int, T: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g).tolist()
    return [[1] + torch.randint(2, vocab, (t - 1,), generator=g).tolist() for t in lengths]


def build_on(config: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**CONFIGS[config], tie_word_embeddings=False)
    torch.manual_seed(0)  # every rank builds the same weights
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()


def build_split(config: str, dtype: torch.dtype, headroom_gib: float):
    """The model on all visible GPUs: placed by accelerate's infer_auto_device_map (what device_map="auto"
    does), each weight made directly on its device (random normal(0, 0.02), norms 1)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**CONFIGS[config], tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    n = torch.cuda.device_count()
    free = {i: f"{torch.cuda.mem_get_info(i)[0] / 2**30 - headroom_gib:.0f}GiB" for i in range(n)}
    placement = infer_auto_device_map(model, max_memory=free, no_split_module_classes=["LlamaDecoderLayer"],
                                      dtype=dtype)
    torch.manual_seed(0)

    def device_of(name: str) -> int:
        while name and name not in placement:
            name = name.rpartition(".")[0]
        return placement.get(name, 0)

    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        dev = torch.device("cuda", device_of(name))
        value = torch.ones(p.shape, dtype=dtype, device=dev) if "norm" in name else \
            torch.empty(p.shape, dtype=dtype, device=dev).normal_(0.0, 0.02)
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg, device=torch.device("cuda", device_of("model.rotary_emb")))
    return dispatch_model(model, device_map=placement), placement


def differences(a, b) -> dict[str, float]:
    out = {}
    for group in GROUPS:
        x, y = getattr(a, group), getattr(b, group)
        assert x.keys() == y.keys(), group
        for key in x:
            both = np.isfinite(x[key]) & np.isfinite(y[key])
            assert (np.isfinite(x[key]) == np.isfinite(y[key])).all(), (group, key)
            diff = np.abs(x[key][both] - y[key][both]) / np.maximum(1.0, np.abs(y[key][both]))
            out[f"{group}.{key}"] = float(diff.max()) if both.any() else 0.0
    return out


def run_dp(args) -> None:
    import torch.distributed as dist

    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.analysis.distributed import collect_statistics_distributed, init_from_env, is_distributed
    from mcr_exit.models import from_objects

    device = init_from_env(args.device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    loaded = from_objects(build_on(args.config, device, dtype), tokenizer(), name=f"random-{args.config}")
    ids = prompts(args.prompts, args.seq_len, CONFIGS[args.config]["vocab_size"])
    opts = dict(spectral_backend="estimate" if device.startswith("cuda") else "device", max_batch=args.batch)
    me, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    # warm-up: each batch shape compiles its Triton kernel variants and captures its graphs once
    collect_statistics_distributed(loaded, ids, **opts)
    if me == 0:
        collect_statistics(loaded, ids, **opts)

    def timed(fn, together: bool = True):
        if together and is_distributed():
            dist.barrier()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()  # (its statistics are read back to the host: complete when it returns)
        if together and is_distributed():
            dist.barrier()
        return out, time.perf_counter() - t

    merged, t_dp = timed(lambda: collect_statistics_distributed(loaded, ids, **opts))
    if me == 0:
        alone, t_one = timed(lambda: collect_statistics(loaded, ids, **opts), together=False)
        d = differences(merged, alone)
        worst = max(d, key=d.get)
        name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        print(f"# torchrun --nproc-per-node {world} benchmarks/bench_multi_gpu.py dp --config {args.config} "
              f"--prompts {args.prompts} --seq-len {args.seq_len} --batch {args.batch}")
        print(f"# {world} x {name}, backend {dist.get_backend() if is_distributed() else '-'}, torch {torch.__version__}")
        print(f"data parallel over {world} ranks: {t_dp:.2f} s for {args.prompts} prompts "
              f"({1e3 * t_dp / args.prompts:.1f} ms/prompt); one process: {t_one:.2f} s "
              f"({1e3 * t_one / args.prompts:.1f} ms/prompt); speed-up {t_one / t_dp:.2f}x")
        print(f"largest difference, merged vs one process, over {len(d)} metrics (|a - b| / max(1, |b|)): "
              f"{d[worst]:.2e} ({worst})")
        for key in ("hidden.entropy", "hidden.anisotropy", "attention.sink_rate", "attention.mixing_score"):
            if key in d:
                print(f"  {key}: {d[key]:.2e}")
        means = np.nanmean(merged.hidden["entropy"], 0) - np.nanmean(alone.hidden["entropy"], 0)
        print(f"per-layer mean entropy, merged - one process: max |diff| {np.abs(means).max():.2e}")
    if is_distributed():
        dist.barrier()  # the other ranks wait while rank 0 runs alone
        dist.destroy_process_group()


def run_split(args) -> None:
    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.models import from_objects

    t = time.perf_counter()
    model, placement = build_split(args.config, torch.bfloat16, args.headroom)
    t_build = time.perf_counter() - t
    params = sum(p.numel() for p in model.parameters())
    per_dev = {d: sum(1 for v in placement.values() if v == d) for d in sorted(set(placement.values()))}
    loaded = from_objects(model, tokenizer(), name=f"random-{args.config}")
    ids = prompts(args.prompts, args.seq_len, CONFIGS[args.config]["vocab_size"])
    opts = dict(spectral_backend="estimate", max_batch=args.batch)
    from mcr_exit.models.tokens import collate

    def bare():
        with torch.inference_mode():
            for i in range(0, len(ids), args.batch):
                x, mask = collate(ids[i : i + args.batch], 0, loaded.input_device)
                model(input_ids=x, attention_mask=mask, use_cache=False, logits_to_keep=1)

    rows = []
    for label, fn in (("bare forward", bare), ("mcr-exit analysis", lambda: collect_statistics(loaded, ids, **opts))):
        fn()  # warm-up
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
            torch.cuda.reset_peak_memory_stats(i)
        t = time.perf_counter()
        out = fn()
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)
        dt = time.perf_counter() - t
        peaks = [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(torch.cuda.device_count())]
        rows.append((label, dt, peaks))
        stats = out
    print(f"# python benchmarks/bench_multi_gpu.py split --config {args.config} --prompts {args.prompts} "
          f"--seq-len {args.seq_len} --batch {args.batch}")
    print(f"# {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"{params / 1e9:.1f}e9 parameters, {params * 2 / 2**30:.0f} GiB in bf16; one GPU has "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB; made in {t_build:.0f} s")
    print(f"placement (infer_auto_device_map): modules per GPU {per_dev}")
    for label, dt, peaks in rows:
        print(f"{label:20s} {1e3 * dt / len(ids):9.1f} ms/prompt   peak GiB per GPU "
              + " ".join(f"{p:.1f}" for p in peaks) + f"   x bare {dt / rows[0][1]:.2f}")
    h = stats.hidden["entropy"]
    L = h.shape[1] - 1
    print(f"statistics: {h.shape[0]} prompts x {h.shape[1]} hidden states, all finite: "
          f"{bool(np.isfinite(h).all() and np.isfinite(stats.attention['sink_rate']).all())}; "
          f"entropy (nats) at hidden 0, L/2, L: {np.nanmean(h[:, 0]):.3f} {np.nanmean(h[:, L // 2]):.3f} "
          f"{np.nanmean(h[:, L]):.3f}")


def run_load_auto(args) -> None:
    import tempfile

    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.models import from_objects, load_model

    model, tok = build_on(args.config, "cuda:0", torch.bfloat16), tokenizer()
    folder = tempfile.mkdtemp(prefix="mcr-ckpt-")
    t = time.perf_counter()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    t_save = time.perf_counter() - t
    ids = prompts(args.prompts, args.seq_len, CONFIGS[args.config]["vocab_size"])
    opts = dict(spectral_backend="estimate", max_batch=args.batch)
    ref = collect_statistics(from_objects(model, tok), ids, **opts)
    del model
    torch.cuda.empty_cache()
    hog = torch.empty(torch.cuda.mem_get_info(0)[0] - int(args.gpu0_free * 2**30), dtype=torch.uint8, device="cuda:0")
    free = [torch.cuda.mem_get_info(i)[0] / 2**30 for i in range(torch.cuda.device_count())]
    t = time.perf_counter()
    loaded = load_model(folder, device="auto", dtype="bfloat16")
    t_load = time.perf_counter() - t
    del hog
    torch.cuda.empty_cache()
    layers: dict = {}
    for name, dev in getattr(loaded.model, "hf_device_map", {}).items():
        layers[dev] = layers.get(dev, 0) + name.startswith("model.layers.")
    weights: dict = {}
    for p in loaded.model.parameters():
        weights[str(p.device)] = weights.get(str(p.device), 0.0) + p.numel() * p.element_size() / 2**30
    got = collect_statistics(loaded, ids, **opts)
    d = differences(got, ref)
    worst = max(d, key=d.get)
    print(f"# python benchmarks/bench_multi_gpu.py load-auto --config {args.config} --prompts {args.prompts} "
          f"--seq-len {args.seq_len} --batch {args.batch} --gpu0-free {args.gpu0_free}")
    print(f"# {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"checkpoint written in {t_save:.0f} s; free GiB per GPU before loading: "
          + " ".join(f"{f:.1f}" for f in free))
    print(f"load_model(folder, device='auto') in {t_load:.0f} s: decoder layers per GPU {layers}; weights GiB "
          + " ".join(f"{k} {v:.1f}" for k, v in weights.items()))
    print(f"statistics of the split model vs the same weights on one GPU, over {len(d)} metrics "
          f"(|a - b| / max(1, |b|)): largest {d[worst]:.2e} ({worst}); entropy {d['hidden.entropy']:.2e}; "
          f"anisotropy {d['hidden.anisotropy']:.2e}; sink rate {d['attention.sink_rate']:.2e}; "
          f"mixing {d['attention.mixing_score']:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["dp", "split", "load-auto"])
    ap.add_argument("--config", default="llama-3-8b", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--headroom", type=float, default=24.0, help="GiB left free on each GPU for activations")
    ap.add_argument("--gpu0-free", type=float, default=10.0, help="load-auto: GiB left free on GPU 0 while loading")
    args = ap.parse_args()
    {"dp": run_dp, "split": run_split, "load-auto": run_load_auto}[args.mode](args)


if __name__ == "__main__":
    main()
