"""The configs of the downstream commands (lens, probe, mteb, lmeval, choose-layer).

Each holds every option of its command and checks itself when built, so a bad value is a one-line
``ConfigError`` naming the option before any data or model is read. This module imports nothing heavy.

Pipeline of each command (see commands.py, writers.py, results.log_curve_run): config -> inputs read ->
model loaded and MLflow run opened -> library function returns a result -> one writer -> logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mcr_exit.errors import ConfigError
from mcr_exit.vocabulary import BOS_POLICIES, DEFAULT_POOLING, EMBEDDING_MAX_LENGTH, POOLING_ALIASES, POOLINGS

MTEB_KINDS = ("classification", "sts", "clustering", "retrieval")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")


def parse_layers(text: str | None) -> list[int] | None:
    """'all' / None -> None (every hidden index); '0,4,8' -> list; 'A:B[:S]' -> range(A, B+1, S)."""
    if text is None or text.strip() in ("", "all"):
        return None
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            start, stop, step = parts[0], parts[1], parts[2] if len(parts) > 2 else 1
            if step < 1 or len(parts) > 3:
                raise ValueError
            return list(range(start, stop + 1, step))
        return [int(p) for p in text.split(",") if p.strip()]
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"--layers must be 'all', 'A,B,C' or 'START:STOP[:STEP]', got '{text}'") from exc


def parse_custom_spec(spec: str) -> tuple[str, str]:
    """'KIND:PATH' -> (kind, path)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in MTEB_KINDS or not path:
        raise ConfigError(f"--custom-task must be KIND:PATH with KIND one of {', '.join(MTEB_KINDS)}, got '{spec}'")
    return kind, path


def _at_least(option: str, value, low) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{option} must be at least {low}, got {value}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What every downstream command that loads a model shares: the model, BOS, layers, outputs, MLflow."""

    model: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    bos: str = "auto"
    layers: str = "all"  # hidden indices: all, 0,4,8 or START:STOP[:STEP]
    batch_size: int = 8
    output_dir: str | None = None
    tracking_uri: str | None = None
    experiment: str = "mcr-exit"
    mlflow: bool = True

    def __post_init__(self):
        if self.bos not in BOS_POLICIES:
            raise ConfigError(f"--bos must be one of {', '.join(BOS_POLICIES)}, got '{self.bos}'")
        parse_layers(self.layers)
        _at_least("--batch-size", self.batch_size, 1)

    @property
    def hidden_indices(self) -> list[int] | None:
        """The requested hidden indices (None: every one)."""
        return parse_layers(self.layers)


@dataclass(frozen=True, kw_only=True)
class LensConfig(EvalConfig):
    data: str | None = None
    field: str | None = None
    window: int = 256
    max_windows: int | None = 32
    batch_size: int = 4
    chunk_tokens: int = 512

    def __post_init__(self):
        super().__post_init__()
        _at_least("--window", self.window, 2)
        _at_least("--max-windows", self.max_windows, 1)
        _at_least("--chunk-tokens", self.chunk_tokens, 1)


@dataclass(frozen=True, kw_only=True)
class _EmbeddingConfig(EvalConfig):
    pooling: str = DEFAULT_POOLING
    max_length: int = EMBEDDING_MAX_LENGTH
    batch_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "pooling", POOLING_ALIASES.get(self.pooling, self.pooling))
        if self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {', '.join(POOLINGS)}, got '{self.pooling}'")
        _at_least("--max-length", self.max_length, 2)


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(_EmbeddingConfig):
    train_file: str
    test_file: str | None = None
    text_field: str = "sentence"
    label_field: str = "label"
    max_examples: int | None = None
    test_fraction: float = 0.3
    seed: int = 123
    c: float = 1.0
    cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        _at_least("--max-examples", self.max_examples, 1)
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not self.c > 0:
            raise ConfigError(f"--C must be > 0, got {self.c}")


@dataclass(frozen=True, kw_only=True)
class MtebConfig(_EmbeddingConfig):
    tasks: tuple[str, ...] = ()
    custom: tuple[str, ...] = ()  # KIND:FILE
    text_field: str = "text"
    label_field: str = "label"
    normalize: bool = True
    profile_path: str | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "custom", tuple(self.custom))
        if not self.tasks and not self.custom:
            raise ConfigError("no MTEB task: give --task NAME or --custom-task KIND:FILE")
        for spec in self.custom:
            parse_custom_spec(spec)

    @property
    def custom_specs(self) -> list[tuple[str, str]]:
        return [parse_custom_spec(s) for s in self.custom]


@dataclass(frozen=True, kw_only=True)
class LmevalConfig(EvalConfig):
    tasks: tuple[str, ...] = ()  # none (and no task file): the bundled tasks
    task_files: tuple[str, ...] = ()
    include_defaults: bool = False
    limit: int | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "task_files", tuple(self.task_files))
        _at_least("--limit", self.limit, 1)


@dataclass(frozen=True, kw_only=True)
class ChooseLayerConfig:
    profile_path: str
    lens_file: str | None = None
    lmeval_file: str | None = None
    probe_file: str | None = None
    mteb_file: str | None = None
    figure: str | None = None  # default: figure8_downstream.png next to the profile
    dry_run: bool = False

    def __post_init__(self):
        if not str(self.profile_path).strip():
            raise ConfigError("--profile must name a phase_profile.json")
        if self.figure is not None and Path(self.figure).suffix.lower() not in FIGURE_SUFFIXES:
            raise ConfigError(f"--figure must end in one of {', '.join(FIGURE_SUFFIXES)}, got '{self.figure}'")

    @property
    def curve_files(self) -> dict[str, str | None]:
        return {"lens": self.lens_file, "lmeval": self.lmeval_file, "probe": self.probe_file, "mteb": self.mteb_file}

    @property
    def figure_path(self) -> Path:
        return Path(self.figure) if self.figure else Path(self.profile_path).parent / "figure8_downstream.png"
