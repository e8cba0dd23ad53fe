"""Writes the bundled multiple-choice sets into mcr_exit/evaluation/tasks/ (run once; the .jsonl files
are committed): ``python scripts/make_task_data.py``.

Each record: {"question": str, "choices": [str, ...], "answer": index of the right choice}.
Distractors are drawn with a fixed seed, so the files are reproducible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest",
    "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "Turkey": "Ankara", "Iran": "Tehran", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cuba": "Havana",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Australia": "Canberra",
    "India": "New Delhi", "South Korea": "Seoul", "Ukraine": "Kyiv", "Czech Republic": "Prague",
    "Romania": "Bucharest", "Colombia": "Bogota", "Iceland": "Reykjavik",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "rich": "poor", "young": "old",
    "strong": "weak", "wet": "dry", "loud": "quiet", "high": "low", "true": "false", "thick": "thin",
    "clean": "dirty", "first": "last", "inside": "outside", "win": "lose", "buy": "sell", "push": "pull",
    "day": "night", "north": "south", "love": "hate", "begin": "end", "heavy": "light", "long": "short",
}


def _mc(question: str, answer: str, pool: list[str], rng: random.Random, n: int = 4) -> dict:
    others = rng.sample([p for p in pool if p != answer], n - 1)
    choices = others + [answer]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(answer)}


def build(folder: Path) -> None:
    rng = random.Random(123)
    sets = {
        "capitals": [_mc(f"What is the capital of {c}?", a, list(CAPITALS.values()), rng) for c, a in CAPITALS.items()],
        "opposites": [_mc(f"What is the opposite of the word '{w}'?", a, sorted(set(OPPOSITES.values())), rng)
                      for w, a in OPPOSITES.items()],
        "arithmetic": [],
    }
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        pool = [str(a + b + d) for d in range(-6, 7) if a + b + d > 0]
        sets["arithmetic"].append(_mc(f"What is {a} plus {b}?", str(a + b), pool, rng))
    for name, rows in sets.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    build(Path(__file__).resolve().parent.parent / "mcr_exit" / "evaluation" / "tasks")
