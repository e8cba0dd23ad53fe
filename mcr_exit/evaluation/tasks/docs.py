"""Dataset loader for the bundled lm-eval tasks (referenced from the YAML as ``!function docs.load``).

lm-eval imports this file from the YAML's own folder, so the data path resolves wherever the command
runs. ``data_file`` (from ``dataset_kwargs``) may be absolute, or relative to this folder.
"""

from __future__ import annotations

import json
from pathlib import Path


def load(data_file: str, **_metadata):
    from datasets import Dataset, DatasetDict

    path = Path(data_file).expanduser()
    if not path.is_absolute():
        path = Path(__file__).resolve().parent / path
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})
