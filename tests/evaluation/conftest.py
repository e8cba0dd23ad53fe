"""Small task files written by the tests (into tmp_path) and a tiny loaded Llama."""

from __future__ import annotations

import json

import pytest

POS = ["I loved this film", "a wonderful warm story", "great acting and a fine plot", "truly delightful",
       "the best movie this year", "charming and funny", "a beautiful happy ending", "superb work"]
NEG = ["I hated this film", "a dull cold story", "bad acting and a weak plot", "truly awful",
       "the worst movie this year", "boring and sad", "an ugly miserable ending", "terrible work"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_llama(tiny_models, tokenizer):
    from mcr_exit.models import from_objects

    return from_objects(tiny_models["llama"], tokenizer, name="tiny-llama")


@pytest.fixture
def sentiment_rows():
    rows = [{"sentence": f"{t} {i}", "label": 1} for i in range(3) for t in POS]
    rows += [{"sentence": f"{t} {i}", "label": 0} for i in range(3) for t in NEG]
    return rows


@pytest.fixture
def sentiment_tsv(tmp_path, sentiment_rows):
    path = tmp_path / "sentiment.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in sentiment_rows))
    return path


@pytest.fixture
def mteb_files(tmp_path, sentiment_rows):
    cls = write_jsonl(tmp_path / "cls.jsonl", [{"text": r["sentence"], "label": r["label"]} for r in sentiment_rows])
    sts = write_jsonl(tmp_path / "sts.jsonl", [
        {"sentence1": p, "sentence2": p + " indeed" if i % 2 else n, "score": float(4 * (i % 2))}
        for i, (p, n) in enumerate(zip(POS, NEG))])
    clu = write_jsonl(tmp_path / "clu.jsonl", [{"text": f"apples and pears {i}", "label": "fruit"} for i in range(6)]
                      + [{"text": f"def f{i}(x): return x", "label": "code"} for i in range(6)])
    ret = write_jsonl(tmp_path / "ret.jsonl", [{"query": f"which film was {t.split()[-1]}?", "document": t} for t in POS])
    return {"classification": cls, "sts": sts, "clustering": clu, "retrieval": ret}


@pytest.fixture
def mc_file(tmp_path):
    rows = [{"question": f"What is {a} plus {a}?", "choices": [str(2 * a), str(2 * a + 1), str(2 * a + 3)], "answer": 0}
            for a in range(1, 7)]
    return write_jsonl(tmp_path / "doubles.jsonl", rows)
