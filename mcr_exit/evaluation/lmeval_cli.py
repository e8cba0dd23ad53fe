"""lm-eval's own command line with the ``mcr-exit-lens`` model registered.

lm-eval 0.4.x has no plugin entry point for models, so this wrapper imports the model class and hands
over to ``lm_eval``'s CLI unchanged:

    python -m mcr_exit.evaluation.lmeval_cli run --model mcr-exit-lens --model_args layer=20 \\
        --tasks mcr_capitals --include_path "$(python -m mcr_exit.evaluation.lmeval_cli --print-task-dir)"
"""

from __future__ import annotations

import sys


def main() -> None:
    from mcr_exit.evaluation.lmeval_model import TASK_DIR, lens_lm_class

    if sys.argv[1:] == ["--print-task-dir"]:
        print(TASK_DIR)
        return
    lens_lm_class()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
