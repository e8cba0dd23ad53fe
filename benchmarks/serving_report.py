"""The serving benchmark's report: one Markdown section of tables from ``bench_serving.py``'s measurements
(the server, the in-process engine, the offline anchors, the mixed-load rows and the server's work per phase)."""

from __future__ import annotations

import math
import os
import platform
import sys

import torch

from serving_workloads import identical_share, uvicorn_stack, work_table


def report(args, loaded, k: int, anchors: dict, res: dict, info: dict, n_inputs_tokens: float) -> str:
    dev = torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else \
        (platform.processor() or platform.machine())
    same_texts = sum(a == b for a, b in zip(res["greedy"], anchors["reference_texts"]))
    if args.config:  # the id tokenizer's text is the token ids: compare token by token
        share, prefix = identical_share([[int(t) for t in x.split()] for x in res["greedy"]],
                                        [[int(t) for t in x.split()] for x in anchors["reference_texts"]])
        agreement = f"{share:.1%} of tokens (mean identical prefix {prefix:.1f} tokens)"
    else:
        agreement = f"{same_texts} of {len(res['greedy'])} completions identical"
    emb, first, idle, mixed = res["embed"], res["embed_first"], res["embed_idle"], res["mixed_latency"]
    g = res["gen"]
    eng = anchors["engine"]
    floor = anchors.get("floor_ms")
    lines = [
        f"# Serving: {loaded.spec.name} on {args.device} ({dev}), {loaded.spec.dtype}",
        "",
        f"- command: `python benchmarks/bench_serving.py {' '.join(sys.argv[1:])}`",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"{loaded.n_layers} blocks, embeddings from hidden {k}; weights {anchors['weight_bytes'] / 1e9:.2f} GB",
        f"- server: `benchmarks/serving_models.py serve` (create_app + run_server, as `mcr-exit serve`), a child "
        f"process ({uvicorn_stack()}); engine start-up {info['startup']}; driven over loopback by openai.AsyncOpenAI "
        f"(embeddings base64; the throughput rows' embedding clients and the "
        f"streams from {args.client_procs} client processes, one event loop and client each)",
        f"- embeddings: {emb['sequences']} inputs of ~{n_inputs_tokens:.0f} tokens, "
        f"64 clients x 8 inputs per request; generation: prompts of {args.prompt_len} tokens, "
        f"{args.max_tokens} new tokens, greedy, streamed",
        "",
        "| workload | mcr-exit server (HTTP) | engine in-process (no HTTP) | offline anchor, same device "
        "| server / anchor |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| embeddings, 64 clients, seq/s | {emb['seq_s']:.0f} (p50 {emb['p50_s'] * 1e3:.0f} ms; CPU: server "
        f"{emb.get('server_cpu', math.nan):.0%}, client {emb.get('client_cpu', math.nan):.0%}) | "
        f"{eng.get('embed_seq_s', float('nan')):.0f} | truncated forward B=64 same inputs: {anchors['truncated_seq_s']:.0f} "
        f"(B=64 x 256 tokens: {anchors['truncated_seq_s_256']:.0f}) | {emb['seq_s'] / anchors['truncated_seq_s']:.0%} |",
        f"| same, the first pass ({first['sequences']} inputs, before the row above) | {first['seq_s']:.0f} "
        f"(p50 {first['p50_s'] * 1e3:.0f} ms) | - | - | {first['seq_s'] / anchors['truncated_seq_s']:.0%} |",
    ]
    gen_anchor = anchors["generate_tok_s"]
    for n in args.stream_counts:
        a = gen_anchor.get(n)
        lines.append(f"| generation, {n} stream(s), tokens/s | {g[n]['tok_s']:.0f} (TTFT p50 "
                     f"{(g[n]['ttft_p50_s'] or 0) * 1e3:.0f} ms; CPU: server {g[n]['server_cpu']:.0%}, client "
                     f"{g[n]['client_cpu']:.0%}) | {eng.get(f'gen_{n}', float('nan')):.0f} | "
                     + (f"`generate` B={n}: {a:.0f} | {g[n]['tok_s'] / a:.2f}x |" if a else "- | - |"))
    if floor:
        lines.append(f"| decode-step memory floor | - | - | {floor:.2f} ms per step (weights / "
                     f"{anchors['bandwidth'] / 1e12:.2f} TB/s copy bandwidth): {1e3 / floor:.0f} tokens/s per stream "
                     "| - |")
    under, under_first, again = res["gen_under_embed"], res["gen_under_embed_first"], res["gen_again"]
    most = max(args.stream_counts)
    limit = 3 * idle["p99_s"] + 0.020
    lines += [
        "",
        "| mixed load | value | target |",
        "| --- | ---: | --- |",
        f"| single-input embedding latency, idle: p50 / p99 | {idle['p50_s'] * 1e3:.1f} / {idle['p99_s'] * 1e3:.1f} ms"
        " | - |",
        f"| same, while {most} streams generate: p50 / p99 | {mixed['p50_s'] * 1e3:.1f} / {mixed['p99_s'] * 1e3:.1f} ms "
        f"({mixed['streams_running_at_end']} of {most} streams still running at the end) | p99 <= 3 x idle p99 + 20 ms "
        f"= {limit * 1e3:.1f} ms: {'met' if mixed['p99_s'] <= limit else 'NOT met'} |",
        f"| {most} streams alone, tokens/s: first burst / the same again (TTFT p50) | {g[most]['tok_s']:.0f} / "
        f"{again['tok_s']:.0f} ({(g[most]['ttft_p50_s'] or 0) * 1e3:.0f} / {(again['ttft_p50_s'] or 0) * 1e3:.0f} ms)"
        " | - |",
        f"| {most} streams with embeddings offered at half capacity ({under['embedding_seq_s_offered']:.0f} seq/s), "
        f"tokens/s: the second such burst, against the second burst alone (the first alone) | {under['tok_s']:.0f} "
        f"({under['tok_s'] / again['tok_s'] - 1:+.0%}; {under['tok_s'] / g[most]['tok_s'] - 1:+.0%}) "
        "| fall <= 20 % |",
        f"| same, the first burst under embeddings, against the second alone | {under_first['tok_s']:.0f} "
        f"({under_first['tok_s'] / again['tok_s'] - 1:+.0%}) | - |",
        f"| embeddings served while those streams ran (second / first burst): seq/s; p50 / p99 of the requests "
        f"sent then | {under['embedding_seq_s_served']:.0f}; {under['embedding_p50_s'] * 1e3:.0f} / "
        f"{under['embedding_p99_s'] * 1e3:.0f} ms ({under_first['embedding_seq_s_served']:.0f}; "
        f"{under_first['embedding_p50_s'] * 1e3:.0f} / {under_first['embedding_p99_s'] * 1e3:.0f} ms) | - |",
        f"| greedy tokens identical to `generate` ({len(res['greedy'])} prompts x {args.check_tokens}) | "
        f"{agreement} | - |",
        f"| SIGINT with {most} streams open -> process exited | {res['shutdown_s']:.2f} s | <= 2 s |",
        "",
    ]
    lines += work_table(res["work"])
    return "\n".join(x for x in lines if x is not None)
