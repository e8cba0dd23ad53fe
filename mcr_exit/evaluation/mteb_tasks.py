"""Offline MTEB tasks built from user files (classification, STS, clustering, retrieval), and mteb's own by name.

File formats (any of .jsonl .json .csv .tsv .parquet):
  classification  text, label [, split = train|test]   (no split column: seeded 70/30 split)
  sts             sentence1, sentence2, score
  clustering      text, label
  retrieval       query, document   (each query's document is its one relevant document; the corpus is
                                     every distinct document)
The text and label columns of classification and clustering files can have other names
(``text_field``, ``label_field``; ``--text-field``/``--label-field`` on the command line, as for probes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mcr_exit.data.sources import _records_from_file
from mcr_exit.errors import ConfigError, DataError, MissingExtraError
from mcr_exit.evaluation.configs import MTEB_KINDS, parse_custom_spec  # noqa: F401  (defined there, once)

KINDS = MTEB_KINDS
_FIELDS = {
    "classification": ("text", "label"), "sts": ("sentence1", "sentence2", "score"),
    "clustering": ("text", "label"), "retrieval": ("query", "document"),
}
_MAIN = {"classification": "accuracy", "sts": "cosine_spearman", "clustering": "v_measure", "retrieval": "ndcg_at_10"}


def _mteb():
    try:
        import mteb
    except ImportError as exc:
        raise MissingExtraError("mteb", "eval") from exc
    return mteb


def read_task_file(kind: str, path: str | Path, *, text_field: str = "text", label_field: str = "label") -> list[dict]:
    """Records with the kind's fields under their standard names (text/label columns renamed)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown custom task kind '{kind}': use {', '.join(KINDS)}")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"task file does not exist: {path}")
    records = _records_from_file(p)
    columns = {"text": text_field, "label": label_field}
    wanted = [columns.get(name, name) for name in _FIELDS[kind]]
    if not records or not isinstance(records[0], dict):
        raise DataError(f"{p}: needs records with fields {', '.join(wanted)}")
    for name in wanted:
        if name not in records[0]:
            raise DataError(f"{p}: {kind} column '{name}' not found; available: {', '.join(map(str, records[0]))}")
    if kind in ("classification", "clustering"):
        records = [{**r, "text": r[text_field], "label": r[label_field]} for r in records]
    if kind in ("classification", "clustering") and len({str(r["label"]) for r in records}) < 2:
        raise DataError(f"{p}: a single class; {kind} needs at least two labels")
    return records


def _metadata(name: str, kind: str, path: Path):
    from mteb.abstasks.task_metadata import TaskMetadata

    return TaskMetadata(
        name=name, type={"sts": "STS"}.get(kind, kind.capitalize()), main_score=_MAIN[kind],
        description=f"mcr-exit custom {kind} task from {path.name}", reference=None,
        dataset={"path": str(path.resolve()), "revision": "local"}, category="t2t", eval_splits=["test"],
        eval_langs=["eng-Latn"], date=None, dialect=[], domains=[], task_subtypes=[], license="not specified",
        annotations_creators=None, modalities=["text"], sample_creation="found", bibtex_citation="",
    )


def _classification(records: list[dict], seed: int):
    from datasets import Dataset, DatasetDict

    texts, labels = [str(r["text"]) for r in records], [str(r["label"]) for r in records]
    classes = sorted(set(labels))
    y = [classes.index(v) for v in labels]
    if "split" in records[0]:
        is_test = np.array([str(r["split"]) == "test" for r in records])
    else:
        is_test = np.zeros(len(records), bool)
        is_test[np.random.default_rng(seed).permutation(len(records))[: max(1, round(0.3 * len(records)))]] = True

    def part(mask):
        return Dataset.from_dict({"text": [t for t, m in zip(texts, mask) if m], "label": [v for v, m in zip(y, mask) if m]})

    return DatasetDict({"train": part(~is_test), "test": part(is_test)})


def _retrieval(records: list[dict]):
    from datasets import Dataset

    docs = sorted({str(r["document"]) for r in records})
    doc_id = {d: f"d{i}" for i, d in enumerate(docs)}
    queries = [{"id": f"q{i}", "text": str(r["query"])} for i, r in enumerate(records)]
    relevant = {f"q{i}": {doc_id[str(r["document"])]: 1} for i, r in enumerate(records)}
    split = {"queries": Dataset.from_list(queries), "corpus": Dataset.from_list([{"id": doc_id[d], "text": d} for d in docs]),
             "relevant_docs": relevant, "top_ranked": None}
    return {"default": {"test": split}}


def custom_task(kind: str, path: str | Path, *, name: str | None = None, seed: int = 123,
                text_field: str = "text", label_field: str = "label"):
    """An mteb task object whose data comes from ``path`` (no Hub access)."""
    records = read_task_file(kind, path, text_field=text_field, label_field=label_field)
    _mteb()
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification
    from mteb.abstasks.clustering import AbsTaskClustering
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.sts import AbsTaskSTS

    p = Path(path).expanduser()
    task_name = name or f"McrExit{kind.capitalize()}_{p.stem}"
    base = {"classification": AbsTaskClassification, "sts": AbsTaskSTS, "clustering": AbsTaskClustering,
            "retrieval": AbsTaskRetrieval}[kind]
    attrs: dict = {"metadata": _metadata(task_name, kind, p)}
    if kind == "sts":
        scores = [float(r["score"]) for r in records]
        attrs.update(min_score=min(scores), max_score=max(scores))
    if kind == "clustering":
        # embed every document (mteb's default embeds 4 %), one clustering run per label set size
        attrs.update(max_fraction_of_documents_to_embed=None, max_document_to_embed=None, n_clusters=1)

    def load_data(self, num_proc=None, **kwargs):
        if kind == "classification":
            self.dataset = _classification(records, seed)
        elif kind == "sts":
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [str(r["sentence1"]) for r in records], "sentence2": [str(r["sentence2"]) for r in records],
                "score": [float(r["score"]) for r in records]})})
        elif kind == "clustering":
            labels = [str(r["label"]) for r in records]
            classes = sorted(set(labels))
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentences": [str(r["text"]) for r in records], "labels": [classes.index(v) for v in labels]})})
        else:
            self.dataset = _retrieval(records)
        self.data_loaded = True

    attrs["load_data"] = load_data
    return type(task_name, (base,), attrs)()


def named_tasks(names: list[str]) -> list:
    """mteb's own tasks by name; an unknown name is a one-line ConfigError with a suggestion."""
    mteb = _mteb()
    out = []
    for n in names:
        try:
            out.append(mteb.get_task(n))
        except Exception as exc:  # noqa: BLE001 - mteb raises KeyError/ValueError with long text
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"mteb does not know the task '{n}': {first[:200]}") from exc
    return out


def load_task_data(tasks: list) -> None:
    """Load every task's data now (before the model): a task that cannot be loaded, e.g. a Hub task
    offline, is a one-line DataError instead of a traceback after the model has loaded."""
    for task in tasks:
        if getattr(task, "data_loaded", False):
            continue
        try:
            task.load_data()
        except Exception as exc:  # noqa: BLE001 - datasets/huggingface_hub raise many types, all reported alike
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"cannot load the data of mteb task '{task.metadata.name}': {first[:200]} "
                            "(offline? use --custom-task KIND:FILE for local data)") from exc
