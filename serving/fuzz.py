"""A bounded schemathesis fuzz of the server over its own /openapi.json.

Starts the real HTTP server (uvicorn on loopback, the protocol `mcr-exit serve` uses, with an API key)
on a tiny random 4-block Llama, then, for every operation of the spec, sends ``--examples``
generated cases per mode (positive: bodies the schema allows; negative: bodies it does not) and checks
each response: no 5xx, a status the spec lists, a documented content type, a body that fits the schema,
and schema-invalid bodies rejected. Prints and writes the statuses and failures; exit code 1 on any
failure.

    python serving/fuzz.py --examples 100 --out serving/fuzz_results

Cases are derandomized (the same run gives the same cases). The dev extra installs schemathesis.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_tiny_server(api_key: str | None):
    """(context manager yielding the base URL) of the module server the tests use: a 4-block Llama."""
    import tempfile

    from mcr_exit.models import from_objects
    from mcr_exit.serving.app import create_app
    from tests.serving.conftest import build_engine, make_profile, running_server
    from tests.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer(bos="<bos>", add_bos=False)
    loaded = from_objects(build_tiny_model("llama", len(tok), n_layers=4), tok, name="tiny-llama")
    profile = make_profile(Path(tempfile.mkdtemp()) / "phase_profile.json", name="tiny-llama", model_type="llama",
                           n_layers=4, hidden_size=64, k=2)
    engine = build_engine(loaded, profile, max_inputs=8, max_input_tokens=64, max_new_tokens=16, max_prompts=4)
    return running_server(create_app(engine, api_key=api_key, max_body_bytes=64 * 1024), read_timeout=10)


def fuzz(base_url: str, *, examples: int, headers: dict) -> dict:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", headers=headers)
    session = requests.Session()
    statuses: dict[str, Counter] = defaultdict(Counter)
    failures: list[dict] = []
    seconds = []

    def _runner(op, mode, label):
        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=False,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            t0 = time.perf_counter()
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
            seconds.append(time.perf_counter() - t0)
            statuses[label][str(response.status_code)] += 1
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (AssertionError, FailureGroup) as exc:  # a Failure or a group of them
                for failure in getattr(exc, "exceptions", None) or [exc]:
                    text = str(getattr(failure, "title", "") or failure).strip().splitlines()
                    failures.append({"operation": label, "status": response.status_code,
                                     "failure": text[0] if text else type(failure).__name__,
                                     "body": str(case.body)[:200]})
        return run

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            run = _runner(op, mode, f"{op.method.upper()} {op.path} [{mode.value}]")
            try:
                run()
            except Unsatisfiable:  # an operation with no input has no schema-invalid case
                continue
    total = Counter()
    for counts in statuses.values():
        total.update(counts)
    return {"examples_per_operation_and_mode": examples, "api_key": bool(headers),
            "cases": sum(total.values()), "statuses": dict(sorted(total.items())),
            "by_operation": {k: dict(sorted(v.items())) for k, v in sorted(statuses.items())},
            "server_errors": sum(n for s, n in total.items() if s.startswith("5")),
            "failures": failures, "seconds_per_case_median": sorted(seconds)[len(seconds) // 2] if seconds else 0,
            "schemathesis": schemathesis.__version__ if hasattr(schemathesis, "__version__") else "?"}


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"# Fuzz of the server over /openapi.json (schemathesis {results['schemathesis']})", "",
             f"{results['cases']} cases ({results['examples_per_operation_and_mode']} per operation and mode, "
             f"positive and negative); {results['server_errors']} server errors; {len(results['failures'])} "
             "check failures.", "",
             "Positive cases fit the schema, yet most break a limit the schema cannot state (a random model "
             "name: 404; an empty or over-long input, a layer out of range: 400). Negative cases do not fit it "
             "(401: a generated Authorization header). Produced by `python serving/fuzz.py --examples "
             f"{results['examples_per_operation_and_mode']} --out serving/fuzz_results` (derandomized: the same "
             "cases each run).", "", "| operation | " + " | ".join(results["statuses"]) + " |",
             "| --- |" + " ---: |" * len(results["statuses"])]
    for op, counts in results["by_operation"].items():
        lines.append(f"| {op} | " + " | ".join(str(counts.get(s, "")) for s in results["statuses"]) + " |")
    lines.append("| **all** | " + " | ".join(str(n) for n in results["statuses"].values()) + " |")
    if results["failures"]:
        lines += ["", "## Failures", ""] + [f"- {f['operation']}: {f['status']}: {f['failure']}"
                                            for f in results["failures"][:50]]
    (out / "fuzz.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6))
    codes = list(results["statuses"])
    ax.bar(codes, [results["statuses"][c] for c in codes],
           color=["tab:green" if c < "300" else "tab:orange" if c < "500" else "tab:red" for c in codes])
    ax.set_xlabel("HTTP status")
    ax.set_ylabel("cases")
    ax.set_title(f"schemathesis: {results['cases']} cases, {results['server_errors']} server errors", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fuzz_statuses.png", dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100, help="cases per operation and generation mode")
    p.add_argument("--api-key", default="fuzz-key", help="serve and fuzz with this key ('' for none)")
    p.add_argument("--out", type=Path, default=None, help="write fuzz.json, fuzz.md and a figure here")
    args = p.parse_args(argv)
    key = args.api_key or None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with start_tiny_server(key) as url:
        results = fuzz(url, examples=args.examples, headers=headers)
    print(json.dumps({k: v for k, v in results.items() if k not in ("failures", "by_operation")}, indent=1))
    for f in results["failures"][:20]:
        print(f"FAIL {f['operation']}: {f['status']}: {f['failure']}  body={f['body']}")
    if args.out:
        write(results, args.out)
    return 1 if results["failures"] or results["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
