"""`mcr-exit ablate` as a pipeline: ``AblateConfig`` validates itself, ``ablate`` does the work and
returns an ``AblationRun``; ``writers.write_ablation`` writes it and ``run_logs.log_ablation`` logs it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mcr_exit.analysis.ablation import AblationOutcome, run_ablation
from mcr_exit.errors import ConfigError


def parse_clip(clip: str | tuple | None) -> tuple[float, ...] | None:
    """--clip: None (no clipping), 'auto' (a sweep: ()), or values such as '100,1000'."""
    if clip is None or isinstance(clip, tuple):
        values = clip
    elif clip.strip().lower() == "auto":
        values = ()
    else:
        values = []
        for part in clip.split(","):
            try:
                values.append(float(part))
            except ValueError:
                raise ConfigError(f"--clip: cannot read '{part}' (use auto or values such as 100,1000)") from None
        values = tuple(values)
    for g in values or ():
        if not g > 0:
            raise ConfigError(f"clipping value must be > 0, got {g:g}")
    return values


@dataclass(frozen=True, kw_only=True)
class AblateConfig:
    layers: str = "auto"  # "auto" or block list such as "0,5-7"
    clip: tuple[float, ...] | str | None = None  # None: no clipping; () or "auto": automatic sweep
    clip_layer: int | None = None  # hidden index; default: right after the last ablated block
    tau: float = 0.3
    batch_size: int = 8
    auto_prompts: int = 8  # prompts used to find the spike's blocks
    # what the command loads, where it writes and logs
    model: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    bos: str = "auto"
    data: str | None = None
    field: str | None = None
    max_prompts: int | None = None
    max_length: int = 1024
    output_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str = "mcr-exit"
    mlflow: bool = True
    plots: bool = True

    def __post_init__(self):
        object.__setattr__(self, "clip", parse_clip(self.clip))
        if not 0 < self.tau <= 1:
            raise ConfigError(f"--tau must be in (0, 1], got {self.tau}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2, got {self.max_length}")
        if not self.layers.strip():
            raise ConfigError("--layers: no block given (use e.g. 0,5-7 or auto)")


@dataclass(frozen=True, kw_only=True)
class AblationRun:
    outcome: AblationOutcome
    note: str | None  # position 0 holds no special token in some prompts
    params: dict
    provenance: dict
    name: str  # the MLflow run name
    title: str
    output_dir: Path
    run_id: str | None
    seconds: float


def position0_note(tokenizer, position0: dict[str, int]) -> str | None:
    """A warning when position 0 of some prompts holds no special token (allowed, but said)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    plain = {tok: n for tok, n in position0.items() if tok not in special}
    if not plain:
        return None
    n = sum(plain.values())
    return (f"position 0 holds no special token in {n} of {sum(position0.values())} prompts "
            f"(e.g. {next(iter(plain))!r}): the ablation acts on the first text token")


def ablate(cfg: AblateConfig, *, loaded=None, on_note=None, on_result=None) -> AblationRun:
    """Load, check the blocks before any run opens, then run the variants inside one MLflow run (children
    per variant), write the outputs and log them. ``on_note(str)`` and ``on_result(VariantResult)`` report
    progress to the caller."""
    from mcr_exit.analysis.run import default_output_dir, preflight
    from mcr_exit.analysis.run_logs import log_ablation
    from mcr_exit.analysis.writers import write_ablation
    from mcr_exit.data import load_prompts
    from mcr_exit.models import load_model
    from mcr_exit.models.surgery import check_block, parse_blocks
    from mcr_exit.models.bos_choice import decide_bos
    from mcr_exit.models.tokens import encode_prompts
    from mcr_exit.tracking import maybe_run, run_name, run_tags

    t0 = time.time()
    preflight(cfg.output_dir, mlflow=cfg.mlflow, tracking_uri=cfg.tracking_uri)
    prompts = load_prompts(cfg.data, field=cfg.field, max_prompts=cfg.max_prompts)
    loaded = loaded or load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=cfg.device)
    if cfg.layers.strip().lower() != "auto":
        parse_blocks(cfg.layers, loaded.n_layers)  # fail before any run is opened
    if cfg.clip_layer is not None:
        check_block(cfg.clip_layer - 1, loaded.n_layers)
    bos = decide_bos(loaded, cfg.bos)
    enc = encode_prompts(loaded.tokenizer, prompts.texts, bos, cfg.max_length)
    note = position0_note(loaded.tokenizer, enc.position0)
    if note and on_note:
        on_note(note)
    spec = loaded.spec
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir("ablate-", spec.name)
    params = {"model": spec.name, "revision": spec.revision or "", "dtype": spec.dtype, "layers": cfg.layers,
              "bos_policy": bos.policy, "dataset_name": prompts.name, "dataset_sha256": prompts.digest,
              "n_prompts": len(enc.ids), "bos_token": bos.token or "", "tau": cfg.tau}
    provenance = {"model": spec.name, "revision": spec.revision, "data": prompts.name, "n_prompts": len(enc.ids),
                  "position0_note": note, "position0_tokens": enc.position0}
    name = run_name("ablate", spec.name, revision=spec.revision, bos=bos.policy, data=prompts.name,
                    dtype=spec.dtype, extra=f"blocks={cfg.layers}")
    tags = run_tags("ablate", model=spec.name, revision=spec.revision, bos=bos.policy, data=prompts.name,
                    dtype=spec.dtype)
    with maybe_run(cfg.mlflow, tracking_uri=cfg.tracking_uri, experiment=cfg.experiment, run_name=name,
                   tags=tags) as logger:
        if logger is not None:
            logger.log_dataset(prompts.texts, name=prompts.name, source=prompts.source, digest=prompts.digest,
                               context="ablation")
        outcome = run_ablation(loaded, enc.ids, cfg, on_result=on_result)
        result = AblationRun(outcome=outcome, note=note, params=params, provenance=provenance, name=name,
                             title=f"{spec.name} on {prompts.name} ({len(enc.ids)} prompts)", output_dir=out_dir,
                             run_id=logger.run_id if logger else None, seconds=time.time() - t0)
        write_ablation(result, out_dir, plots=cfg.plots)
        if logger is not None:
            log_ablation(logger, result, tracking_uri=cfg.tracking_uri, experiment=cfg.experiment)
    return result
