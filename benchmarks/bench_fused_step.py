"""What a decode step costs the GPU when it carries embedding inputs (serving/fused_step.py), by the tokens it
carries, next to the plain decode step and the truncated forward that runs the same inputs on their own.

The engine is started as the server starts it (pool, warm-up, decode graphs, fused steps); then, with no
request running, B slots are filled at one position and each step is timed with CUDA events over many
replays (on a GPU the graphs the server replays, no host work between them):

- the plain decode step of B rows (span bucket ``--span``);
- the fused step carrying E packed tokens (inputs of ``--input-tokens`` each), for each E of ``--tokens``;
- the truncated forward to layer k of the same inputs as one padded batch (``hidden_at``, eager: the
  embedding lane's path beside generation), and of 64 inputs (its per-token cost at a full batch).

"extra per token" is (fused step - decode step) / E: what one carried token costs generation. Against the
truncated forward's per-token cost it says whether the fused step's shared weight reads save anything.

    python benchmarks/bench_fused_step.py --config llama-3-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_models import DEFAULT_LAYER, load  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn, repeats: int, cuda: bool) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls (after one untimed call): CUDA events on a GPU."""
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _inputs(total: int, each: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    """Inputs of ``each`` tokens (the last one shorter) with ``total`` tokens in all."""
    out, left = [], total
    while left > 0:
        n = min(each, left)
        out.append(torch.randint(3, vocab, (n,), generator=gen).tolist())
        left -= n
    return out


def _kernels(fn, repeats: int) -> dict[str, float]:
    """Device microseconds per call of ``fn``, by kernel name (torch.profiler; kernels of graph replays too)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        _sync()
    out: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.name] = out.get(ev.name, 0.0) + ev.device_time / repeats
    return out


def kernel_table(decode, fused, E: int, repeats: int) -> list[str]:
    """Where the fused step's extra device time goes: per kernel name, decode step against fused step."""
    a, b = _kernels(decode, repeats), _kernels(fused, repeats)
    names = sorted(set(a) | set(b), key=lambda n: -(b.get(n, 0.0) - a.get(n, 0.0)))
    lines = ["", f"Kernels of one step (device us, means of {repeats} replays): the plain decode step against the "
                 f"fused step carrying E = {E} tokens, by the fused step's extra; total "
                 f"{sum(a.values()):.0f} us against {sum(b.values()):.0f} us.", "",
             "| kernel | decode, us | fused, us | extra, us |", "| --- | ---: | ---: | ---: |"]
    for n in names[:15]:
        short = n if len(n) <= 90 else n[:87] + "..."
        lines.append(f"| `{short}` | {a.get(n, 0.0):.1f} | {b.get(n, 0.0):.1f} | {b.get(n, 0.0) - a.get(n, 0.0):.1f} |")
    return lines


def gemm_table(cfg, batch: int, rows: list[int], device: str, dtype, repeats: int, cuda: bool) -> list[str]:
    """One block's matrix products (q, k, v, o, gate, up, down; weights as the model's) timed alone by rows M:
    whether more rows in the same products cost the GPU anything."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    ws = [torch.randn(n, k, device=device, dtype=dtype) for k, n in shapes]
    lines = ["", f"One block's seven matrix products alone, by rows M (weights {sum(w.numel() * w.element_size() for w in ws) / 1e6:.0f} "
                 f"MB in {dtype}; medians of {repeats}): {batch} rows are the decode rows.", "",
             "| rows M | us | extra over M = " + str(batch) + ", us per row |", "| ---: | ---: | ---: |"]
    base = None
    for m in [batch] + [r for r in rows if r != batch]:
        xs = {k: torch.randn(m, k, device=device, dtype=dtype) for k in {k for k, _ in shapes}}
        us = 1e3 * _time_ms(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in ws], repeats, cuda)
        base = us if base is None else base
        lines.append(f"| {m} | {us:.1f} | {(us - base) / max(1, m - batch):.2f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama-3-8b", help="Random weights of this shape (serving_models.py).")
    p.add_argument("--model", default=None, help="A model path instead of --config.")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layer", type=int, default=None, help="The embedding layer k (default: the config's).")
    p.add_argument("--batch", type=int, default=64, help="Decode rows B.")
    p.add_argument("--span", type=int, default=256, help="Positions each decode row attends over.")
    p.add_argument("--tokens", default="64,128,192,256,384,512,768,1024", help="Carried tokens E to time.")
    p.add_argument("--input-tokens", type=int, default=150, help="Tokens of each carried input.")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--profile", type=int, default=None, metavar="E",
                   help="Also profile the kernels of the plain decode step and of the fused step carrying E tokens "
                        "(torch.profiler over graph replays), and time the block's matrix products by rows.")
    p.add_argument("--fused-compile", default="shared",
                   help="How the fused step's blocks run, one table each: shared (the decode steps' compiled modules, "
                        "dynamic shapes), static (compiled for each step shape), eager; comma-separated.")
    p.add_argument("--output", default=None, help="Also write the report (markdown) here.")
    args = p.parse_args()
    cuda = torch.device(args.device).type == "cuda"  # on a CPU the steps run eagerly (a smoke test)

    from mcr_exit.models.forward import hidden_at
    from mcr_exit.models.tokens import collate
    from mcr_exit.serving import Engine, EngineConfig

    tokens = sorted({int(t) for t in args.tokens.split(",")})
    loaded = load(args.config, args.model, args.device, args.dtype)
    k = args.layer if args.layer is not None else DEFAULT_LAYER.get(args.config, loaded.n_layers // 2)
    cfg = EngineConfig(max_input_tokens=512, max_new_tokens=512, kv_cache_tokens=args.batch * 1024,
                       max_batch_size=max(args.batch, 64), fuse_embeddings="auto" if cuda else "on", fused_embed_tokens=max(tokens))
    t0 = time.perf_counter()
    engine = Engine(loaded, None, cfg, embedding_layer=k)
    engine.start()
    if not engine.wait_ready(900) or engine.startup_error:
        raise SystemExit(f"bench_fused_step.py: the engine did not start: {engine.startup_error}")
    startup = time.perf_counter() - t0
    st, fused = engine.stepper, engine.scheduler.fused
    if fused is None:
        raise SystemExit("bench_fused_step.py: the engine runs no fused steps (no decode graphs?)")
    fused.buckets = tokens  # time exactly these E
    gen = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    rows, profile = [], []
    try:
        with torch.inference_mode():
            slots = [st.pool.alloc() for _ in range(args.batch)]
            first = torch.randint(3, vocab, (args.batch,), generator=gen).to(args.device)
            st.feed(slots, first, [args.span - 1] * args.batch)
            decode_ms = _time_ms(lambda: st.step(args.batch, args.span), args.repeats, cuda)
            full = _inputs(64 * args.input_tokens, args.input_tokens, vocab, gen)
            ids, mask = collate(full, engine.pad_id, args.device)
            full_ms = _time_ms(lambda: hidden_at(st.adapter, ids, mask, k), max(5, args.repeats // 5), cuda)
            per_token_full = 1e3 * full_ms / (64 * args.input_tokens)
            alone = {}
            for mode in args.fused_compile.split(","):
                fused.compile = mode
                fused.graphs.clear()  # captured again in this mode
                for E in tokens:
                    inputs = _inputs(E, args.input_tokens, vocab, gen)
                    got, _, _ = fused.load(inputs)
                    assert got == E, (got, E)
                    c0 = time.perf_counter()
                    fused.run(args.batch, args.span, E)  # captured here (and compiled, "static"), untimed
                    _sync()
                    capture_s = time.perf_counter() - c0
                    fused_ms = _time_ms(lambda: fused.run(args.batch, args.span, E), args.repeats, cuda)
                    if E not in alone:
                        ids, mask = collate(inputs, engine.pad_id, args.device)
                        alone[E] = _time_ms(lambda: hidden_at(st.adapter, ids, mask, k), max(5, args.repeats // 5),
                                            cuda)
                    rows.append((mode, E, len(inputs), fused_ms, fused_ms - decode_ms,
                                 1e3 * (fused_ms - decode_ms) / E, alone[E], 1e3 * alone[E] / E, capture_s))
                if args.profile:
                    E = fused.bucket(args.profile)
                    got, _, _ = fused.load(_inputs(E, args.input_tokens, vocab, gen))
                    profile += [f"", f"Blocks of the fused step: {mode}."]
                    profile += kernel_table(lambda: st.step(args.batch, args.span),
                                            lambda: fused.run(args.batch, args.span, E), E, args.repeats)
            if args.profile:
                profile += gemm_table(loaded.model.config, args.batch, sorted({args.batch + e for e in tokens}),
                                      args.device, st.dtype, args.repeats, cuda)
    finally:
        engine.stop()

    dev = torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "CPU"
    name = args.config or args.model
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    lines = [
        f"# Fused decode steps: {name} on {dev}, {args.dtype}",
        "",
        f"- command: `python benchmarks/bench_fused_step.py {' '.join(sys.argv[1:])}`",
        f"- torch {torch.__version__}, Python {platform.python_version()}; {loaded.n_layers} blocks, embeddings "
        f"from hidden {k}; weights {weights / 1e9:.2f} GB; engine start-up {startup:.1f} s",
        f"- decode rows B = {args.batch} at span {args.span}; carried inputs of {args.input_tokens} tokens; "
        f"medians of {args.repeats} graph replays (CUDA events)",
        "",
        f"Plain decode step: **{decode_ms:.2f} ms**. Truncated forward of 64 inputs x {args.input_tokens} tokens "
        f"on its own: {full_ms:.1f} ms, {per_token_full:.1f} us per token.",
        "",
        "| fused step's blocks | carried tokens E | inputs | fused step, ms | extra over decode, ms "
        "| extra per token, us | same inputs alone (eager), ms | alone per token, us | first capture, s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, E, n, f, extra, per, alone_ms, alone_per, cap in rows:
        lines.append(f"| {mode} | {E} | {n} | {f:.2f} | {extra:.2f} | {per:.1f} | {alone_ms:.2f} | {alone_per:.1f} "
                     f"| {cap:.2f} |")
    text = "\n".join(lines + profile) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
