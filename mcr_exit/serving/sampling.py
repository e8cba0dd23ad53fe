"""Next-token choice on the device for a batch of rows with their own temperature, top-p and seed.

Greedy rows take the argmax. Sampled rows draw by the exponential-race form of the categorical
distribution: argmax(p / E) with E ~ Exp(1) i.i.d. picks index i with probability p_i, so one argmax
serves every row and a seeded row only needs its own noise generator.
"""

from __future__ import annotations

import torch

from mcr_exit.models.tokens import to_device

# Below this temperature a row is greedy: dividing logits by a denormal would give inf / NaN.
MIN_TEMPERATURE = 1e-4


def is_greedy(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


def sample_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, on the logits' device."""
    greedy = logits.argmax(-1)
    sampled_rows = [b for b, t in enumerate(temperatures) if not is_greedy(t)]
    if not sampled_rows:
        return greedy
    idx = to_device(torch.tensor(sampled_rows), logits.device)
    temps = to_device(torch.tensor([temperatures[b] for b in sampled_rows], dtype=torch.float32), logits.device)
    probs = torch.softmax(logits[idx].float() / temps[:, None], dim=-1)
    top_p = to_device(torch.tensor([top_ps[b] for b in sampled_rows], dtype=torch.float32), logits.device)
    if any(top_ps[b] < 1 for b in sampled_rows):  # decided on the host: no wait for the GPU
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    noise = torch.empty_like(probs)
    for r, b in enumerate(sampled_rows):
        noise[r].exponential_(generator=generators[b])
    choice = (probs / noise).argmax(-1)
    out = greedy.clone()
    out[idx] = choice
    return out


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class HostCopy:
    """Tokens chosen on the device, brought to the host. ``start`` queues the copy (into pinned memory on
    CUDA) and returns at once; ``wait`` waits in ``Event.synchronize``, which lets go of the GIL (a blocking
    ``tolist`` of a CUDA tensor may spin while holding it), so the HTTP event loop and the embedding lane
    keep running while the GPU finishes the step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self, tokens: torch.Tensor):
        if not self.cuda:
            return tokens.tolist()
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)  # from torch's pinned-block cache
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def wait(self, started) -> list[int]:
        if not self.cuda:
            return started
        host, event = started
        event.synchronize()
        return host.tolist()
