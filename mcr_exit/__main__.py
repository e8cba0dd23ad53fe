"""``python -m mcr_exit ...`` = the ``mcr-exit`` command (for environments without the console script,
and ``torchrun -m mcr_exit analyze ...``)."""

from mcr_exit.cli import main

main()
