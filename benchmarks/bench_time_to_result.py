"""Time to first result of `mcr-exit analyze`: what a user waits for, each step in a fresh process.

    python benchmarks/bench_time_to_result.py --device cpu --mlflow --output benchmarks/results/time_to_result_cpu.md
    python benchmarks/bench_time_to_result.py --device cuda --long-prompts 16 --prompt-tokens 1024 \\
        --output time_to_result_h200.md

Rows (wall-clock seconds of a new process, measured from outside it; ``--compare-with DIR`` adds the
same command from an older source tree, run right after, for a before/after on the same machine and load):
* ``analyze --help``;
* ``analyze``, first run: new process tree, empty mcr-exit cache and empty Triton cache (a fresh machine);
* ``analyze``, second run (and later runs): the caches filled by the first, run by the warm process the
  first run left behind (``mcr_exit.warm``; the benchmark waits until it answers, and reports how long
  after the first run that was);
* the same with ``--no-plots``;
* a second run without the warm process (``MCR_EXIT_WARM=0``): every run's imports in its own process;
* ``load_model`` alone, in a new process, from the cache (the call, and the process with its imports), and
  through transformers' own GGUF loader without the cache (what every load cost before the cache);
* a bare forward (SDPA, no statistics) over the same prompts in the same batches, first call and warm.

The analyze rows run with ``--verbose``; their time by stage is printed below the table. Default data:
the built-in corpus (the default command); ``--long-prompts N`` instead writes N prompts of at least
``--prompt-tokens`` tokens, each the built-in texts joined from a different start, truncated by
``--max-length``. ``--model`` takes a .gguf file (default: the built-in SmolLM2 GGUF).

Python's bytecode: an installed package has it, so imports read compiled ``.pyc`` files. An environment
that sets ``PYTHONDONTWRITEBYTECODE`` over packages shipped without ``__pycache__`` compiles torch,
sympy and transformers from source in every new process, seconds a user of a normal install never waits.
There ``mcr-exit`` keeps the bytecode under its cache folder (``mcr_exit/bytecode.py``): the first run,
with an empty cache, compiles and writes it; every later process reads it. The report says which case it
measured, and in that case adds a row: the first run again with only the bytecode kept (model and Triton
caches emptied), the first run of a user whose install has its bytecode. ``--pycache-prefix DIR``
measures with bytecode in DIR from the start instead (every child gets ``PYTHONPYCACHEPREFIX=DIR``
without ``PYTHONDONTWRITEBYTECODE``, after one process that imports the load path and the analysis to
fill it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class StepFailed(Exception):
    pass


def run(cmd: list[str], env: dict, label: str) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=env["BENCH_CWD"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        raise StepFailed(f"failed (exit code {proc.returncode}): {last}")
    return wall, proc.stdout


def stages(stdout: str) -> str:
    """The --verbose block (``time by stage:`` to the end)."""
    i = stdout.find("time by stage")
    return stdout[i:].rstrip() if i >= 0 else "(no breakdown)"


def wait_warm(env: dict, py: list[str], rows: list, timeout: float = 300.0) -> None:
    """Until the warm process that the first run started answers; the row is the seconds that took."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        _, out = run(py + ["-m", "mcr_exit", "warm", "status"], env, "warm status")
        if "(this environment)" in out:
            line = next(x for x in out.splitlines() if "(this environment)" in x)
            rows.append(("the warm process answers, after the first run ended", time.perf_counter() - t,
                         line.split("modules")[-1].strip() + " modules imported"))
            return
        time.sleep(0.5)
    raise StepFailed(f"no warm process answered within {timeout:.0f} s")


def long_prompts(n: int, tokens: int, folder: Path) -> Path:
    from mcr_exit.data.corpus import BUILTIN_PROMPTS

    texts = list(BUILTIN_PROMPTS)
    path = folder / f"long-{n}x{tokens}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            parts, k = [], i
            while sum(len(p) for p in parts) < tokens * 5:  # ~4 characters per token: enough to truncate
                parts.append(texts[k % len(texts)])
                k += 1
            f.write(json.dumps({"text": "\n\n".join(parts)}) + "\n")
    return path


