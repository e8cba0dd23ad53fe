"""Prompt sources: the built-in corpus, local files (.jsonl .json .csv .tsv .txt .parquet) and hf: datasets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mcr_exit.data.corpus import BUILTIN_NAME, BUILTIN_PROMPTS
from mcr_exit.errors import DataError, MissingExtraError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
_DEFAULT_FIELDS = ("text", "prompt", "sentence", "content", "question")


@dataclass(frozen=True, kw_only=True)
class PromptSet:
    name: str
    source: str
    texts: list[str]
    field: str | None
    n_missing: int = 0  # records skipped: no value in the text field(s)

    @property
    def digest(self) -> str:
        """sha256 of the prompts, in order (identifies exactly what was analysed)."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()


def _records_from_file(path: Path) -> list:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise DataError(f"{path}: a JSON object must hold exactly one list of records")
                data = lists[0]
            if not isinstance(data, list):
                raise DataError(f"{path}: JSON must be a list of records or strings")
            return data
        if suffix == ".txt":
            return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        import pandas as pd

        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", quoting=3 if suffix == ".tsv" else 0)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise DataError(f"unsupported data file type '{suffix}': use one of {', '.join(FILE_SUFFIXES)}")
        return df.to_dict(orient="records")
    except DataError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    except Exception as exc:  # pandas parser errors and the like
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def select_texts(records: list, field: str | None, where: str) -> tuple[list[str], str | None, int]:
    """Pick the text of each record: (texts, field used, records skipped for having no value in the field).
    ``field`` may name several fields joined by commas. Skipped records are reported on stderr."""
    if not records:
        raise DataError(f"{where} is empty")
    if all(isinstance(r, str) for r in records):
        if field:
            raise DataError(f"{where} holds plain strings: --field '{field}' does not apply")
        return list(records), None, 0
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{where}: records must all be objects (or all strings)")
    available = list(dict.fromkeys(k for r in records for k in r))  # every record's keys, in order
    if field is None:
        field = next((f for f in _DEFAULT_FIELDS if f in available), None)
        if field is None:
            raise DataError(f"{where}: no default text field; pass --field, one of: {', '.join(map(str, available))}")
    names = [f.strip() for f in field.split(",") if f.strip()]
    for name in names:
        if name not in available:
            raise DataError(f"{where}: field '{name}' not found; available: {', '.join(map(str, available))}")
    texts, missing = [], 0
    for r in records:
        parts = [r.get(n) for n in names]
        if all(p is None or p != p for p in parts):  # absent, null or NaN in every text field
            missing += 1
            continue
        texts.append("\n".join("" if p is None or p != p else str(p) for p in parts))
    if not texts:
        raise DataError(f"{where}: none of its {len(records)} records has a value in field '{field}'")
    if missing:
        _say(f"mcr-exit: skipped {missing} of {len(records)} records of {where} without a value "
             f"in field '{field}'")
    return texts, field, missing


def _say(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def _load_hf(spec: str) -> tuple[list, str, str | None]:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    field = parts[3] if len(parts) > 3 and parts[3] else None
    try:
        import datasets
    except ImportError as exc:
        raise MissingExtraError("datasets", "eval") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - the Hub's errors vary; one line for the user
        raise DataError(f"cannot load Hub dataset '{spec}': {str(exc).splitlines()[0]}") from exc
    return list(ds), f"hf:{name}", field


def load_prompts(data: str | None = None, *, field: str | None = None, max_prompts: int | None = None) -> PromptSet:
    """Load prompts. ``data=None`` is the built-in corpus; ``hf:NAME[:config][:split][:field]`` a Hub dataset."""
    if max_prompts is not None and max_prompts < 1:
        raise DataError(f"--max-prompts must be at least 1, got {max_prompts}")
    if data is None:
        if field:
            raise DataError("--field applies only with --data")
        texts, name, source, used, missing = list(BUILTIN_PROMPTS), BUILTIN_NAME, "mcr-exit:builtin", None, 0
    elif data.startswith("hf:"):
        records, name, hf_field = _load_hf(data[3:])
        texts, used, missing = select_texts(records, field or hf_field, data)
        source = data
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"data file does not exist: {data}")
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(f"unsupported data file type '{path.suffix}': use one of {', '.join(FILE_SUFFIXES)}")
        texts, used, missing = select_texts(_records_from_file(path), field, str(path))
        name, source = path.stem, str(path.resolve())
    if max_prompts is not None:
        texts = texts[:max_prompts]
    return PromptSet(name=name, source=source, texts=texts, field=used, n_missing=missing)
