"""lm-eval through the LogitLens at hidden index k: the model ``mcr-exit-lens``, and bundled tasks.

Python:  ``lm_eval.simple_evaluate(model=LensLM(loaded=..., layer=k), tasks=[...], task_manager=task_manager())``
CLI:     ``python -m mcr_exit.evaluation.lmeval_cli --model mcr-exit-lens --model_args layer=12
           --tasks mcr_capitals --include_path $(python -m mcr_exit.evaluation.lmeval_cli --print-task-dir)``
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mcr_exit.errors import ConfigError, DataError, MissingExtraError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_TASKS = ("mcr_capitals", "mcr_opposites", "mcr_arithmetic")
MODEL_NAME = "mcr-exit-lens"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise MissingExtraError("lm-eval", "eval") from exc
    return HFLM


def user_task_dir(files: list[str], out: Path | None = None) -> Path:
    """A folder of lm-eval YAMLs, one per multiple-choice .jsonl file (question, choices, answer),
    with the data path written absolute so the task runs from any working directory."""
    out = Path(out or tempfile.mkdtemp(prefix="mcr-exit-lmeval-"))
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        path = Path(f).expanduser().resolve()
        if not path.exists():
            raise DataError(f"task file does not exist: {f}")
        first = json.loads(next(line for line in open(path, encoding="utf-8") if line.strip()))
        for key in ("question", "choices", "answer"):
            if key not in first:
                raise DataError(f"{path}: multiple-choice field '{key}' not found; available: {', '.join(first)}")
        name = "mcr_user_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        (out / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path))}\n"
            "output_type: multiple_choice\ntest_split: test\n"
            'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'
            "metadata:\n  version: 1.0\n", encoding="utf-8")
    return out


def task_manager(extra_dirs: list[Path] | None = None, include_defaults: bool = False):
    """A TaskManager that knows the bundled tasks (and lm-eval's own when include_defaults)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR)] + [str(p) for p in (extra_dirs or [])]
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def _build_lens_class():
    HFLM = _lm_eval()
    from lm_eval.api.registry import register_model

    @register_model(MODEL_NAME)
    class LensLM(HFLM):
        """HFLM whose logits are unembed(ln_final(hidden[layer])), computed through run_blocks.

        model_args: layer (hidden index, default = last), model (id, folder or .gguf; default
        $MCR_EXIT_MODEL, else the built-in SmolLM2, as for ``mcr-exit``), revision, dtype, bos
        (auto|force|none), batch_size, max_length.
        """

        def __init__(self, pretrained=None, *, layer=None, model=None, loaded=None, revision=None, dtype="auto",
                     device="cpu", bos="auto", batch_size=1, max_length=None, **kwargs):
            from mcr_exit.models.loading import load_model
            from mcr_exit.models.bos_choice import decide_bos

            if loaded is None:
                src = model or (pretrained if isinstance(pretrained, str) and pretrained else None)
                src = src or os.environ.get("MCR_EXIT_MODEL") or None
                loaded = load_model(src, revision=revision, dtype=dtype, device=device)
            self.loaded = loaded
            L = loaded.adapter.n_layers
            self.layer = L if layer in (None, "") else int(layer)
            if not 0 <= self.layer <= L:
                raise ConfigError(f"layer {self.layer} is out of range: this model has hidden states 0..{L}")
            self._bos = decide_bos(loaded, bos)
            super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal",
                             batch_size=int(batch_size), max_length=max_length,
                             device=str(loaded.input_device), **kwargs)

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            ids = super().tok_encode(string, add_special_tokens=add_special_tokens, **kwargs)
            if self._bos.prepend and (not ids or ids[0] != self._bos.token_id):
                ids = [self._bos.token_id, *ids]
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _model_call(self, inps, attn_mask=None, labels=None):
            from mcr_exit.evaluation.lens import lens_logits
            from mcr_exit.models.forward import hidden_at

            adapter = self.loaded.adapter
            with torch.inference_mode():
                h = hidden_at(adapter, inps, torch.ones_like(inps), self.layer)
                return lens_logits(adapter, h)

    return LensLM


_LENS_CLASS = None


def lens_lm_class():
    """The registered LensLM class (built once; importing lm-eval is slow, so not at import time)."""
    global _LENS_CLASS
    if _LENS_CLASS is None:
        _LENS_CLASS = _build_lens_class()
    return _LENS_CLASS


@contextmanager
def quiet_stderr(keep_chars: int = 8000):
    """Hold back what is written to stderr (Python's and the file descriptor's) and show it only on error.

    For every layer lm-eval writes progress bars, the same warnings and git's complaints about the
    working directory; the sweep's own progress bar says what matters.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as raw, io.StringIO() as text:
        os.dup2(raw.fileno(), 2)
        failed = True
        try:
            with redirect_stderr(text):
                yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                raw.seek(0)
                held = raw.read().decode("utf-8", "replace") + text.getvalue()
                sys.stderr.write(held[-keep_chars:])


def evaluate_layer(loaded, layer: int, tasks: list[str], *, tm=None, limit=None, batch_size: int = 8,
                   bos: str = "auto", quiet: bool = True) -> dict[str, float]:
    """Accuracy (acc and acc_norm) per task at one hidden index, through lm-eval's own evaluator.

    quiet: hold back lm-eval's own output (progress bars, warnings) unless the layer fails.
    """
    import lm_eval

    with quiet_stderr() if quiet else nullcontext():
        lm = lens_lm_class()(loaded=loaded, layer=layer, bos=bos, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm or task_manager(), limit=limit,
                                      log_samples=False, verbosity="ERROR", bootstrap_iters=0)
    scores = {}
    for task, res in out["results"].items():
        for key in ("acc", "acc_norm"):
            if f"{key},none" in res:
                scores[f"{task}/{key}"] = float(res[f"{key},none"])
    return scores


@dataclass(frozen=True, kw_only=True)
class LmevalSweep:
    layers: list[int]
    tasks: list[str]
    scores: list[dict[str, float]]  # per layer: "task/acc" and "task/acc_norm"
    config: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [{"layer": k, **s} for k, s in zip(self.layers, self.scores)]


def lmeval_sweep(loaded, tasks: list[str], *, layers=None, task_files: list[str] | None = None, limit=None,
                 batch_size: int = 8, bos: str = "auto", include_defaults: bool = False,
                 progress_factory=None) -> LmevalSweep:
    """lm-eval at every requested hidden index (each run executes only the first k blocks).

    progress_factory(total) -> update(n), if given, is told each time a layer is done.
    """
    from mcr_exit.evaluation.features import check_layers

    wanted = check_layers(layers, loaded.adapter.n_layers)
    extra = [user_task_dir(task_files)] if task_files else []
    tm = task_manager(extra, include_defaults=include_defaults)
    names = list(tasks) + [p.stem for d in extra for p in sorted(d.glob("*.yaml"))]
    if not names:
        raise ConfigError("no lm-eval task: give --task or --task-file")
    known = set(tm.all_tasks)
    for n in names:
        if n not in known:
            raise ConfigError(f"lm-eval does not know the task '{n}' (bundled: {', '.join(BUNDLED_TASKS)}; "
                              "use --include-defaults for lm-eval's own tasks)")
    advance = progress_factory(len(wanted)) if progress_factory else None
    scores = []
    for k in wanted:
        scores.append(evaluate_layer(loaded, k, names, tm=tm, limit=limit, batch_size=batch_size, bos=bos))
        if advance:
            advance(1)
    return LmevalSweep(layers=wanted, tasks=names, scores=scores,
                       config={"limit": limit, "batch_size": batch_size, "bos": bos})
