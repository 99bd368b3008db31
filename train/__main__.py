"""`python -m train <stage> <subcommand> ...`: see `train/cli.py`."""

from train.cli import main

main()
