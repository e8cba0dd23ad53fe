"""Prompt sources in every supported format, and their one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mcr_exit.data import load_prompts
from mcr_exit.data.corpus import BUILTIN_PROMPTS
from mcr_exit.errors import DataError

RECORDS = [{"question": "What is 2+2?", "answer": "4", "id": 1}, {"question": "Capital of France?", "answer": "Paris", "id": 2}]


def test_builtin_corpus_mixes_math_prose_and_code():
    p = load_prompts()
    assert len(p.texts) == len(BUILTIN_PROMPTS) >= 30
    assert any("Answer:" in t for t in p.texts) and any("def " in t for t in p.texts)
    assert len(p.digest) == 64 and p.digest == load_prompts().digest
    assert load_prompts(max_prompts=5).texts == p.texts[:5]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_record_formats_with_joined_fields(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    elif fmt == "json":
        path.write_text(json.dumps({"rows": RECORDS}))
    elif fmt == "csv":
        pd.DataFrame(RECORDS).to_csv(path, index=False)
    elif fmt == "tsv":
        pd.DataFrame(RECORDS).to_csv(path, sep="\t", index=False)
    else:
        pd.DataFrame(RECORDS).to_parquet(path)
    p = load_prompts(str(path), field="question,answer")
    assert p.texts == ["What is 2+2?\n4", "Capital of France?\nParis"]
    assert load_prompts(str(path), field="question").texts[1] == "Capital of France?"
    assert load_prompts(str(path)).texts[0] == "What is 2+2?"  # default field: question


def test_txt_is_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(str(path)).texts == ["first prompt", "second prompt"]


def test_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"body": "x"}))
    cases = [
        (lambda: load_prompts(str(empty)), "is empty"),
        (lambda: load_prompts(str(data), field="text"), "field 'text' not found"),
        (lambda: load_prompts(str(data)), "no default text field"),
        (lambda: load_prompts(str(tmp_path / "missing.jsonl")), "does not exist"),
        (lambda: load_prompts(str(tmp_path / "x.xml")), "does not exist"),
        (lambda: load_prompts(max_prompts=0), "at least 1"),
    ]
    for call, text in cases:
        with pytest.raises(DataError, match=text) as info:
            call()
        assert "\n" not in str(info.value)


def test_records_without_the_text_field_are_counted_and_reported(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    rows = [{"id": 0}, {"text": "one"}, {"text": None}, {"text": "two"}, {"body": "x"}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ps = load_prompts(str(path))  # the first record lacks the field; the later ones name it
    assert ps.texts == ["one", "two", ""] and ps.field == "text" and ps.n_missing == 3
    err = capsys.readouterr().err
    assert "skipped 3 of 6 records" in err and "field 'text'" in err
    capsys.readouterr()
    assert load_prompts(str(path), field="text").n_missing == 3
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"text": None, "body": "x"}))
    with pytest.raises(DataError, match="none of its 1 records has a value in field 'text'"):
        load_prompts(str(none))
