"""Two kernel choices measured alone on a GPU, next to what the server runs.

1. The decode step's attention (one query token per row against the first ``span`` positions of its KV slot,
   with the additive mask the server builds), for every layer of a shape, captured in one CUDA graph and
   replayed (medians of 50, CUDA events):

   - ``sdpa``: ``F.scaled_dot_product_attention`` with grouped KV heads read in place (the server's,
     ``serving/model_step.py``);
   - ``bmm``: two batched matrix products with float32 scores and a softmax between them;
   - ``flex``: ``flex_attention`` (FlexDecoding), compiled for the shape, the mask added to each score;
   - ``sdpa efficient``: the server's call with SDPA held to its memory-efficient kernel.

2. A prefill of B prompts x T tokens through 4 blocks of Llama-3-8B's shape (random weights, transformers'
   own model, the server's 4-D additive mask), eager against the blocks compiled as the decode steps compile
   them (``torch.compile`` of each block, dynamic shapes).

    python benchmarks/bench_decode_kernels.py --output /tmp/kernels.md
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fused_step import _time_ms  # noqa: E402
from mcr_exit.models.cuda_graph import capture  # noqa: E402

SHAPES = {  # name: (layers, KV heads, query heads per KV head, head dim)
    "llama-3-8b": (32, 8, 4, 128),
    "smollm2-135m": (30, 3, 3, 64),
}


def graph_ms(fn, n: int = 50) -> tuple[float, torch.Tensor]:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (captured after two warm-up calls), and its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph, out = capture(fn, ())
    return _time_ms(graph.replay, n, True), out


def attention_rows(shape: str, batch: int, span: int, slot_len: int, dtype) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    L, hkv, G, D = SHAPES[shape]
    H, dev = hkv * G, torch.device("cuda")
    ks = [torch.randn(batch, hkv, slot_len, D, device=dev, dtype=dtype) for _ in range(L)]
    vs = [torch.randn(batch, hkv, slot_len, D, device=dev, dtype=dtype) for _ in range(L)]
    q = torch.randn(batch, H, 1, D, device=dev, dtype=dtype)
    pos = torch.randint(span // 2, span, (batch,), device=dev)
    allowed = torch.arange(span, device=dev)[None, :] <= pos[:, None]
    mask = torch.zeros(batch, 1, 1, span, device=dev, dtype=dtype).masked_fill_(~allowed[:, None, None],
                                                                                 torch.finfo(dtype).min)
    scale = 1 / math.sqrt(D)

    def sdpa():
        return torch.stack([F.scaled_dot_product_attention(q.reshape(batch, hkv, G, D), k[:, :, :span],
                                                           v[:, :, :span], attn_mask=mask, scale=scale)
                            for k, v in zip(ks, vs)]).reshape(L, batch, H, D)

    def bmm():
        outs = []
        for k, v in zip(ks, vs):
            kk = k[:, :, :span].reshape(batch * hkv, span, D)
            s = torch.bmm(q.reshape(batch * hkv, G, D), kk.transpose(1, 2), out_dtype=torch.float32)
            p = torch.softmax(s.view(batch, hkv, G, span) * scale + mask, dim=-1).to(dtype)
            outs.append(torch.bmm(p.view(batch * hkv, G, span), v[:, :, :span].reshape(batch * hkv, span, D)))
        return torch.stack(outs).reshape(L, batch, H, D)

    flex = torch.compile(flex_attention, dynamic=False)

    def add_mask(score, b, h, q_idx, kv_idx):
        return score + mask[b, 0, q_idx, kv_idx]

    def flexd():
        return torch.stack([flex(q, k[:, :, :span], v[:, :, :span], score_mod=add_mask, scale=scale,
                                 enable_gqa=True) for k, v in zip(ks, vs)]).reshape(L, batch, H, D)

    def efficient():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return sdpa()

    rows, ref = [], None
    kv_bytes = 2 * L * batch * hkv * span * D * torch.empty((), dtype=dtype).element_size()
    for name, fn in (("sdpa (the server's)", sdpa), ("bmm", bmm), ("flex", flexd), ("sdpa efficient", efficient)):
        try:
            ms, out = graph_ms(fn)
        except Exception as exc:  # noqa: BLE001 - a kernel this GPU or torch cannot run is a row that says so
            rows.append(f"| {shape} | {span} | {name} | failed: {type(exc).__name__} | - | - |")
            continue
        ref = out.float() if ref is None else ref
        diff = (out.float() - ref).abs().max().item()
        rows.append(f"| {shape} | {span} | {name} | {ms:.3f} | {kv_bytes / ms / 1e9:.2f} | {diff:.1e} |")
        print(rows[-1], flush=True)
    return rows


def prefill_rows(sizes: list[tuple[int, int]], dtype) -> list[str]:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    dev = torch.device("cuda")
    model = LlamaModel(cfg).to(dev, dtype).eval()

    def prefill(B, T):
        ids = torch.randint(0, 128000, (B, T), device=dev)
        pos = torch.arange(T, device=dev).repeat(B, 1)
        allowed = pos[:, None, :] <= pos[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, torch.finfo(dtype).min)
        return lambda: model(input_ids=ids, position_ids=pos, attention_mask=mask[:, None],
                             use_cache=False).last_hidden_state

    def wall_ms(fn, n=5):
        with torch.inference_mode():
            for _ in range(2):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    flop_per_token = 2 * 218e6 * 4  # the 4 blocks' matrix products
    runs, rows = [(B, T, prefill(B, T)) for B, T in sizes], []
    for label in ("eager", "compiled (dynamic shapes)"):
        if label != "eager":
            for m in [*model.layers, model.norm, model.rotary_emb]:
                m._compiled_call_impl = torch.compile(m._call_impl, dynamic=True)
        for B, T, fn in runs:
            ms = wall_ms(fn)
            rows.append(f"| {B} x {T} | {label} | {ms:.2f} | {ms / 4:.2f} | {B * T * flop_per_token / ms / 1e9:.0f} |")
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="decode rows")
    ap.add_argument("--spans", default="256,1024")
    ap.add_argument("--slot-len", type=int, default=1536, help="positions a KV slot holds")
    ap.add_argument("--prefills", default="64x128,32x128,1x128", help="B x T of each prefill")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_kernels.py needs a CUDA GPU")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    lines = [f"# Decode attention and prefill blocks on {torch.cuda.get_device_name()}, bfloat16", "",
             f"- command: `python benchmarks/bench_decode_kernels.py {' '.join(argv or [])}`",
             f"- torch {torch.__version__}, Python {platform.python_version()}", "",
             f"Decode attention, {args.batch} rows, every layer in one CUDA graph (medians of 50 replays):", "",
             "| shape | span | attention | ms a step (all layers) | KV read, TB/s | max abs diff from sdpa |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for span in (int(s) for s in args.spans.split(",")):
        for shape in SHAPES:
            lines += attention_rows(shape, args.batch, span, args.slot_len, dtype)
    lines += ["", "Prefill through 4 blocks of Llama-3-8B's shape (medians of 5):", "",
              "| B x T | blocks | ms (4 blocks) | ms a block | matrix products, TFLOP/s |",
              "| --- | --- | ---: | ---: | ---: |"]
    lines += prefill_rows([tuple(int(x) for x in s.split("x")) for s in args.prefills.split(",")], dtype)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
