"""A small thread-safe Prometheus registry (text exposition format 0.0.4), no extra dependency."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_HELP = {
    "mcr_exit_requests_total": ("counter", "HTTP requests by route and status code."),
    "mcr_exit_request_seconds": ("histogram", "HTTP request latency in seconds, by route."),
    "mcr_exit_queue_depth": ("gauge", "Jobs waiting in the engine queue."),
    "mcr_exit_tokens_total": ("counter", "Tokens processed, by kind (embedding_input, prompt, completion)."),
    "mcr_exit_blocks_executed_total": ("counter", "Transformer block forward calls, by kind (embedding, generation)."),
    "mcr_exit_batches_total": ("counter", "Model forward batches, by kind."),
    "mcr_exit_embedding_block_calls_total": ("counter", "Embedding calls of each block inside vLLM's worker "
                                             "(--engine vllm); blocks after the layer asked for stay at 0."),
    "mcr_exit_vllm_aborted_total": ("counter", "Generation requests aborted in vLLM (client gone, shutdown)."),
    "mcr_exit_cuda_graph_captures_total": ("counter", "CUDA graphs captured while serving, by kind (embedding: "
                                           "embedding batches; fused: decode steps that carry embedding "
                                           "inputs)."),
    "mcr_exit_cuda_graph_capture_seconds_total": ("counter", "Seconds spent capturing those graphs, by kind."),
    "mcr_exit_step_seconds_total": ("counter", "Seconds of the generation lane's steps, by kind (prefill; decode; "
                                    "fused: a decode step that carried embedding inputs); with "
                                    "mcr_exit_batches_total, the mean step time."),
    "mcr_exit_device_wait_seconds_total": ("counter", "Seconds a lane's thread waited for the device to finish, by "
                                           "lane: a generation lane that waits is bound by the device, one that "
                                           "does not by the host."),
    "mcr_exit_forward_lock_wait_seconds_total": ("counter", "Seconds a lane waited for the other's eager forward "
                                                 "(forward_lock), by lane."),
    "mcr_exit_fused_tokens_total": ("counter", "Embedding tokens carried by decode steps (carried), and the token "
                                    "buckets they ran in (bucket: carried plus padding)."),
    "mcr_exit_ready": ("gauge", "1 once the engine has warmed up."),
}


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in labels)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(labels, esc)) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[tuple, list[float]] = {}  # (name, labels) -> bucket counts + [sum, count]

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self._hist.setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, edge in enumerate(LATENCY_BUCKETS):
                if value <= edge:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            names = sorted(set(self._values) | {n for n, _ in self._hist} | set(_HELP))
            for name in names:
                kind, help_ = _HELP.get(name, ("untyped", name))
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                for labels, v in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{name}{_labels(labels)} {v:g}")
                for (hname, labels), h in sorted(self._hist.items()):
                    if hname != name:
                        continue
                    for edge, count in zip(LATENCY_BUCKETS, h):
                        lines.append(f"{name}_bucket{_labels(labels + (('le', f'{edge:g}'),))} {count:g}")
                    lines.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {h[-1]:g}")
                    lines.append(f"{name}_sum{_labels(labels)} {h[-2]:g}")
                    lines.append(f"{name}_count{_labels(labels)} {h[-1]:g}")
        return "\n".join(lines) + "\n"