LOAD_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from mcr_exit.models import load_model
from mcr_exit.timing import StageTimer
t1 = time.perf_counter()
timer = StageTimer()
with timer.active():
    loaded = load_model({model!r}, device={device!r}, dtype={dtype!r})
if {device!r}.startswith("cuda"):
    import torch; torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "stages": timer.stages}}))
"""

TRANSFORMERS_SNIPPET = """
import json, time, torch
t0 = time.perf_counter()
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
p = Path({path!r})
t1 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
t2 = time.perf_counter()
lm = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=getattr(torch, {dtype!r}))
lm = lm.to({device!r})
if {device!r}.startswith("cuda"):
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "tokenizer_s": t2 - t1, "model_s": t3 - t2, "load_s": t3 - t1}}))
"""

FORWARD_SNIPPET = """
import json, time, torch
from mcr_exit.data import load_prompts
from mcr_exit.models import load_model
from mcr_exit.models.tokens import collate, encode_prompts, length_batches, pad_id_of, resolve_bos
loaded = load_model({model!r}, device={device!r}, dtype={dtype!r})
prompts = load_prompts({data!r})
enc = encode_prompts(loaded.tokenizer, prompts.texts, resolve_bos(loaded.tokenizer, "auto"), {max_length})
batches = list(length_batches([len(x) for x in enc.ids], 8192, 8))
def sync():
    if {device!r}.startswith("cuda"):
        torch.cuda.synchronize()
def forward():
    sync(); t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            ids, mask = collate([enc.ids[i] for i in b], pad_id_of(loaded.tokenizer), loaded.input_device)
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)
    sync(); return time.perf_counter() - t
first = forward()
warm = min(forward() for _ in range(3))
print(json.dumps({{"first_s": first, "warm_s": warm, "prompts": len(enc.ids),
                  "tokens": sum(len(x) for x in enc.ids), "max_tokens": max(len(x) for x in enc.ids)}}))
