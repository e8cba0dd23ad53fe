"""Derive the custom MTEB task files used in analysis/downstream from the shared data (written outside the repo).

    python analysis/downstream/make_mteb_tasks.py /tmp/i4/mteb_tasks

classification: SST-2 dev sentences, 300 rows (seeded 70/30 split inside the task)
clustering:     3 sources (SST-2 review, GSM8K question, WikiText-2 sentence), 60 each
retrieval:      GSM8K question -> its worked answer, 100 pairs
"""

from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

DATA = Path("/work/shared/data")


def main(out: Path) -> None:
    rng = random.Random(123)
    out.mkdir(parents=True, exist_ok=True)
    with open(DATA / "sst2/dev.tsv", encoding="utf-8") as f:
        sst = [r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    with open(DATA / "gsm8k/train.jsonl", encoding="utf-8") as f:
        gsm = [json.loads(line) for line, _ in zip(f, range(400))]
    wiki = [s.strip() for s in (DATA / "wikitext2/test.txt").read_text(encoding="utf-8").split(" . ")
            if 60 < len(s.strip()) < 300 and "=" not in s]

    def write(name, rows):
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write("sst2_classification", [{"text": r["sentence"], "label": r["label"]} for r in sst[:300]])
    clusters = ([{"text": r["sentence"], "label": "review"} for r in rng.sample(sst, 60)]
                + [{"text": g["question"], "label": "math"} for g in rng.sample(gsm, 60)]
                + [{"text": s + " .", "label": "encyclopedia"} for s in rng.sample(wiki, 60)])
    write("source_clustering", clusters)
    write("gsm8k_retrieval", [{"query": g["question"], "document": g["answer"].split("####")[0].strip()}
                              for g in gsm[:100]])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
