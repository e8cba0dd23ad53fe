"""Batched full-depth generation with transformers' ``generate``: per-row limits, stop strings, streaming.

Rows are left-padded into one batch; a streamer routes each new token to its row, and a stopping
criterion ends rows one by one (their own max_tokens, EOS, stop strings, or a cancelled client).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(kw_only=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one generate call (a seeded request runs alone)."""
        return ("seeded", id(self)) if self.seed is not None else (self.temperature, self.top_p)


@dataclass(frozen=True, kw_only=True)
class GenerationOutput:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class _Row:
    def __init__(self, req: GenerationRequest, tokenizer, eos_ids: set[int]):
        self.req, self.tok, self.eos_ids = req, tokenizer, eos_ids
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False
        self.finish_reason = "length"
        self.hold = max((len(s) for s in req.stop), default=1) - 1

    def add(self, token: int) -> None:
        if self.done:
            return
        if self.req.cancelled.is_set():
            self.done = True
            return
        if token in self.eos_ids:
            self.done, self.finish_reason = True, "stop"
        else:
            self.ids.append(token)
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s) for s in self.req.stop if s) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.done, self.finish_reason = self.text[:cut], True, "stop"
            elif len(self.ids) >= self.req.max_tokens:
                self.done = True
        self._emit()

    def _emit(self) -> None:
        if self.req.on_text is None:
            return
        end = len(self.text)
        if not self.done:
            # Hold back what could still become a stop string, and half-decoded UTF-8.
            end = max(self.emitted, end - self.hold)
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end > self.emitted:
            self.req.on_text(self.text[self.emitted:end])
            self.emitted = end


class _Router:
    """Acts as transformers streamer (put/end) and stopping criterion at once."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows
        self.steps = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.steps += 1
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist()):
            row.add(int(token))

    def end(self) -> None:
        for row in self.rows:
            row.done = True
            row._emit()

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([r.done or r.req.cancelled.is_set() for r in self.rows], device=input_ids.device)


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return ids


def generate_batch(model, tokenizer, requests: Sequence[GenerationRequest], *, pad_id: int,
                   device) -> tuple[list[GenerationOutput], int]:
    """Run one batched ``generate`` call; returns the outputs and the number of forward steps."""
    from transformers import StoppingCriteriaList

    first = requests[0]
    eos = eos_ids_of(model, tokenizer)
    rows = [_Row(r, tokenizer, eos) for r in requests]
    router = _Router(rows)
    T = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(requests), T), dtype=torch.long)
    for b, r in enumerate(requests):  # left padding: new tokens follow every prompt directly
        ids[b, T - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[b, T - len(r.prompt_ids):] = 1
    sampling = ({"do_sample": False} if first.temperature == 0 else
                {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p, "top_k": 0})
    kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                  max_new_tokens=max(r.max_tokens for r in requests), pad_token_id=pad_id, eos_token_id=sorted(eos) or None, streamer=router,
                  stopping_criteria=StoppingCriteriaList([router]), **sampling)
    with torch.inference_mode():
        if first.seed is not None:
            devices = [device] if torch.device(device).type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(first.seed)
                model.generate(**kwargs)
        else:
            model.generate(**kwargs)
    outputs = [GenerationOutput(text=row.text, token_ids=row.ids, prompt_tokens=len(row.req.prompt_ids),
                                completion_tokens=len(row.ids), finish_reason=row.finish_reason) for row in rows]
    return outputs, router.steps
