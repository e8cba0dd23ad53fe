"""The ```bash blocks of the README and the docs run as pasted.

Every block is checked statically: bash syntax, no comment after a line-continuation backslash (which
ends the command there), and every `mcr-exit` option it names exists. Blocks of RUN_DOCS are then run,
in order, one folder per document, by bash with `mcr-exit` on PATH and $MCR_EXIT_MODEL set to a tiny
random model with SmolLM2's 30 blocks, so hidden and block indices in the docs stay valid. A block that
cannot run offline on a CPU follows a line ``<!-- docs-test: skip (why) -->`` and is only checked.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from mcr_exit.cli import main

REPO = Path(__file__).resolve().parents[2]
RUN_DOCS = ("README.md", "docs/ablation.md", "docs/downstream.md", "docs/metrics.md")
CHECK_DOCS = RUN_DOCS + ("docs/serving.md",)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # why it is not run

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def shell_blocks(doc: str) -> list[Block]:
    """The ```bash blocks of a Markdown file, each with the skip reason written on the line before it."""
    lines = (REPO / doc).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
            m = SKIP.search(prev)
            blocks.append(Block(doc, i + 1, "\n".join(lines[i + 1:end]) + "\n", m.group("why") if m else None))
            i = end
        i += 1
    return blocks


def mcr_exit_calls(code: str) -> list[list[str]]:
    """The argument lists of every `mcr-exit ...` command in a block (continuations joined, comments cut)."""
    words = []
    for line in code.replace("\\\n", " ").splitlines():
        if re.search(r"(^|[;&|]\s*)mcr-exit\s", line.strip()):  # other lines may hold multi-line quotes
            words += shlex.split(line, comments=True, posix=True) + [";"]
    calls, current = [], None
    for w in words:
        if w in (";", "&&", "||", "|") or w.endswith(";"):
            if current is not None:
                calls.append(current + ([w[:-1]] if w.endswith(";") and w != ";" else []))
            current = None
        elif current is not None:
            current.append(w)
        elif w == "mcr-exit":
            current = []
    return calls


ALL_BLOCKS = [b for doc in CHECK_DOCS for b in shell_blocks(doc)]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_block_is_well_formed(block):
    syntax = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    assert syntax.returncode == 0, f"{block.id}: {syntax.stderr}"
    for n, line in enumerate(block.code.splitlines(), start=block.line + 1):
        assert not re.search(r"\\\s+\S", line), f"{block.id}: line {n} has text after a backslash: {line!r}"
        assert not re.search(r"\\\s+$", line), f"{block.id}: line {n} has spaces after its backslash"
    for args in mcr_exit_calls(block.code):
        if not args or args[0].startswith("-"):
            continue
        assert args[0] in main.commands, f"{block.id}: no command 'mcr-exit {args[0]}'"
        try:
            main.commands[args[0]].make_context(args[0], args[1:])
        except click.UsageError as exc:
            pytest.fail(f"{block.id}: mcr-exit {' '.join(args)}: {exc.format_message()}")


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_every_fence_names_its_language(doc):
    """An untagged fence would hide a shell command from these tests: each says bash, python or text."""
    fences = [line.strip() for line in (REPO / doc).read_text().splitlines() if line.strip().startswith("```")]
    openings = fences[0::2]
    assert all(f in ("```bash", "```python", "```text") for f in openings), f"{doc}: {openings}"


def test_skips_say_why_and_most_blocks_run():
    run = [b for doc in RUN_DOCS for b in shell_blocks(doc)]
    assert all(b.skip is None or len(b.skip) > 10 for b in run)
    assert sum(b.skip is None for b in run) >= 6
    assert "lm-eval" in (REPO / "docs/downstream.md").read_text()


def _corpus_tokenizer():
    """Byte-level BPE with a vocabulary learnt on the built-in corpus, so its prompts stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mcr_exit.data.corpus import BUILTIN_PROMPTS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(BUILTIN_PROMPTS), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    """PATH with mcr-exit, mcr-exit-lm-eval and python from this checkout; $MCR_EXIT_MODEL = a tiny model."""
    from tests.tiny import build_tiny_model

    tokenizer = _corpus_tokenizer()
    model_dir = tmp_path_factory.mktemp("tiny-llama-30")
    build_tiny_model("llama", len(tokenizer), n_layers=30).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, module in (("mcr-exit", "mcr_exit"), ("mcr-exit-lm-eval", "mcr_exit.evaluation.lmeval_cli")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=str(REPO), MCR_EXIT_MODEL=str(model_dir),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               # one thread per process: a tiny model gains nothing from more, and on a busy machine
               # oversubscribed threads make each run 20x slower
               OMP_NUM_THREADS="1")
    return env


@pytest.mark.parametrize("doc", [d for d in RUN_DOCS if any(b.skip is None for b in shell_blocks(d))])
def test_blocks_run_as_pasted(doc, docs_env, tmp_path):
    for block in shell_blocks(doc):
        if block.skip is not None:
            continue
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=tmp_path, env=docs_env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{block.id} failed:\n{block.code}\n{proc.stderr[-3000:]}"
