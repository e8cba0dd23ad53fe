"""The engine's worker loop: take jobs, pack embedding inputs under a token budget, batch generation.

Runs only on the engine's worker thread; every model call in the server happens here.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from mcr_exit.models.forward import hidden_at
from mcr_exit.models.tokens import collate, length_batches
from mcr_exit.serving.errors import RequestTimeout
from mcr_exit.serving.generation import GenerationRequest, generate_batch
from mcr_exit.serving.pooling import pool_hidden

log = logging.getLogger("mcr_exit.serving")


def _take(engine) -> list:
    """All waiting embedding jobs, plus up to max_gen_batch generation jobs that can share a batch."""
    with engine._cond:
        while not engine._queue and not engine._stopping:
            engine._cond.wait()
        if engine._stopping:
            return []
        taken, kept, gen_key, n_gen = [], [], None, 0
        for job in engine._queue:
            if job.kind == "embed":
                taken.append(job)
            elif n_gen < engine.config.max_gen_batch and gen_key in (None, job.payload.batch_key()):
                gen_key, n_gen = job.payload.batch_key(), n_gen + 1
                taken.append(job)
            else:
                kept.append(job)
        engine._queue.clear()
        engine._queue.extend(kept)
        engine.metrics.set("mcr_exit_queue_depth", len(kept))
        return taken


def _alive(jobs: list) -> list:
    """Drop jobs whose client gave up or whose deadline passed (their futures get the reason)."""
    out, now = [], time.monotonic()
    for job in jobs:
        if job.future.done() or job.cancelled.is_set():
            continue
        if now > job.deadline:
            job.future.set_exception(RequestTimeout("the request timed out in the queue"))
            continue
        out.append(job)
    return out


def run_embed_jobs(engine, jobs: list) -> None:
    """Pack every input of every job into forward batches (grouped by layer, sorted by length)."""
    cfg, adapter, device = engine.config, engine.loaded.adapter, engine.loaded.input_device
    results = {id(job): [None] * len(job.payload.ids) for job in jobs}
    by_layer: dict[int, list[tuple]] = defaultdict(list)
    for job in jobs:
        for i, ids in enumerate(job.payload.ids):
            by_layer[job.payload.layer].append((job, i, ids))
    for layer, items in by_layer.items():
        for batch in length_batches([len(x[2]) for x in items], cfg.max_batch_tokens, cfg.max_batch_size):
            rows = [items[i] for i in batch]
            input_ids, mask = collate([r[2] for r in rows], engine.pad_id, device)
            hidden = hidden_at(adapter, input_ids, mask, layer)  # blocks layer+1.. never run
            pooled: dict[tuple, torch.Tensor] = {}
            for b, (job, i, _) in enumerate(rows):
                key = (job.payload.pooling, job.payload.normalize)
                if key not in pooled:
                    pooled[key] = pool_hidden(hidden, mask, key[0], normalize=key[1]).cpu()
                results[id(job)][i] = pooled[key][b]
            engine.metrics.inc("mcr_exit_blocks_executed_total", layer, kind="embedding")
            engine.metrics.inc("mcr_exit_batches_total", kind="embedding")
            engine.metrics.inc("mcr_exit_tokens_total", int(mask.sum()), kind="embedding_input")
    for job in jobs:
        if not job.future.done():
            job.future.set_result(torch.stack(results[id(job)]))


def run_generate_jobs(engine, jobs: list) -> None:
    requests: list[GenerationRequest] = [job.payload for job in jobs]
    if engine.generator is not None:
        outputs = engine.generator.generate(requests)
        steps = max((o.completion_tokens for o in outputs), default=0)  # vLLM hides its steps: one per token
    else:
        outputs, steps = generate_batch(engine.loaded.model, engine.loaded.tokenizer, requests,
                                        pad_id=engine.pad_id, device=engine.loaded.input_device)
    engine.metrics.inc("mcr_exit_blocks_executed_total", steps * engine.n_layers, kind="generation")
    engine.metrics.inc("mcr_exit_batches_total", kind="generation")
    for job, out in zip(jobs, outputs):
        engine.metrics.inc("mcr_exit_tokens_total", out.prompt_tokens, kind="prompt")
        engine.metrics.inc("mcr_exit_tokens_total", out.completion_tokens, kind="completion")
        if not job.future.done():
            job.future.set_result(out)


def _fail(jobs: list, exc: BaseException) -> None:
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(exc)


def warm_up(engine) -> None:
    """One embedding forward and one generated token, so the first request does not pay for lazy init."""
    from concurrent.futures import Future

    from mcr_exit.serving.engine import _EmbedPayload, _Job

    ids = engine.encode_texts(["Warm-up: the quick brown fox."])
    embed = _Job(kind="embed", future=Future(), deadline=float("inf"),
                 payload=_EmbedPayload(ids=ids, layer=engine.embedding_layer, pooling="mean", normalize=True))
    run_embed_jobs(engine, [embed])
    gen = _Job(kind="generate", future=Future(), deadline=float("inf"),
               payload=GenerationRequest(prompt_ids=ids[0], max_tokens=1, temperature=0.0))
    run_generate_jobs(engine, [gen])


def run_worker(engine) -> None:
    if engine.config.warmup:
        try:
            warm_up(engine)
        except Exception:  # noqa: BLE001 - a failed warm-up must not kill the server; requests will show it
            log.exception("warm-up failed")
    engine._ready.set()
    engine.metrics.set("mcr_exit_ready", 1)
    while True:
        jobs = _take(engine)
        if not jobs:
            if engine._stopping:
                break
            continue
        jobs = _alive(jobs)
        embeds = [j for j in jobs if j.kind == "embed"]
        gens = [j for j in jobs if j.kind == "generate"]
        for group, runner in ((embeds, run_embed_jobs), (gens, run_generate_jobs)):
            if not group:
                continue
            try:
                runner(engine, group)
            except Exception as exc:  # noqa: BLE001 - the request gets a 500, the worker lives on
                log.exception("%s batch failed", group[0].kind)
                _fail(group, exc)
    engine.metrics.set("mcr_exit_ready", 0)
