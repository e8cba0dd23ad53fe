"""lm-eval's own command line with the ``mcr-exit-lens`` model registered.

lm-eval 0.4.x has no plugin entry point for models, so this wrapper imports the model class and hands
over to ``lm_eval``'s CLI unchanged:

    python -m mcr_exit.evaluation.lmeval_cli run --model mcr-exit-lens --model_args layer=20 \\
        --tasks mcr_capitals --include_path "$(python -m mcr_exit.evaluation.lmeval_cli --print-task-dir)"

Two differences, both for a machine without a GPU: lm-eval's default ``--device cuda:0`` becomes
``--device cpu`` when no CUDA device exists (said on stderr), and a bad input (a device that is not
there, a layer out of range) is one line on stderr and exit code 1, as for ``mcr-exit``.
"""

from __future__ import annotations

import sys


def device_args(argv: list[str], cuda_available: bool) -> tuple[list[str], str | None]:
    """argv with ``--device cpu`` added when none is given and there is no CUDA device; and a note."""
    given = any(a == "--device" or a.startswith("--device=") for a in argv)
    evaluates = bool(argv) and (argv[0] == "run" or argv[0].startswith("--")) and not {"-h", "--help"} & set(argv)
    if given or cuda_available or not evaluates:
        return argv, None
    return [*argv, "--device", "cpu"], "mcr-exit-lm-eval: no CUDA device; running on the CPU (--device cpu)"


def main() -> None:
    from mcr_exit.errors import McrExitError
    from mcr_exit.evaluation.lmeval_model import TASK_DIR, lens_lm_class

    if sys.argv[1:] == ["--print-task-dir"]:
        print(TASK_DIR)
        return
    import torch

    argv, note = device_args(sys.argv[1:], torch.cuda.is_available())
    if note:
        print(note, file=sys.stderr)
    sys.argv = [sys.argv[0], *argv]
    try:
        lens_lm_class()
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except McrExitError as exc:
        print(f"Error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
