"""Analysis speed: bare forward vs the usual eager approach vs mcr-exit, side by side.

    python benchmarks/bench_analysis.py --config llama-3-8b --seq-len 1024 --batch-sizes 1,4 --device cuda
    python benchmarks/bench_analysis.py --model builtin --seq-len 256 --batch-sizes 1,4 --device cpu

--config builds a random-weight model from a real architecture's shape (speed does not depend on the
weights); --model loads real weights (builtin = the SmolLM2 GGUF). Prints one table: ms per prompt,
peak memory, and the ratio to the bare forward; with --check, the largest difference of each metric
from a float64 reference computed from eager attention probabilities and float64 SVDs.

--prompts N times runs over N prompts (N / batch batches) per call instead of one batch: an analysis of a
data set overlaps one batch's spectra with the next batch's forward pass, which a single batch cannot show.
The bare forward runs the same batches one after another; the usual approach is timed on one batch.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import spectral_backends  # noqa: F401  (registers the "device-threads" and "cpu-pool" backends)

CONFIGS = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192),
}


def build(args):
    from mcr_exit.models import from_objects, load_model

    if args.model:
        return load_model(None if args.model == "builtin" else args.model, device=args.device, dtype=args.dtype)
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    cfg = LlamaConfig(**CONFIGS[args.config], tie_word_embeddings=False)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "auto": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<bos>": 1}, "<pad>")),
                                  bos_token="<bos>", pad_token="<pad>")
    return from_objects(model, tok, name=f"random-{args.config}")


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    dt = (time.perf_counter() - t) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if str(device).startswith("cuda") else float("nan")
    return dt, peak


def usual_approach(loaded, ids, mask):
    """What public tools do: eager attention with all outputs, then per-layer SVDs and attention sums."""
    model = loaded.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = loaded.adapter.backbone(input_ids=ids, attention_mask=mask, output_attentions=True,
                                          output_hidden_states=True)
        res = []
        for h in out.hidden_states:
            s = torch.linalg.svdvals(h.float()) ** 2
            p = s / s.sum(-1, keepdim=True)
            res.append(-(torch.xlogy(p, p)).sum(-1))
        for a in out.attentions:
            a = a.float()
            res.append(a[..., 0].mean(-1))
            res.append((-(torch.xlogy(a, a)).sum(-1)).mean(-1))
            res.append(a.sum(-2))
        return res
    finally:
        model.set_attn_implementation("sdpa")


def parse_spec(spec):
    """'device-fp64' | 'device-fp32' | 'device-threads-fp32' | 'cpu-pool' |
    'estimate[-D48][-i12][-s5][-c136][-nographs]' | 'attention-only' -> (backend, spectral dtype, estimate options)."""
    if spec.startswith("estimate"):
        opts = {}
        for part in spec.split("-")[1:]:
            if part.startswith("D"):
                opts["degree"] = int(part[1:])
            elif part.startswith("i"):
                opts["iterations"] = int(part[1:])
            elif part.startswith("w"):
                opts["width"] = int(part[1:])
            elif part.startswith("s"):
                opts["squarings"] = int(part[1:])
            elif part.startswith("c"):
                opts["chunk"] = int(part[1:])
            elif part == "fp32":
                opts["storage"] = torch.float32
            elif part == "nographs":
                opts["graphs"] = False

        return "estimate", torch.float64, opts
    backend = "cpu-pool" if spec == "cpu-pool" else "device-threads" if spec.startswith("device-threads") else "device"
    return backend, torch.float32 if spec.endswith("fp32") else torch.float64, {}


def attention_only(loaded, ids, mask, method):
    """The forward pass with the attention statistics and no hidden-state statistics (a breakdown row)."""
    from mcr_exit.models.attention_stats import collect_attention_stats
    from mcr_exit.models.forward import run_blocks

    with collect_attention_stats(loaded.adapter, mask.sum(1), lambda j, a: None, method=method):
        run_blocks(loaded.adapter, ids, mask, lambda i, h: None)


def check(loaded, ids, mask, method, spec):
    """Largest |difference| of each per-layer metric from an eager float64 reference, on one batch."""
    from mcr_exit.analysis.collect import collect_statistics
    from mcr_exit.metrics.attention import attention_head_stats, summarize_heads
    from mcr_exit.metrics.spectral import spectral_stats
    from mcr_exit.models.forward import run_blocks

    lengths = mask.sum(1)
    backend, sdtype, opts = parse_spec(spec)
    got = collect_statistics(loaded, [row[: int(n)].tolist() for row, n in zip(ids.cpu(), lengths.cpu())],
                             max_batch=ids.shape[0], spectral_backend=backend, spectral_dtype=sdtype,
                             spectral_options=opts, attention_method=method)
    hidden = {}
    model = loaded.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = loaded.adapter.backbone(input_ids=ids, attention_mask=mask, output_attentions=True)
            run_blocks(loaded.adapter, ids, mask, lambda i, h: hidden.__setitem__(i, h.double()))
    finally:
        model.set_attn_implementation("sdpa")
    diffs = {}
    for i, h in hidden.items():
        s = spectral_stats(h, lengths.to(h.device), compute_dtype=torch.float64)
        for key in ("entropy", "entropy_norm", "anisotropy"):
            d = (s.as_dict()[key].cpu().numpy() - got.hidden[key][:, i]).__abs__().max()
            diffs[key] = max(diffs.get(key, 0.0), float(d))
    for j, a in enumerate(out.attentions):
        ref = summarize_heads(attention_head_stats(a.double(), lengths.to(a.device)), 0.3)
        for key in ("sink_score", "mixing_score", "colsum_concentration", "diag_score"):
            d = (ref[key].cpu().numpy() - got.attention[key][:, j]).__abs__().max()
            diffs[key] = max(diffs.get(key, 0.0), float(d))
    return diffs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-3-8b", choices=sorted(CONFIGS))
    ap.add_argument("--model", default=None, help="real weights instead of --config (builtin, folder, Hub id)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=0,
                    help="prompts per timed call (a multiple of the batch size; default: one batch)")
    ap.add_argument("--variants", default="fused/device-fp64,fused/cpu-pool,fused/device-fp32,chunked/device-fp64")
    ap.add_argument("--skip-usual", action="store_true")
    ap.add_argument("--check", action="store_true", help="compare with an eager float64 reference")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()

    from mcr_exit.analysis.collect import collect_statistics

    loaded = build(args)
    device = loaded.input_device
    vocab = loaded.model.config.vocab_size
    rows = []
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "model": loaded.spec.name, "dtype": loaded.spec.dtype, "seq_len": args.seq_len,
           "n_layers": loaded.n_layers}
    print(json.dumps(env))
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        n_prompts = max(bs, -(-args.prompts // bs) * bs)
        g = torch.Generator().manual_seed(bs)
        all_ids = torch.randint(2, vocab, (n_prompts, args.seq_len), generator=g)
        all_ids[:, 0] = loaded.tokenizer.bos_token_id or 1
        batches = [(b.to(device), torch.ones_like(b).to(device)) for b in all_ids.split(bs)]
        ids, mask = batches[0]
        lists = [row.tolist() for row in all_ids]

        def bare():
            with torch.inference_mode():
                for b_ids, b_mask in batches:
                    loaded.adapter.backbone(input_ids=b_ids, attention_mask=b_mask, use_cache=False)

        dt, peak = timed(bare, device, args.repeats)
        base = dt
        base_peak = peak
        rows.append(dict(batch=bs, prompts=n_prompts, method="bare forward (sdpa)", ms_per_prompt=1000 * dt / n_prompts,
                         peak_gib=peak))
        if not args.skip_usual:
            dt, peak = timed(lambda: usual_approach(loaded, ids, mask), device, max(1, args.repeats - 1))
            rows.append(dict(batch=bs, prompts=bs, method="usual: eager + output_attentions + svdvals",
                             ms_per_prompt=1000 * dt / bs, peak_gib=peak))
        for variant in args.variants.split(","):
            method, spec = variant.split("/")

            def run():
                if spec == "attention-only":
                    with torch.inference_mode():
                        for b_ids, b_mask in batches:
                            attention_only(loaded, b_ids, b_mask, method)
                        return
                backend, sdtype, opts = parse_spec(spec)
                collect_statistics(loaded, lists, max_batch=bs, max_tokens=bs * args.seq_len,
                                   spectral_backend=backend, spectral_dtype=sdtype, spectral_options=opts,
                                   attention_method=method)

            try:
                dt, peak = timed(run, device, args.repeats)
                rows.append(dict(batch=bs, prompts=n_prompts, method=f"mcr-exit {variant}",
                                 ms_per_prompt=1000 * dt / n_prompts, peak_gib=peak))
            except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
                rows.append(dict(batch=bs, method=f"mcr-exit {variant}", error=f"{type(exc).__name__}: {exc}"[:200]))
        for r in rows:
            if r["batch"] == bs and "ms_per_prompt" in r:
                r["x_bare_time"] = r["ms_per_prompt"] / (1000 * base / n_prompts)
                r["x_bare_mem"] = r["peak_gib"] / base_peak if base_peak == base_peak else float("nan")
        print_table([r for r in rows if r["batch"] == bs])
    from mcr_exit.metrics import cheb_step, spectral_estimate

    print("estimate: CUDA graphs kept", len(spectral_estimate._GRAPHS), "failed", spectral_estimate._GRAPHS_FAILED,
          "; fused kernels failed", cheb_step._FAILED)
    if args.check:
        bs = 2
        ids = torch.randint(2, vocab, (bs, min(args.seq_len, 512)), generator=torch.Generator().manual_seed(7))
        ids[:, 0] = loaded.tokenizer.bos_token_id or 1
        mask = torch.ones_like(ids)
        mask[1, ids.shape[1] // 2 :] = 0  # one padded row
        for variant in args.variants.split(","):
            method, spec = variant.split("/")
            if spec == "attention-only":
                continue
            diffs = check(loaded, ids.to(device), mask.to(device), method, spec)
            print("check", variant, json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
            rows.append(dict(check=variant, **diffs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


def print_table(rows):
    print(f"{'batch':>5} | {'prompts':>7} | {'method':<48} | {'ms/prompt':>10} | {'peak GiB':>8} | {'x bare t':>8} | {'x bare mem':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:>5} | {r.get('prompts', r['batch']):>7} | {r['method']:<48} | {r['error']}")
            continue
        print(f"{r['batch']:>5} | {r.get('prompts', r['batch']):>7} | {r['method']:<48} | {r['ms_per_prompt']:>10.1f} | {r['peak_gib']:>8.2f} | "
              f"{r['x_bare_time']:>8.2f} | {r['x_bare_mem']:>10.2f}")


if __name__ == "__main__":
    main()