"""


def load_rows(args, dtype, env, py, rows) -> None:
    snippet = LOAD_SNIPPET.format(model=args.model, device=args.device, dtype=dtype)
    wall, stdout = run(py + ["-c", snippet], env, "load_model")
    load = json.loads(stdout.strip().splitlines()[-1])
    parts = ", ".join(f"{k.removeprefix('load_model.')} {v:.2f}" for k, v in load["stages"].items())
    rows.append(("`load_model` alone, from the cache, new process: the call", load["load_s"], parts))
    rows.append(("  the same process, imports and exit included", wall, f"imports {load['import_s']:.2f} s"))


def transformers_rows(args, model, dtype, env, py, rows) -> None:
    snippet = TRANSFORMERS_SNIPPET.format(path=model, device=args.device, dtype=dtype)
    _, stdout = run(py + ["-c", snippet], env, "transformers GGUF load")
    tf = json.loads(stdout.strip().splitlines()[-1])
    rows.append(("GGUF through transformers' loader, no cache (every load before the cache)", tf["load_s"],
                 f"tokenizer {tf['tokenizer_s']:.2f}, model {tf['model_s']:.2f}"))


def forward_rows(args, dtype, data, env, py, rows) -> None:
    snippet = FORWARD_SNIPPET.format(model=args.model, device=args.device, dtype=dtype, data=data,
                                     max_length=args.max_length)
    _, stdout = run(py + ["-c", snippet], env, "bare forward")
    fw = json.loads(stdout.strip().splitlines()[-1])
    shape = f"{fw['prompts']} prompts, {fw['tokens']} tokens (longest {fw['max_tokens']})"
    rows.append(("bare forward over the same prompts (SDPA), first call", fw["first_s"], shape))
    rows.append(("  warm (fastest of 3)", fw["warm_s"], ""))


def kept_by_mcr_exit(env: dict, py: list[str]) -> bool:
    """Whether ``mcr_exit.bytecode`` keeps the children's bytecode: asked of a child with their environment."""
    proc = subprocess.run(py + ["-c", "from mcr_exit.bytecode import keep_bytecode; print(keep_bytecode())"],
                          env=env, capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip() not in ("", "None")


def bytecode_note(env: dict, kept: bool) -> str:
    """Whether the children import from bytecode (see the module's description)."""
    if env.get("PYTHONPYCACHEPREFIX"):
        return f"Bytecode: read and written under PYTHONPYCACHEPREFIX ({env['PYTHONPYCACHEPREFIX']})."
    if kept:
        return ("Bytecode: PYTHONDONTWRITEBYTECODE is set and mcr-exit keeps the bytecode under its cache folder "
                "(mcr_exit/bytecode.py; here torch ships without __pycache__, or MCR_EXIT_BYTECODE=on), so the "
                "first run compiles torch, sympy and transformers from source and writes their bytecode there, "
                "and later processes read it.")
    if env.get("PYTHONDONTWRITEBYTECODE"):
        return ("Bytecode: not written, and not kept by mcr-exit (torch ships its __pycache__, or "
                "MCR_EXIT_BYTECODE=off).")
    return "Bytecode: written beside the sources on first import, or shipped with the packages."


def first_run_with_bytecode(work: Path, analyze) -> None:
    """The first run again, with mcr-exit's model cache and Triton's cache emptied and only the Python
    bytecode kept (``<cache>/pycache``)."""
    for entry in (work / "cache").iterdir():
        if entry.name != "pycache":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    shutil.rmtree(work / "triton", ignore_errors=True)
    analyze("`analyze`, first run with the bytecode kept (model and Triton caches emptied again)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default=None, help=".gguf file (default: the built-in SmolLM2 GGUF)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--long-prompts", type=int, default=0)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--mlflow", action="store_true", help="log to a fresh sqlite store (the default command does)")
    ap.add_argument("--repeats", type=int, default=2, help="second-run repeats (the fastest is reported)")
    ap.add_argument("--output", default=None, help="also write the report (markdown) here")
    ap.add_argument("--workdir", default=None, help="an empty folder for the caches and outputs (default: a new "
                                                      "temporary one)")
    ap.add_argument("--skip-transformers-load", action="store_true",
                    help="leave out the uncached load through transformers' GGUF loader (slow)")
    ap.add_argument("--compare-with", default=None, metavar="DIR",
                    help="also time `analyze` (first and second run) from another source tree of mcr-exit, e.g. "
                         "`git archive <commit> | tar -x -C DIR` of the version before")
    ap.add_argument("--pycache-prefix", default=None, metavar="DIR",
                    help="children write and read bytecode under DIR (PYTHONPYCACHEPREFIX), filled by one process "
                         "first: for environments that do not write bytecode (see above)")
    args = ap.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mcr-ttr-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MCR_EXIT_CACHE=str(work / "cache"), TRITON_CACHE_DIR=str(work / "triton"),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               BENCH_CWD=str(work), PYTHONUNBUFFERED="1", MCR_EXIT_WARM="1", MCR_EXIT_WARM_DIR=str(work / "warm"))
    if args.pycache_prefix:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(Path(args.pycache_prefix).resolve())
    py = [sys.executable]
    if args.pycache_prefix:
        run(py + ["-c", "import mcr_exit.cli.analyze, mcr_exit.analysis.run, mcr_exit.analysis.plots, mcr_exit.models.loading, "
                  "transformers.models.llama.modeling_llama, transformers.models.auto.tokenization_auto"],
            env, "bytecode")
    sys.path.insert(0, str(ROOT))
    from mcr_exit.models.loading import default_model_file, resolve_dtype

    model = args.model or str(default_model_file())
    dtype = str(resolve_dtype(args.dtype, args.device)).removeprefix("torch.")
    data = args.data or (str(long_prompts(args.long_prompts, args.prompt_tokens, work)) if args.long_prompts else None)
    common = ["--device", args.device, "--dtype", dtype, "--max-length", str(args.max_length), "--verbose"]
    common += ["--model", model] if args.model else []
    common += ["--data", data] if data else []
    common += ["--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"] if args.mlflow else ["--no-mlflow"]
    rows, details = [], []

    def analyze(label: str, *extra: str, run_env: dict | None = None) -> float:
        out = work / f"out-{len(rows)}"
        wall, stdout = run(py + ["-m", "mcr_exit", "analyze", *common, "--output-dir", str(out), *extra],
                           run_env or env, label)
        rows.append((label, wall, ""))
        details.append(f"### {label}: {wall:.2f} s wall\n\n```\n{stages(stdout)}\n```")
        return wall

    def step(label: str, fn) -> None:
        try:
            fn()
        except StepFailed as exc:
            rows.append((label, float("nan"), str(exc).replace("|", "/")))

    kept = kept_by_mcr_exit(env, py)
    helps = [run(py + ["-m", "mcr_exit", "analyze", "--help"], env, "help")[0] for _ in range(3)]
    rows.append(("`python -m mcr_exit analyze --help` (first of 3; fastest)", helps[0], f"{min(helps):.2f} s"))
    seconds: list[float] = []
    step("`analyze`, first run (empty mcr-exit and Triton caches)",
         lambda: analyze("`analyze`, first run (empty mcr-exit and Triton caches)"))
    step("the warm process answers", lambda: wait_warm(env, py, rows))
    for i in range(args.repeats):
        label = f"`analyze`, second run (repeat {i + 1})"
        step(label, lambda label=label: seconds.append(analyze(label)))
    step("`analyze --no-plots`, second run", lambda: analyze("`analyze --no-plots`, second run", "--no-plots"))
    cold_env = dict(env, MCR_EXIT_WARM="0")
    step("`analyze`, second run without the warm process (`MCR_EXIT_WARM=0`)",
         lambda: analyze("`analyze`, second run without the warm process (`MCR_EXIT_WARM=0`)", run_env=cold_env))
    run(py + ["-m", "mcr_exit", "warm", "stop"], env, "warm stop")
    if args.compare_with:
        old_env = dict(env, PYTHONPATH=os.pathsep.join([str(Path(args.compare_with).resolve()),
                                                         *filter(None, [os.environ.get("PYTHONPATH")])]))
        old_common = [a for a in common if a != "--verbose"]
        if args.mlflow:
            old_common[old_common.index("--tracking-uri") + 1] = f"sqlite:///{work / 'mlflow-before.db'}"
        for label in ("first", "second"):
            name = f"before ({Path(args.compare_with).name}): `analyze`, {label} run"
            step(name, lambda name=name: rows.append((name, run(
                py + ["-m", "mcr_exit", "analyze", *old_common, "--output-dir", str(work / f"before-{len(rows)}")],
                old_env, name)[0], "")))
    step("`load_model` alone", lambda: load_rows(args, dtype, env, py, rows))
    if not args.skip_transformers_load:
        step("GGUF through transformers' loader", lambda: transformers_rows(args, model, dtype, env, py, rows))
    step("bare forward", lambda: forward_rows(args, dtype, data, env, py, rows))
    if kept:
        step("first run with the bytecode kept", lambda: first_run_with_bytecode(work, analyze))
        run(py + ["-m", "mcr_exit", "warm", "stop"], env, "warm stop")
    try:
        import torch

        gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else ""
        versions = f"torch {torch.__version__}"
        import transformers

        versions += f", transformers {transformers.__version__}"
    except Exception:  # noqa: BLE001 - the report names what it can
        gpu, versions = "", ""
    load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    bytecode = bytecode_note(env, kept)
    lines = [
        f"# Time to first result, {args.device} ({gpu or platform.processor() or platform.machine()})",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; {os.cpu_count()} CPUs, load average {load_avg} at the end; "
        f"Python {platform.python_version()}, {versions}; model {Path(model).name}, dtype {dtype}; "
        f"data {Path(data).name if data else 'the built-in corpus'}; "
        f"{'MLflow to a fresh sqlite store' if args.mlflow else '--no-mlflow'}.",
        "",
        bytecode,
        "",
        "Command: `python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]) + "`",
        "",
        "| | wall s | notes |",
        "| --- | ---: | --- |",
        *[f"| {label} | {s:.2f} | {note} |" for label, s, note in rows],
        "",
        f"Second run, fastest of {len(seconds)}: {min(seconds):.2f} s." if seconds else "No second run finished.",
        "",
        *details,
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        Path(args.output).write_text(report)


if __name__ == "__main__":
    main()
